"""A teacher's scores of (context, candidate) pairs, kept on disk and reused.

A teacher scores the same pairs again in a second epoch, a second run, or for a second
student; a cross-encoder teacher pays a full forward pass per pair each time. This keeps the
scores, keyed so they are never reused for another teacher:

    pair key = sha256(teacher fingerprint, context text, candidate text), first 16 bytes
    teacher fingerprint = sha256 of the teacher key: the sha256 of its model file's bytes
        (its weights), its tokenizer's, and the options that change what it sees
        (truncation, history); see ``teacher.Teacher.key``

On disk, under ``DIR/teacher-<fingerprint[:16]>/``, shards written atomically, never pickled:

    scores-<time>-<pid>.safetensors   "keys" [M, 2] int64 (the 16 key bytes as two words),
                                      "scores" [M] float32; metadata: format, fingerprint
    scores-<time>-<pid>.json          the manifest (``storage.CheckedFile``): the teacher key,
                                      its fingerprint, M, the tensor file's size and sha256;
                                      written last, so a shard without one is unfinished
                                      and ignored

Shards are only ever added, each by one writer under a unique name, so concurrent students
sharing a teacher do not overwrite each other. A shard that does not check out (another
teacher's, truncated, unreadable) is skipped with a warning and its pairs are scored again.
Lookups go through sorted arrays (20 bytes a pair), not a dict of Python objects.
"""
import glob
import hashlib
import os
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..storage import CheckedFile, Rejected, atomic_write, key_sha256

FORMAT = "parlai_poly.teacher_scores"
VERSION = 2  # 2: storage.CheckedFile manifests (the teacher key under "key", the shard's sha256)
FLUSH_EVERY = 50_000  # pairs held in memory before they are written as a shard


def _log():
    from parlai.utils import logging

    return logging


def pair_keys(fingerprint: str, contexts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
    """[P, 2] int64: the key of each (contexts[p], candidates[p]) under one teacher."""
    out = np.empty((len(contexts), 2), dtype=np.int64)
    prefix = fingerprint.encode("ascii") + b"\0"
    for p, (context, candidate) in enumerate(zip(contexts, candidates)):
        context_bytes = context.encode("utf-8")
        # the context's length first: ("ab", "c") and ("a", "bc") are different pairs
        data = prefix + str(len(context_bytes)).encode("ascii") + b"\0" + context_bytes + candidate.encode("utf-8")
        out[p] = np.frombuffer(hashlib.sha256(data).digest()[:16], dtype="<i8")
    return out


class TeacherScoreCache:
    def __init__(self, directory: str, teacher_key: Dict, info: Dict = None):
        self.teacher_key = teacher_key
        self.fingerprint = key_sha256(teacher_key)
        self.folder = os.path.join(directory, f"teacher-{self.fingerprint[:16]}")
        self.info = info or {}
        self._keys = np.zeros((0, 2), np.int64)  # sorted by (first word, second word)
        self._scores = np.zeros(0, np.float32)
        self._pending: Dict[Tuple[int, int], float] = {}
        self.shards_loaded = 0
        self._load()

    def __len__(self) -> int:
        return len(self._scores) + len(self._pending)

    # ---- reading ----------------------------------------------------------------------
    def _load(self) -> None:
        keys, scores = [], []
        for manifest_path in sorted(glob.glob(os.path.join(self.folder, "scores-*.json"))):
            shard = self._read_shard(manifest_path)
            if shard is not None:
                keys.append(shard[0])
                scores.append(shard[1])
        if keys:
            self._merge(np.concatenate(keys), np.concatenate(scores))
            self.shards_loaded = len(keys)
            _log().info(f"Teacher score cache {self.folder}: {len(self._scores)} pairs from {len(keys)} shards")

    def _read_shard(self, manifest_path: str):
        tensor_path = manifest_path[: -len(".json")] + ".safetensors"
        try:
            manifest = CheckedFile(tensor_path, manifest_path, FORMAT, VERSION).check(self.teacher_key)
            with safe_open(tensor_path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
                    raise Rejected("tensor file does not belong to this manifest", True)
                keys, scores = f.get_tensor("keys"), f.get_tensor("scores")
            count = manifest.get("count")
            if keys.dtype != torch.int64 or list(keys.shape) != [count, 2] or list(scores.shape) != [count]:
                raise Rejected(f"tensor shapes {list(keys.shape)} {list(scores.shape)} differ from the manifest", True)
            return keys.numpy(), scores.float().numpy()
        except Exception as e:  # Rejected, and safetensors' own types for damaged files
            _log().warning(f"Teacher score cache: skipping shard {manifest_path} ({e.__class__.__name__}: {e})")
            return None

    def _merge(self, keys: np.ndarray, scores: np.ndarray) -> None:
        keys = np.concatenate([self._keys, keys])
        scores = np.concatenate([self._scores, scores])
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        keys, scores = keys[order], scores[order]
        keep = np.ones(len(keys), bool)
        keep[1:] = (keys[1:] != keys[:-1]).any(1)  # a pair written by two runs: keep one
        self._keys, self._scores = keys[keep], scores[keep]

    def lookup(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """keys [P, 2] -> (scores [P] float32, found [P] bool)."""
        scores = np.zeros(len(keys), np.float32)
        found = np.zeros(len(keys), bool)
        if len(self._keys):
            # first words are distinct but for a 2^-64 chance; the second word confirms
            first = self._keys[:, 0]
            at = np.searchsorted(first, keys[:, 0]).clip(max=len(first) - 1)
            hit = (first[at] == keys[:, 0]) & (self._keys[at, 1] == keys[:, 1])
            scores[hit], found[hit] = self._scores[at[hit]], True
        for p in np.flatnonzero(~found):
            value = self._pending.get((int(keys[p, 0]), int(keys[p, 1])))
            if value is not None:
                scores[p], found[p] = value, True
        return scores, found

    # ---- writing ----------------------------------------------------------------------
    def add(self, keys: np.ndarray, scores: np.ndarray) -> None:
        for (first, second), score in zip(keys.tolist(), np.asarray(scores, np.float32).tolist()):
            self._pending[(first, second)] = score
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Write the pairs scored since the last flush as one new shard."""
        if not self._pending:
            return
        keys = np.array(list(self._pending.keys()), dtype=np.int64).reshape(-1, 2)
        scores = np.array(list(self._pending.values()), dtype=np.float32)
        stem = os.path.join(self.folder, f"scores-{time.time_ns()}-{os.getpid()}")
        tensors = {"keys": torch.from_numpy(keys), "scores": torch.from_numpy(scores)}
        metadata = {"format": FORMAT, "fingerprint": self.fingerprint}
        try:
            atomic_write(stem + ".safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata))
            checked = CheckedFile(stem + ".safetensors", stem + ".json", FORMAT, VERSION)
            checked.record(self.teacher_key, fingerprint=self.fingerprint, count=len(scores), **self.info)
        except OSError as e:
            _log().warning(f"Cannot write the teacher score cache {self.folder} ({e}); keeping the scores in memory.")
            return
        self._pending.clear()
        self._merge(keys, scores)
        _log().info(f"Teacher score cache: wrote {len(scores)} pairs to {stem}.safetensors")

    def shard_files(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.folder, "scores-*")))
