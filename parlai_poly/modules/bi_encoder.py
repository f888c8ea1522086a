"""Bi-encoder: context and candidate encoded apart, scored by a dot product.

    y_ctxt = red(T1(ctxt)),  y_cand = red(T2(cand)),  score = y_ctxt . y_cand

or, with ``similarity`` cosine, score = s * cos(y_ctxt, y_cand): y_ctxt kept as s times its
unit vector, y_cand as its unit vector, so the same dot product scores it.

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

Candidates kept in bfloat16 or int8 by a candidate store (``stored.StoredCandidates``) are
scored without converting the store: for a few contexts in one fused pass (``stored.fused_dot``:
each number read once, products accumulated in float32; float32 candidates too), else a
product per chunk: int8 ones multiplied as int8 on CPU (``stored.int8_product``), bfloat16
otherwise.
"""
import functools
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from .. import distributed
from .config import DualEncoderConfig
from .encoder import TextEncoder
from .pooling import Pooling
from .stored import (
    FUSED_DOT_MAX_CONTEXTS, FUSED_MIN_CANDIDATES, Candidates, StoredCandidates, candidate_chunks, fused_dot, int8_product,
    num_candidates, quantize_contexts_int8, takes_int8_products,
)

SCORE_CHUNK_BYTES = 64 * 2**20  # temporaries of one chunk of candidates, about 64 MB
CPU_SCORE_CHUNK_BYTES = 4 * 2**20  # on CPU: about what one core's L2 cache holds


def chunk_budget(budget: Optional[int], tensor: torch.Tensor) -> int:
    """The bytes one chunk's temporaries may take: ``budget``, or by default by device."""
    if budget is not None:
        return budget
    return CPU_SCORE_CHUNK_BYTES if tensor.device.type == "cpu" else SCORE_CHUNK_BYTES


