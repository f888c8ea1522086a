"""Bi-encoder: context and candidate encoded apart, scored by a dot product.

    y_ctxt = red(T1(ctxt)),  y_cand = red(T2(cand)),  score = y_ctxt . y_cand

T1 and T2 start from the same backbone and are one module unless --share-encoders false.
Candidates do not see the context, so their vectors can be computed once and cached.
With ``candidate_mlp``, y_cand = MLP(red(T2(cand))) (Linear, ReLU, Linear): what ParlAI's
transformer/biencoder does with --share-encoders true, kept for the models migrated from it.

Scoring many cached candidates goes in chunks of candidates (``score_in_chunks``), so the
temporaries of one scoring call stay under a fixed budget whatever the number of candidates;
only the [B, N] scores themselves grow with N. On CPU the budget is small enough for a
chunk's temporaries to stay in the L2 cache while the softmax and sums read them again
(``CPU_SCORE_CHUNK_BYTES``): scoring poly-64 over 100k candidates took 184 ms in chunks of
64 MB and 143 ms in chunks of 4 MB here (1 thread, median; 95 and 63 ms in bfloat16).
Elsewhere (GPU) fewer, larger chunks launch fewer kernels (``SCORE_CHUNK_BYTES``).
"""
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from .. import distributed
from .config import ModelConfig
from .encoder import TextEncoder
from .pooling import Pooling

SCORE_CHUNK_BYTES = 64 * 2**20  # temporaries of one chunk of candidates, about 64 MB
CPU_SCORE_CHUNK_BYTES = 4 * 2**20  # on CPU: about what one core's L2 cache holds


def chunk_budget(budget: Optional[int], tensor: torch.Tensor) -> int:
    """The bytes one chunk's temporaries may take: ``budget``, or by default by device."""
    if budget is not None:
        return budget
    return CPU_SCORE_CHUNK_BYTES if tensor.device.type == "cpu" else SCORE_CHUNK_BYTES


def score_in_chunks(
    score_chunk: Callable[[torch.Tensor], torch.Tensor],
    candidates: torch.Tensor,
    bytes_per_candidate: int,
    chunk_size: Optional[int] = None,
    budget: int = SCORE_CHUNK_BYTES,
) -> torch.Tensor:
    """Scores [B, N] of candidates [N, d] (shared) or [B, N, d], ``score_chunk`` at a time.

    ``score_chunk`` maps a slice of the candidates along N to its [B, n] scores;
    ``bytes_per_candidate`` is what it allocates per candidate, which sets the chunk size to
    ``budget // bytes_per_candidate`` unless ``chunk_size`` is given.
    """
    n = candidates.size(-2)
    if chunk_size is None:
        chunk_size = max(1, budget // max(1, bytes_per_candidate))
    if n <= chunk_size:
        return score_chunk(candidates)
    first = score_chunk(candidates[..., :chunk_size, :])
    out = first.new_empty(first.size(0), n)
    out[:, :chunk_size] = first
    for start in range(chunk_size, n, chunk_size):
        out[:, start : start + chunk_size] = score_chunk(candidates[..., start : start + chunk_size, :])
    return out


class DualEncoderModule(nn.Module):
    """What bi- and poly-encoders share: a context encoder, a candidate encoder (or the same
    one), pooled candidates, and a training forward. Subclasses define encode_context, score
    and score_encoded(context, candidates)."""

    def __init__(self, context_encoder: TextEncoder, candidate_encoder: Optional[TextEncoder], reduction: str, first_m: int):
        super().__init__()
        self.context_encoder = context_encoder
        self.candidate_encoder = candidate_encoder  # None: shared with the context
        self.pooling = Pooling(reduction, first_m)
        self.score_chunk_bytes: Optional[int] = None  # None: chunk_budget's default for the device

    def forward(self, context_ids: torch.Tensor, candidate_ids: torch.Tensor, gather_negatives: bool = False):
        """Training scores [B, N]: contexts [B, T] against candidates [N, L] shared by the batch
        (with ``gather_negatives``, joined by every other worker's) or [B, C, L] per example.

        One call does it all, so DistributedDataParallel sees one forward per step."""
        cands = self.encode_candidates(candidate_ids.reshape(-1, candidate_ids.size(-1)))
        cands = cands.view(*candidate_ids.shape[:-1], -1)
        if gather_negatives:
            cands = distributed.gather_negatives(cands)
        return self.score_encoded(self.encode_context(context_ids), cands)

    def encode_candidates(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, L] -> [N, d]"""
        encoder = self.candidate_encoder if self.candidate_encoder is not None else self.context_encoder
        return self.pooling(*encoder(ids))


@dataclass
class BiEncoderConfig(ModelConfig):
    """A bi-encoder: how its vectors are pooled, whether candidates have their own encoder
    (``share_encoders`` false: a copy of the context's) and ParlAI's candidate MLP."""

    kind: ClassVar[str] = "bi"
    reduction_first_m: int = 16
    share_encoders: bool = True
    candidate_mlp: bool = False


class BiEncoderModule(DualEncoderModule):
    @classmethod
    def from_config(cls, config: BiEncoderConfig, context_encoder: TextEncoder, candidate_encoder=None):
        return cls(
            context_encoder, candidate_encoder, config.reduction_type, config.reduction_first_m, config.candidate_mlp
        )

    def __init__(
        self,
        context_encoder: TextEncoder,
        candidate_encoder: Optional[TextEncoder] = None,
        reduction: str = "mean",
        first_m: int = 16,
        candidate_mlp: bool = False,
    ):
        super().__init__(context_encoder, candidate_encoder, reduction, first_m)
        dim = context_encoder.dim
        # ParlAI's TransformerResponseWrapper: its ReLU is fixed whatever --activation says
        mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) if candidate_mlp else None
        self.candidate_mlp = mlp

    def encode_candidates(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, L] -> [N, d]"""
        cands = super().encode_candidates(ids)
        return cands if self.candidate_mlp is None else self.candidate_mlp(cands)

    def score_encoded(self, context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.score(context, candidates)

    def encode_context(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, d]"""
        return self.pooling(*self.context_encoder(ids))

    def score(self, context: torch.Tensor, candidates: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """context [B, d]; candidates [N, d] shared by the batch, or [B, N, d] -> scores [B, N]

        One GEMM per chunk of candidates; a chunk's only temporary is its [B, n] scores.
        """

        def chunk_scores(cands):
            if cands.dim() == 2:
                return context @ cands.t()
            return torch.bmm(cands, context.unsqueeze(-1)).squeeze(-1)

        per_candidate = context.size(0) * context.element_size()
        budget = chunk_budget(self.score_chunk_bytes, candidates)
        return score_in_chunks(chunk_scores, candidates, per_candidate, chunk_size, budget)
