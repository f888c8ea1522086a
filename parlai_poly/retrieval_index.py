"""An HNSW index (faiss) over a bi-encoder's cached candidate encodings.

Exact retrieval scores every candidate: one product with the [N, d] encodings, about 200 ms
per context at N = 1M and d = 384 on two cores, and it reads all N * d floats each time. A
graph index (HNSW: Malkov & Yashunin, 2018; faiss's IndexHNSWFlat, inner product) finds
nearly the same top K by visiting a few thousand candidates, in about a millisecond, after a
build that takes minutes at 1M. It pays for 1M+ candidates; below that exact retrieval is
cheap and has no recall to lose.

On disk, beside the candidate store's files (``CandidateStore.location``'s PREFIX):

    PREFIX.hnsw-<digest>.faiss   the index, in faiss's own binary format (faiss.write_index,
                                 read by faiss.read_index; not pickle)
    PREFIX.hnsw.json             the manifest: the key, its digest, the file's name, size and
                                 sha256, the number and size of vectors, build time, faiss version

``<digest>`` is the sha256 of the key: the candidate store's key (candidate file, tokenizer,
weights, encoding options: what the encodings depend on) plus the index settings (M,
efConstruction). An index built for other candidates, other weights or other settings
therefore has another file name and is never read; building one removes the older ones of
the same PREFIX. Both files are written atomically. Reading checks the manifest, the file's
size and sha256 (faiss does not check the neighbour lists it reads, and a damaged one could
crash a search), and that the index holds N vectors of size d with the inner-product metric;
anything else means building again (a warning when the file looks damaged).
"""
import glob
import os
import time
from typing import Dict, Optional

import numpy as np
import torch
from tqdm import tqdm

from .errors import ParlaiPolyError
from .storage import CheckedFile, Rejected, atomic_write, key_sha256

FORMAT = "parlai_poly.hnsw"
VERSION = 2  # 2: storage.CheckedFile manifests
ADD_BATCH = 20000  # vectors per faiss add call: the progress bar's step


def _log():
    from parlai.utils import logging

    return logging


def import_faiss(option: str = "--retrieve-index hnsw"):
    try:
        import faiss
    except ImportError as e:
        raise ParlaiPolyError(
            f"{option} needs faiss: `pip install faiss-cpu` (a dependency of parlai-poly), "
            f"or use --retrieve-index exact. ({e})"
        ) from e
    return faiss


def index_key(store_key: Dict, m: int, ef_construction: int) -> Dict:
    """What an index depends on: the encodings' key and how the graph was built.

    Not the candidate store's dtype: the graph is built over the float32 encodings, which
    every store dtype keeps the same (bfloat16 and int8 stores beside their compact copy)."""
    return {
        "candidates": {k: v for k, v in store_key.items() if k != "store_dtype"},
        "index": "IndexHNSWFlat",
        "metric": "inner_product",
        "hnsw_m": m,
        "ef_construction": ef_construction,
    }


def _as_numpy(encs: torch.Tensor) -> np.ndarray:
    """float32, C-contiguous [n, d]: what faiss reads without another copy."""
    return np.ascontiguousarray(encs.detach().cpu().float().numpy(), dtype=np.float32)


def build_hnsw(encs: torch.Tensor, m: int = 32, ef_construction: int = 40, threads: Optional[int] = None,
               desc: str = "Building HNSW index"):
    """An IndexHNSWFlat (inner product) over encs [N, d], added in batches with a progress bar."""
    faiss = import_faiss()
    faiss.omp_set_num_threads(threads or torch.get_num_threads())  # as many as torch uses
    n, dim = encs.shape
    index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    steps = range(0, n, ADD_BATCH)
    for start in tqdm(steps, desc=desc, unit="batch", disable=len(steps) < 2):
        index.add(_as_numpy(encs[start : start + ADD_BATCH]))  # [<=ADD_BATCH, d]
    return index


