"""Encodings of candidates remembered by their token ids, for one version of the weights.

ParlAI encodes every inline candidate of every example: a full CCC test pass (13,331
examples, 20 candidates each) encodes 266,620 candidates, of which 13,034 are distinct. The
bi- and poly-encoder agents instead look each candidate up here by its token ids and encode
only those not seen since the weights last changed, longest first in batches padded to their
own longest row, so each distinct candidate is encoded once per evaluation.
"""
from typing import Callable, Dict, List

import numpy as np
import torch

from .candidate_store import CandidateVectors, encode_sorted

DEFAULT_MAX_ENTRIES = 500_000  # about 770 MB at d = 384: past it the memo starts over


class EncodingMemo:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.max_entries = max_entries
        self.version = None
        self.table: Dict[bytes, torch.Tensor] = {}
        self.encoded = 0  # candidates actually encoded, for tests and logs
        self.looked_up = 0

    def encode(
        self,
        ids: torch.Tensor,
        pad_idx: int,
        encode: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int,
        version: int,
    ) -> torch.Tensor:
        """Encodings [N, d] (CPU) of right-padded candidates ``ids`` [N, L].

        ``encode`` maps ids [n, l] to [n, d]; ``version`` names the weights (the memo is
        emptied when it changes). All-padding rows (padded_3d's fillers) get zero vectors.
        """
        if version != self.version or len(self.table) > self.max_entries:
            self.table = {}
            self.version = version
        rows = ids.cpu().to(torch.int32).numpy()
        lengths = (rows != pad_idx).sum(1)
        keys = [row[:n].tobytes() for row, n in zip(rows, lengths)]
        self._encode_missing(keys, lengths, encode, pad_idx, batch_size)
        self.looked_up += len(keys)
        dim = next(iter(self.table.values())).size(-1) if self.table else 1
        zero = torch.zeros(dim)
        return torch.stack([self.table[k] if k else zero for k in keys])

    def _encode_missing(self, keys: List[bytes], lengths: np.ndarray, encode, pad_idx: int, batch_size: int):
        missing = {}
        for key, n in zip(keys, lengths):
            if key and key not in self.table and key not in missing:
                missing[key] = int(n)
        if not missing:
            return
        flat = np.frombuffer(b"".join(missing), dtype=np.int32)
        vectors = CandidateVectors(flat, np.fromiter(missing.values(), dtype=np.int64, count=len(missing)))
        encs = encode_sorted(  # one batch's candidates: the evaluation's own bar is enough
            vectors, encode, pad_idx, batch_size, lambda d, dtype: torch.empty(len(missing), d, dtype=dtype), progress=False
        )
        self.table.update(zip(missing, encs.float()))
        self.encoded += len(missing)
