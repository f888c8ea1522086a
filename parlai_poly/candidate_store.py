"""Fixed candidates encoded once, kept on disk, and never silently stale.

A bi- or poly-encoder's candidate vectors do not depend on the context, so a fixed candidate
file (``--eval-candidates fixed --fixed-candidates-path F``, and interactive mode's default
candidates) is tokenized and encoded once and then reused. ParlAI 1.7.2 caches these as
pickles named after the candidate file only, and by default (``--fixed-candidate-vecs
reuse``) reuses them after the model was retrained into the same model file or the
candidate file was edited. Here the cache records everything the encodings depend on and is
reused only when all of it matches.

On disk, per (model file, candidate file), two files beside the model file (or in
``--candidate-cache-dir``), both written atomically:

    PREFIX.safetensors   "vecs" [N, L] int32: the padded token ids, which ParlAI compares
                         with each label to find it among the candidates;
                         "encs" [N, d]: the candidate encodings in the store's dtype
                         (--candidate-store-dtype: float32, bfloat16 or int8), what
                         scoring reads;
                         "scales" [N] float32 (int8 only): each vector's scale;
                         "encs_float32" [N, d] (bfloat16 and int8 only): the encodings in
                         float32, from which the agents rescore each context's top K.
                         Metadata: {"format", "key_sha256"}.
    PREFIX.json          the manifest: the key (below), its sha256, the tensors' shapes and
                         dtypes, the file size and the file's sha256, and facts for people
                         (paths, timings).

The key: sha256 of the candidate file's bytes and the number of candidates; sha256 of the
tokenizer (its full serialized form, added tokens included), the truncation and the
special-token ids; sha256 of the candidate encoder's weights as they are in memory (every
tensor's name, dtype, shape and bytes; with shared encoders that is the context encoder);
the options that shape an encoding: agent type, --hf-model, backbone architecture,
--reduction-type, --reduction-first-m, --label-truncate, --label-truncation, --share-encoders;
and the store's dtype (``store_dtype``), so a store of another dtype is never read as this one.

Loading checks the manifest parses and its key equals the key computed now, the tensor
file has the recorded size and sha256 (a file rewritten in place at the same size is not
believed; hashing reads it at about 1 GB/s), a readable header, the same key digest in its
metadata, and the recorded shapes and dtypes; tensors are then memory-mapped (safetensors maps the file and
pages come in on use). Anything else means re-encoding: with a warning when the cache looks
damaged (truncated, unreadable, mismatched), with an info line when it is just out of date.

Building tokenizes the candidates into a compact flat array, sorts them by length so each
batch is padded only to its own longest candidate, encodes under torch.inference_mode with
a progress bar, and writes each batch straight into the memory-mapped output file (space
reserved up front), so building needs memory for one batch, not for N encodings. A bfloat16 or int8 store is
then quantized from the float32 encodings a chunk at a time, in the same file.

Why the float32 copy is kept (bfloat16 and int8 stores): rescoring needs the float32
vectors of each context's top K. Encoding those K texts again would cost a forward pass per
context (about as much as the context's own, per batch of K) and give encodings that are not
those of the store when --precision differs; keeping an [N, d] float32 copy in memory would
give back the memory the store saves. Kept in the file, it is memory-mapped like the rest and
only the K rows rescoring indexes are ever read from it (their pages), while scoring reads the
compact tensor. (The same split as Hugging Face's embedding-quantization demo: the compact
index in memory, the precise vectors on disk for rescoring.)

Changing only --candidate-store-dtype does not encode again: a store valid for the same key
in another dtype (or a float32 store of an earlier version, whose key had no dtype) is
converted from its float32 encodings (``status`` 'converted').
"""
import hashlib
import json
import os
import struct
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from .modules.stored import STORE_DTYPES, TORCH_DTYPES, StoredCandidates
from .storage import CheckedFile, Rejected, atomic_write, key_sha256, sha256_file, tensors_sha256