def search(index, queries: torch.Tensor, k: int, ef_search: int) -> torch.Tensor:
    """Indices [B, k] of the (approximately) best k candidates per query [B, d], best first;
    -1 where the graph gave fewer than k."""
    index.hnsw.efSearch = max(ef_search, k)  # HNSW can return at most efSearch results
    _, ids = index.search(_as_numpy(queries), k)
    return torch.from_numpy(ids.astype(np.int64))


class HnswIndexStore:
    """The index of one candidate cache: reused when valid for the key, else built.

    ``prefix`` None keeps it in memory only. After ``get``, ``status`` is 'reused', 'built'
    or 'memory', and ``reason`` says why a cached index was not used.
    """

    def __init__(self, prefix: Optional[str], m: int = 32, ef_construction: int = 40):
        self.prefix = prefix
        self.m = m
        self.ef_construction = ef_construction
        self.status: Optional[str] = None
        self.reason: Optional[str] = None

    @property
    def manifest_path(self) -> str:
        return self.prefix + ".hnsw.json"

    def index_path(self, digest: str) -> str:
        return f"{self.prefix}.hnsw-{digest[:16]}.faiss"

    def get(self, store_key: Dict, encs: torch.Tensor):
        """The index over encs [N, d], whose encodings are valid for ``store_key``."""
        key = index_key(store_key, self.m, self.ef_construction)
        self.reason = None
        if self.prefix is not None:
            index = self.load(key, *encs.shape)
            if index is not None:
                self.status = "reused"
                path = self.index_path(key_sha256(key))
                _log().info(f"Loaded the HNSW index of {index.ntotal} candidates from {path}")
                return index
        began = time.time()
        index = build_hnsw(encs, self.m, self.ef_construction, desc=f"Building HNSW index of {len(encs)} candidates")
        seconds = time.time() - began
        self.status = "memory"
        if self.prefix is not None:
            try:
                self._save(index, key, seconds)
                self.status = "built"
            except OSError as e:
                _log().warning(f"Cannot write the HNSW index beside {self.prefix} ({e}); keeping it in memory.")
        return index

    def _reject(self, reason: str, damaged: bool) -> None:
        self.reason = reason
        message = f"HNSW index {self.manifest_path}: {reason}; building it again."
        (_log().warning if damaged else _log().info)(message)

    def load(self, key: Dict, n: int, dim: int):
        """The cached index, or None (with ``reason``) when it is not valid for ``key``."""
        path = self.index_path(key_sha256(key))
        if not os.path.exists(path):
            self.reason = "no index for these candidates, weights and settings yet"
            return None
        try:
            CheckedFile(path, self.manifest_path, FORMAT, VERSION).check(key)
            return self._read_index(path, n, dim)
        except Rejected as e:
            self._reject(e.reason, e.damaged)
            return None

    @staticmethod
    def _read_index(path: str, n: int, dim: int):
        faiss = import_faiss()
        try:
            index = faiss.read_index(path)
        except RuntimeError as e:  # faiss raises RuntimeError for anything it cannot read
            raise Rejected(f"unreadable index file ({e})", True) from None
        if not hasattr(index, "hnsw") or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise Rejected("not an inner-product HNSW index", True)
        if (index.ntotal, index.d) != (n, dim):
            raise Rejected(f"holds {index.ntotal} vectors of size {index.d}, not {n} of size {dim}", True)
        return index

    def _save(self, index, key: Dict, seconds: float) -> None:
        faiss = import_faiss()
        digest = key_sha256(key)
        path = self.index_path(digest)
        atomic_write(path, lambda tmp: faiss.write_index(index, tmp))
        CheckedFile(path, self.manifest_path, FORMAT, VERSION).record(
            key,
            index_file=os.path.basename(path),
            num_vectors=int(index.ntotal),
            dim=int(index.d),
            build_seconds=round(seconds, 3),
            faiss=getattr(faiss, "__version__", None),
        )
        for old in glob.glob(glob.escape(self.prefix) + ".hnsw-*.faiss"):
            if old != path:  # built for other candidates, weights or settings: never valid again
                try:
                    os.remove(old)
                except OSError:
                    pass
        _log().info(f"Saved the HNSW index of {index.ntotal} candidates to {path} ({seconds:.1f} s to build)")