def score_in_chunks(
    score_chunk: Callable[[torch.Tensor], torch.Tensor],
    candidates: Candidates,
    bytes_per_candidate: int,
    chunk_size: Optional[int] = None,
    budget: int = SCORE_CHUNK_BYTES,
    int8_as_stored: bool = False,
) -> torch.Tensor:
    """Scores [B, N] of candidates [N, d] (shared), [B, N, d] or stored, ``score_chunk`` at a time.

    ``score_chunk(rows, scales)`` maps a slice of the candidates along N (stored ones: in
    their product dtype, or int8 as stored with ``int8_as_stored``, with int8 scales [n], else
    None: ``StoredCandidates.chunks``) to its [B, n] scores; ``bytes_per_candidate`` is what
    it allocates per candidate, which sets the chunk size to ``budget // bytes_per_candidate``
    unless ``chunk_size`` is given.
    """
    n = num_candidates(candidates)
    if chunk_size is None:
        chunk_size = max(1, budget // max(1, bytes_per_candidate))
    out = None
    for start, rows, scales in candidate_chunks(candidates, chunk_size, int8_as_stored):
        scores = score_chunk(rows, scales)  # [B, n]
        if n <= chunk_size:
            return scores
        if out is None:
            out = scores.new_empty(scores.size(0), n)
        out[:, start : start + chunk_size] = scores
    return out


class DualEncoderModule(nn.Module):
    """What bi- and poly-encoders share: a context encoder, a candidate encoder (or the same
    one), pooled candidates, and a training forward. Subclasses define encode_context, score
    and score_encoded(context, candidates)."""

    def __init__(
        self,
        context_encoder: TextEncoder,
        candidate_encoder: Optional[TextEncoder],
        reduction: str,
        first_m: int,
        similarity: str = "dot",
        similarity_scale: float = 20.0,
    ):
        super().__init__()
        self.context_encoder = context_encoder
        self.candidate_encoder = candidate_encoder  # None: shared with the context
        self.pooling = Pooling(reduction, first_m)
        self.similarity = similarity
        self.similarity_scale = similarity_scale
        self.score_chunk_bytes: Optional[int] = None  # None: chunk_budget's default for the device
        # inference scoring through torch.compile's fused passes (stored.CompiledOrEager):
        # None from FUSED_MIN_CANDIDATES candidates, True always, False never (the eager path,
        # which training runs and the tests compare the fused one to)
        self.score_fused: Optional[bool] = None

    def fusing(self, num: int) -> bool:
        """Whether scoring ``num`` candidates now takes the compiled fused passes: no
        gradient is needed, and ``score_fused`` asks for it (None: from FUSED_MIN_CANDIDATES)."""
        if torch.is_grad_enabled() or self.score_fused is False:
            return False
        return self.score_fused is True or num >= FUSED_MIN_CANDIDATES

    def forward(self, context_ids: torch.Tensor, candidate_ids: torch.Tensor, gather_negatives: bool = False):
        """Training scores [B, N]: contexts [B, T] against candidates [N, L] shared by the batch
        (with ``gather_negatives``, joined by every other worker's) or [B, C, L] per example.

        One call does it all, so DistributedDataParallel sees one forward per step."""
        cands = self.encode_candidates(candidate_ids.reshape(-1, candidate_ids.size(-1)))
        cands = cands.view(*candidate_ids.shape[:-1], -1)
        if gather_negatives:
            cands = distributed.gather_negatives(cands)
        return self.score_encoded(self.encode_context(context_ids), cands)

    def to_similarity_space(self, vectors: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """vectors [..., d] as they are scored: dot similarity, unchanged; cosine, each made a
        unit vector times ``scale`` (the context side's: ``similarity_scale``), in float32."""
        if self.similarity == "dot":
            return vectors
        return nn.functional.normalize(vectors.float(), dim=-1) * scale

    def encode_candidates(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, L] -> [N, d], as scored (``to_similarity_space``)"""
        return self.to_similarity_space(self.pool_candidates(ids))

    def pool_candidates(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, L] -> [N, d], the candidate encoder's pooled outputs"""
        encoder = self.candidate_encoder if self.candidate_encoder is not None else self.context_encoder
        return self.pooling(*encoder(ids))


@dataclass
class BiEncoderConfig(DualEncoderConfig):
    """A bi-encoder: how its vectors are pooled and compared, whether candidates have their
    own encoder (``share_encoders`` false: a copy of the context's) and ParlAI's candidate MLP."""

    kind: ClassVar[str] = "bi"
    candidate_mlp: bool = False


class BiEncoderModule(DualEncoderModule):
    @classmethod
    def from_config(cls, config: BiEncoderConfig, context_encoder: TextEncoder, candidate_encoder=None):
        return cls(
            context_encoder,
            candidate_encoder,
            config.reduction_type,
            config.reduction_first_m,
            config.candidate_mlp,
            config.similarity,
            config.similarity_scale,
        )

    def __init__(
        self,
        context_encoder: TextEncoder,
        candidate_encoder: Optional[TextEncoder] = None,
        reduction: str = "mean",
        first_m: int = 16,
        candidate_mlp: bool = False,
        similarity: str = "dot",
        similarity_scale: float = 20.0,
    ):
        super().__init__(context_encoder, candidate_encoder, reduction, first_m, similarity, similarity_scale)
        dim = context_encoder.dim
        # ParlAI's TransformerResponseWrapper: its ReLU is fixed whatever --activation says
        mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) if candidate_mlp else None
        self.candidate_mlp = mlp

    def pool_candidates(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, L] -> [N, d], pooled (and through the candidate MLP where there is one)"""
        cands = super().pool_candidates(ids)
        return cands if self.candidate_mlp is None else self.candidate_mlp(cands)

    def score_encoded(self, context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.score(context, candidates)

    def encode_context(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, d], as scored (``to_similarity_space``)"""
        return self.to_similarity_space(self.pooling(*self.context_encoder(ids)), self.similarity_scale)

    def score(self, context: torch.Tensor, candidates: Candidates, chunk_size: Optional[int] = None) -> torch.Tensor:
        """context [B, d]; candidates [N, d] shared by the batch, [B, N, d], or stored -> scores [B, N]

        One GEMM per chunk of candidates; a chunk's only temporary is its [B, n] scores.
        Shared candidates (any store dtype), at most FUSED_DOT_MAX_CONTEXTS contexts and no
        ``chunk_size`` asked for, when ``fusing``: one fused pass over them instead, whose only
        output is the scores (float32 too: torch's matrix-vector product read float32
        candidates at about a third of the rate here, 500k candidates, 1 thread).
        """
        stored = isinstance(candidates, StoredCandidates)
        shared = stored or candidates.dim() == 2
        if shared and chunk_size is None and context.size(0) <= FUSED_DOT_MAX_CONTEXTS:
            if self.fusing(num_candidates(candidates)):
                values, scales = (candidates.values, candidates.scales) if stored else (candidates, None)
                scores = fused_dot.compiled_or_none(values, scales, context.float())
                if scores is not None:  # else chunks: eager, dot_scores would take [N, B, d]
                    return scores

        budget = chunk_budget(self.score_chunk_bytes, context)
        if takes_int8_products(candidates, context):
            chunk_scores = functools.partial(int8_chunk_scores, *quantize_contexts_int8(context.unsqueeze(1)))
            per_candidate = context.size(0) * 8  # int32 similarities, then float32 scores
            return score_in_chunks(chunk_scores, candidates, per_candidate, chunk_size, budget, int8_as_stored=True)

        def chunk_scores(cands, scales):
            ctx = context.to(cands.dtype)  # bfloat16 candidates: a bfloat16 product
            if cands.dim() == 2:
                scores = (ctx @ cands.t()).float()  # [B, n]
            else:
                scores = torch.bmm(cands, ctx.unsqueeze(-1)).squeeze(-1).float()
            return scores if scales is None else scores * scales  # int8: each candidate's scale

        per_candidate = context.size(0) * context.element_size()
        return score_in_chunks(chunk_scores, candidates, per_candidate, chunk_size, budget)


def int8_chunk_scores(context_q, context_scales, cands, scales):
    """Scores [B, n] of int8 candidates as stored [n, d] with their scales [n], against
    contexts quantized by ``quantize_contexts_int8`` (context_q [d, B], context_scales [B]):
    one int8 product, then each score times its candidate's and its context's scale."""
    sims = int8_product(cands, context_q).float()  # [n, B]
    return (sims * scales.unsqueeze(1) * context_scales).t()