FORMAT = "parlai_poly.candidates"
VERSION = 3  # bump when the layout or the way candidates are vectorized changes (3: storage.CheckedFile)
VECS, ENCS, SCALES, EXACT = "vecs", "encs", "scales", "encs_float32"
QUANTIZE_STEP = 65536  # rows quantized at a time when a low-precision store is written

# torch dtype -> (safetensors dtype code, numpy dtype with the same bytes)
_DTYPES = {
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.bfloat16: ("BF16", np.uint16),
    torch.float64: ("F64", np.float64),
    torch.int32: ("I32", np.int32),
    torch.int8: ("I8", np.int8),
}
_CODES = {code: dtype for dtype, (code, _) in _DTYPES.items()}


def _log():
    from parlai.utils import logging

    return logging


# ---- fingerprints (files, tensors and keys: ``storage``) -----------------------------------
def module_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's weights (parameters and buffers), as they are in memory."""
    return tensors_sha256(module.state_dict().items())


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of everything that turns text into ids: a fast tokenizer's full JSON form
    (vocabulary, normalizer, pre-tokenizer, added tokens), else its class and vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = type(tokenizer).__name__ + "\n" + backend.to_str()
    else:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else dict(tokenizer)
        text = type(tokenizer).__name__ + "\n" + json.dumps(sorted(vocab.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dictionary_sha256(dictionary) -> str:
    """sha256 of how a dictionary agent turns text into ids: its backbone tokenizer's (above)
    or, for ParlAI's own DictionaryAgent (models from parlai_poly.migrate), its tokenizer
    settings, vocabulary and BPE codecs."""
    tokenizer = getattr(dictionary, "tokenizer", None)
    if not isinstance(tokenizer, str):  # ParlAI's dictionary names its tokenizer ('re', 'bpe')
        return tokenizer_sha256(tokenizer or dictionary.tok2ind)
    settings = [tokenizer, dictionary.lower, dictionary.max_ngram_size, dictionary.additional_special_tokens]
    text = json.dumps([settings, sorted(dictionary.tok2ind.items())])
    codecs = getattr(getattr(dictionary, "bpe", None), "codecs", None)
    if isinstance(codecs, str) and os.path.isfile(codecs):
        text += "\n" + sha256_file(codecs)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---- token ids ---------------------------------------------------------------------------
class CandidateVectors:
    """The token ids of N candidates, stored flat (int32) with their lengths."""

    def __init__(self, flat: np.ndarray, lengths: np.ndarray):
        self.flat = np.ascontiguousarray(flat, dtype=np.int32)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])

    @classmethod
    def from_texts(
        cls,
        cands: Sequence[str],
        vectorize: Callable[[List[str]], List[torch.Tensor]],
        batch_size: int = 512,
    ) -> "CandidateVectors":
        """``vectorize`` is the agent's: a list of texts -> a list of 1-d id tensors."""
        flats, lengths = [], []
        batches = range(0, len(cands), batch_size)
        for start in tqdm(batches, desc="Vectorizing candidates", unit="batch", disable=len(batches) < 2):
            vecs = vectorize(list(cands[start : start + batch_size]))
            lengths.extend(len(v) for v in vecs)
            flats.extend(np.asarray(v, dtype=np.int32) for v in vecs)
        flat = np.concatenate(flats) if flats else np.zeros(0, np.int32)
        return cls(flat, np.array(lengths, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def rows(self, index: np.ndarray, pad_idx: int, width: Optional[int] = None) -> np.ndarray:
        """[len(index), width] padded ids of candidates ``index`` (width: their longest)."""
        lengths = self.lengths[index]
        width = int(lengths.max()) if width is None else width
        out = np.full((len(index), width), pad_idx, dtype=np.int32)
        mask = np.arange(width) < lengths[:, None]
        out[mask] = np.concatenate([self.flat[self.offsets[i] : self.offsets[i + 1]] for i in index])
        return out

    def fill_padded(self, out: np.ndarray, pad_idx: int, step: int = 65536) -> np.ndarray:
        """Write all [N, L] padded ids into ``out`` (e.g. a file mapping), ``step`` rows at a time."""
        for start in range(0, len(self), step):
            index = np.arange(start, min(start + step, len(self)))
            out[start : start + len(index)] = self.rows(index, pad_idx, out.shape[1])
        return out

    def padded(self, pad_idx: int) -> torch.Tensor:
        """[N, L] int32 padded ids, in memory."""
        return torch.from_numpy(self.fill_padded(np.empty((len(self), self.max_len), np.int32), pad_idx))


def encode_sorted(
    vectors: CandidateVectors,
    encode: Callable[[torch.Tensor], torch.Tensor],
    pad_idx: int,
    batch_size: int,
    allocate: Callable[[int, torch.dtype], torch.Tensor],
    desc: str = "Encoding candidates",
    progress: bool = True,
) -> torch.Tensor:
    """Encode every candidate, longest first, each batch padded to its own longest one.

    ``encode`` maps ids [n, l] (int64, CPU) to [n, d]; ``allocate(d, dtype)`` returns the
    [N, d] tensor to fill in the candidates' original order (in memory or a file mapping).
    ``progress``: announce the work and show a bar (not for small work inside a loop that
    shows its own).
    """
    order = np.argsort(-vectors.lengths, kind="stable")
    out = None
    batches = range(0, len(order), batch_size)
    progress = progress and len(batches) > 1
    for start in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        index = order[start : start + batch_size]
        ids = torch.from_numpy(vectors.rows(index, pad_idx)).long()
        began = time.perf_counter()
        with torch.inference_mode():
            encs = encode(ids).detach().cpu()
        if out is None:
            out = allocate(encs.size(-1), encs.dtype)
            if progress:
                announce_encoding(vectors.lengths[order], batch_size, time.perf_counter() - began)
        out[torch.from_numpy(index)] = encs
    return out


def announce_encoding(sorted_lengths: np.ndarray, batch_size: int, first_seconds: float) -> None:
    """Say how many candidates are being encoded and about how long it takes, from the first
    batch's time: each batch costs about its padded tokens (its longest, the first, times its
    size), so the whole is the first batch's time scaled by the ratio of padded tokens."""
    padded = sorted_lengths[::batch_size] * np.diff(np.append(np.arange(0, len(sorted_lengths), batch_size), len(sorted_lengths)))
    seconds = first_seconds * padded.sum() / padded[0]
    about = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
    _log().info(f"Encoding {len(sorted_lengths):,} candidates once: about {about} here (the bar below shows time left)")


# ---- safetensors written in place ---------------------------------------------------------
class _SafetensorsWriter:
    """A safetensors file laid out up front, its tensors mapped writable in place."""

    def __init__(self, path: str, specs: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]], metadata: Dict[str, str]):
        header: Dict = {"__metadata__": metadata}
        offset = 0
        layout = []
        for name, dtype, shape in specs:
            code, np_dtype = _DTYPES[dtype]
            nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            layout.append((name, dtype, shape, offset, offset + nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.size = 8 + len(blob) + offset
        with open(path, "r+b") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            f.flush()
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, self.size)  # no space: an error now, not SIGBUS later
            else:
                f.truncate(self.size)
        self._map = np.memmap(path, dtype=np.uint8, mode="r+", offset=8 + len(blob), shape=(offset,))
        self.tensors: Dict[str, torch.Tensor] = {}
        for name, dtype, shape, start, end in layout:
            array = self._map[start:end].view(_DTYPES[dtype][1]).reshape(shape)
            tensor = torch.from_numpy(array)
            self.tensors[name] = tensor.view(dtype) if dtype == torch.bfloat16 else tensor

    def close(self):
        self._map.flush()
        self.tensors.clear()
        del self._map


def _describe(dtype: torch.dtype, shape) -> Dict:
    return {"dtype": _DTYPES[dtype][0], "shape": list(shape)}


# ---- the store -----------------------------------------------------------------------------
Vectors = Union[CandidateVectors, Callable[[], CandidateVectors]]
Loaded = Tuple[torch.Tensor, torch.Tensor, StoredCandidates]


def store_layout(dtype: str, n: int, width: int, dim: int) -> List[Tuple[str, torch.dtype, Tuple[int, ...]]]:
    """The tensors of a store of ``dtype`` (see the module docstring): (name, dtype, shape)."""
    specs = [(VECS, torch.int32, (n, width)), (ENCS, TORCH_DTYPES[dtype], (n, dim))]
    if dtype == "int8":
        specs.append((SCALES, torch.float32, (n,)))
    if dtype != "float32":
        specs.append((EXACT, torch.float32, (n, dim)))
    return specs


def _exact_name(dtype: str) -> str:
    """The tensor that holds a store's float32 encodings."""
    return ENCS if dtype == "float32" else EXACT


def _key_dtype(key: Dict) -> str:
    """A key's store dtype; keys written before there was a choice are float32 stores."""
    return key.get("store_dtype", "float32")


def _without_dtype(key: Dict) -> Dict:
    return {k: v for k, v in key.items() if k != "store_dtype"}


class CandidateStore:
    """Encodings of one candidate file for one model: reused when valid, else rebuilt.

    ``prefix`` None keeps everything in memory (no model file and no cache directory).
    ``dtype`` ('float32', 'bfloat16' or 'int8') is how the encodings are kept for scoring;
    it is part of the key. After ``get``, ``status`` says what happened ('reused',
    'converted', 'built', 'memory'), ``reason`` why a cache was not reused, and ``key`` the
    key the encodings are valid for (what an index built over them, ``retrieval_index``, is
    keyed by).
    """

    def __init__(self, prefix: Optional[str], dtype: str = "float32"):
        if dtype not in STORE_DTYPES:
            raise ValueError(f"--candidate-store-dtype {dtype}: choose one of {', '.join(STORE_DTYPES)}")
        self.prefix = prefix
        self.dtype = dtype
        self.status: Optional[str] = None
        self.reason: Optional[str] = None
        self.key: Optional[Dict] = None
        self._damaged = False

    @property
    def tensor_path(self) -> str:
        return self.prefix + ".safetensors"

    @property
    def manifest_path(self) -> str:
        return self.prefix + ".json"

    @staticmethod
    def location(model_file: Optional[str], candidate_file: str, cache_dir: Optional[str] = None) -> Optional[str]:
        """PREFIX for a candidate file: beside the model file, or in ``cache_dir``.

        The name carries the candidate file's stem and a short hash of its absolute path
        (and of the model file's, in a shared directory), so different candidate files or
        models never overwrite each other's cache. None: no model file and no directory.
        """
        if not cache_dir and not model_file:
            return None
        name = os.path.splitext(os.path.basename(candidate_file))[0]
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
        ident = os.path.abspath(candidate_file)
        if cache_dir:
            ident += "\0" + (os.path.abspath(model_file) if model_file else "")
            base = os.path.join(cache_dir, os.path.basename(model_file) if model_file else "model")
        else:
            base = model_file
        short = hashlib.sha256(ident.encode("utf-8")).hexdigest()[:10]
        return f"{base}.cands-{stem}-{short}"

    def full_key(self, key: Dict) -> Dict:
        """``key`` (what the encodings depend on) with this store's dtype."""
        return {**key, "store_dtype": self.dtype}

    # -- reading --
    def _announce_rejection(self) -> None:
        message = f"Candidate cache {self.tensor_path}: {self.reason}; encoding the candidates again."
        if self._damaged:
            _log().warning(message)
        else:
            _log().info(message)

    def _try_load(self, key: Dict) -> Optional[Loaded]:
        """(vecs, float32 encs, stored) memory-mapped, or None with ``reason`` (not logged)."""
        self._damaged = False
        if self.prefix is None:
            return None
        try:
            return self._checked_tensors(key)
        except Rejected as e:
            self.reason = "no cache yet" if e.reason == "nothing cached yet" else e.reason
            self._damaged = e.damaged
            return None

    def load(self, key: Dict) -> Optional[Loaded]:
        """(vecs [N, L], encs [N, d] float32, stored) memory-mapped, or None (with
        ``reason``, logged) when not valid for ``key`` (which includes ``store_dtype``)."""
        loaded = self._try_load(key)
        if loaded is None and self.prefix is not None and self.reason != "no cache yet":
            self._announce_rejection()
        return loaded

    def _checked_tensors(self, key: Dict) -> Loaded:
        dtype = _key_dtype(key)
        manifest = CheckedFile(self.tensor_path, self.manifest_path, FORMAT, VERSION).check(key)
        names = [name for name, _, _ in store_layout(dtype, 0, 0, 0)]
        try:
            with safe_open(self.tensor_path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("key_sha256") != key_sha256(key):
                    raise Rejected("tensor file does not belong to this manifest (key digest differs)", True)
                tensors = {name: f.get_tensor(name) for name in names}
        except Rejected:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers/sizes
            raise Rejected(f"unreadable tensor file ({e.__class__.__name__}: {e})", True) from None
        for name, tensor in tensors.items():
            if _describe(tensor.dtype, tensor.shape) != manifest.get("tensors", {}).get(name):
                raise Rejected(f"tensor {name} {_describe(tensor.dtype, tensor.shape)} differs from the manifest", True)
        if tensors[ENCS].dtype != TORCH_DTYPES[dtype]:
            raise Rejected(f"encodings in {tensors[ENCS].dtype}, not the {dtype} the key says", True)
        n = key.get("num_candidates")
        if any(tensor.size(0) != n for tensor in tensors.values()):
            raise Rejected(f"holds {tensors[ENCS].size(0)} candidates, not {n}", True)
        stored = StoredCandidates(tensors[ENCS], tensors.get(SCALES))
        return tensors[VECS], tensors[_exact_name(dtype)], stored

    # -- building --
    def get(
        self,
        key: Dict,
        vectors: Vectors,
        encode: Callable[[torch.Tensor], torch.Tensor],
        pad_idx: int,
        batch_size: int = 256,
        rebuild: bool = False,
        info: Optional[Dict] = None,
    ) -> Loaded:
        """(vecs [N, L] int32, encs [N, d] float32, stored): from the cache when valid for
        ``key`` and this store's dtype, converted from a cache of another dtype, else built.

        ``vectors`` (or a function making them, called only when building) are the
        candidates' token ids; ``encode`` maps ids [n, l] to encodings [n, d]. ``info`` adds
        fields for people to the manifest. ``stored`` is what scoring reads: the encodings
        in the store's dtype (for float32, ``encs`` itself).
        """
        key = self.full_key(key)
        self.reason = None
        self.key = key
        info = info or {}
        if rebuild:
            self.reason = "rebuild asked for (--fixed-candidate-vecs replace)"
        else:
            loaded = self._try_load(key)
            if loaded is not None:
                self.status = "reused"
                _log().info(f"Loaded {loaded[1].size(0)} candidate encodings from {self.tensor_path}")
                return loaded
            converted = self._convert(key, info)
            if converted is not None:
                return converted
            if self.prefix is not None and self.reason != "no cache yet":
                self._announce_rejection()
        if not isinstance(vectors, CandidateVectors):
            vectors = vectors()
        if self.prefix is not None:
            try:
                result = self._build_file(key, vectors, encode, pad_idx, batch_size, info)
                self.status = "built"
                return result
            except OSError as e:
                _log().warning(
                    f"Cannot write the candidate cache {self.tensor_path} ({e}); keeping the encodings in memory."
                )
        self.status = "memory"
        vecs = vectors.padded(pad_idx)
        encs = encode_sorted(
            vectors, encode, pad_idx, batch_size, lambda d, dtype: torch.empty(len(vectors), d),
            desc=f"Encoding {len(vectors)} candidates",
        )
        return vecs, encs, StoredCandidates.quantize(encs, self.dtype)

    def _convert(self, key: Dict, info: Dict) -> Optional[Loaded]:
        """The cache on disk rewritten in this store's dtype, when it holds these very
        encodings in another (only ``store_dtype`` differs, and it checks out); else None."""
        if self.prefix is None or not self.reason or not self.reason.startswith("out of date"):
            return None
        try:
            with open(self.manifest_path, "r", encoding="utf-8") as f:
                old_key = json.load(f)["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(old_key, dict) or _without_dtype(old_key) != _without_dtype(key):
            return None
        try:
            old_vecs, old_encs, _ = self._checked_tensors(old_key)
        except Rejected:
            return None
        n, width = old_vecs.shape
        reason = self.reason

        def fill(open_tensors):
            tensors = open_tensors(old_encs.size(1))
            exact = tensors[_exact_name(self.dtype)]
            for start in range(0, n, QUANTIZE_STEP):
                rows = slice(start, start + QUANTIZE_STEP)
                tensors[VECS][rows] = old_vecs[rows]
                exact[rows] = old_encs[rows]

        try:
            self._write(key, n, width, fill, info)
        except OSError as e:
            _log().warning(f"Cannot rewrite the candidate cache {self.tensor_path} as {self.dtype} ({e}).")
            return None
        loaded = self._try_load(key)
        if loaded is None:
            return None
        self.status, self.reason = "converted", reason
        _log().info(
            f"Converted the candidate cache {self.tensor_path} from {_key_dtype(old_key)} to {self.dtype} "
            "(--candidate-store-dtype), without encoding again"
        )
        return loaded

    def _write(self, key: Dict, n: int, width: int, fill: Callable, info: Dict) -> Dict:
        """Write the store file atomically, then its manifest; returns the manifest.

        ``fill(open_tensors)`` calls ``open_tensors(dim)`` (which lays the file out and
        returns its tensors, mapped writable) and writes the token ids and the float32
        encodings into them; the copy in a bfloat16 or int8 store is quantized from those
        here, QUANTIZE_STEP rows at a time.
        """
        written: Dict = {}
        began = time.time()

        def write(tmp):
            writer = None

            def open_tensors(dim):
                nonlocal writer
                specs = store_layout(self.dtype, n, width, dim)
                writer = _SafetensorsWriter(tmp, specs, {"format": FORMAT, "key_sha256": key_sha256(key)})
                written["tensors"] = {name: _describe(dt, shape) for name, dt, shape in specs}
                return writer.tensors

            try:
                fill(open_tensors)
                if writer is not None and self.dtype != "float32":
                    _quantize_into(writer.tensors, self.dtype)
            finally:
                if writer is not None:
                    writer.close()

        atomic_write(self.tensor_path, write)
        return CheckedFile(self.tensor_path, self.manifest_path, FORMAT, VERSION).record(
            key,
            tensors=written["tensors"],
            encode_seconds=round(time.time() - began, 3),
            torch=torch.__version__,
            **info,
        )

    def _build_file(self, key, vectors, encode, pad_idx, batch_size, info) -> Loaded:
        n = len(vectors)

        def fill(open_tensors):
            def allocate(dim, dtype):
                tensors = open_tensors(dim)
                vectors.fill_padded(tensors[VECS].numpy(), pad_idx)
                return tensors[_exact_name(self.dtype)]  # float32: encodings are cast as written

            encode_sorted(vectors, encode, pad_idx, batch_size, allocate, desc=f"Encoding {n} candidates")

        manifest = self._write(key, n, vectors.max_len, fill, info)
        _log().info(f"Saved {n} candidate encodings to {self.tensor_path} ({manifest['encode_seconds']:.1f} s)")
        loaded = self.load(key)  # memory-mapped from the file just written, which checks it too
        if loaded is None:
            raise OSError(f"the candidate cache just written does not read back: {self.reason}")
        return loaded


def _quantize_into(tensors: Dict[str, torch.Tensor], dtype: str) -> None:
    """Fill a store's ``encs`` (and int8 ``scales``) from its float32 copy, chunk by chunk."""
    exact = tensors[EXACT]
    for start in range(0, exact.size(0), QUANTIZE_STEP):
        stored = StoredCandidates.quantize(exact[start : start + QUANTIZE_STEP], dtype)
        tensors[ENCS][start : start + QUANTIZE_STEP] = stored.values
        if stored.scales is not None:
            tensors[SCALES][start : start + QUANTIZE_STEP] = stored.scales
