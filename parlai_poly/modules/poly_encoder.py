"""Poly-encoder: m global context codes, attended by each cached candidate.

Context: m codes c_1..c_m attend over the context's outputs h_1..h_T,
    y^i_ctxt = sum_j softmax_j(c_i . h_j) h_j                 (--polyencoder-type codes)
or y^i_ctxt = h_i for the first m outputs                      (--polyencoder-type n_first).
Candidate: y_cand = red(T2(cand)), cacheable as in the bi-encoder.
Score: the candidate attends over the m context vectors,
    w = softmax_i(y_cand . y^i_ctxt),  score = (sum_i w_i y^i_ctxt) . y_cand.
With ``similarity`` cosine, y_cand is made a unit vector and each y^i_ctxt s times one, so
y_cand . y^i_ctxt = s cos_i: the attention's logits and the score are scaled cosines
(score = s sum_i w_i cos_i), and everything below scores them unchanged.

For basic and sqrt attention, score = sum_i w_i s_i with s_i = y^i_ctxt . y_cand: with
S = Y_ctxt [m, d] x Y_cand^T [d, N], scoring N candidates is one matrix product, a softmax
per column and a weighted column sum; nothing of size B x N x d is ever built.

Multihead attention (H heads of size e = d/H, projections W_q, W_k, W_v, W_o) folds the same
way. With k_h, v_h the context's key and value projections for head h, W_q,h the rows of
W_q for head h and W_o,h the columns of W_o for head h:
    logit_h,i = (y_cand W_q,h^T + b_q,h) . k_h,i / sqrt(e) = y_cand . K_h,i + c_h,i,
        K_h,i = k_h,i W_q,h / sqrt(e),  c_h,i = b_q,h . k_h,i / sqrt(e)
    score = sum_h sum_i softmax_i(logit_h)_i (V_h,i . y_cand) + b_o . y_cand,
        V_h,i = v_h,i W_o,h^T
so K and V ([B, H*m, d], computed once per context) times Y_cand^T give every logit and
every term: two matrix products, again without any B x N x d tensor.

Candidates are scored in chunks (``score_in_chunks``): the temporaries of one chunk stay
under ``score_chunk_bytes`` (by default 4 MB on CPU, where they then stay in cache, and 64 MB
elsewhere; see ``bi_encoder.chunk_budget``) for any number of candidates N.

Precision: the products take the candidates' dtype. Candidates kept in bfloat16 (the poly
agent's --score-dtype bfloat16) make the matrix products bfloat16 (about 2.5x faster than
float32 on a CPU with AVX512-BF16, half the memory); the similarities are then turned to
float32 before the softmax and the weighted sum. torch has no CPU product of bfloat16
inputs with a float32 output, so each similarity is rounded to bfloat16 (8 significant
bits): a score moves by up to about 1% of the context's largest score (measured at most
0.2%), which the agent repairs where it matters by scoring its top candidates again in
float32 (``stored.rescore_top``). Stored int8 candidates (a candidate store's
--candidate-store-dtype int8) are multiplied as int8 on CPU with basic or sqrt attention: the
m context vectors rounded to int8 with one scale per context, one exact int8 product per
chunk, each similarity then times its candidate's and its context's float32 scale as the
softmax reads it (``_score_int8``). Otherwise they are read a chunk at a time as bfloat16
(exactly: |q| <= 127), multiplied in bfloat16, and each candidate's similarities then times
its float32 scale (``row_scales``): scaling [n, m] similarities costs a sixth of scaling
[n, d] rows at d = 384.

Fused pass (inference, no gradient). The eager softmax reads and writes the [n, B, m]
similarities of a chunk several times (scale, mask, max, exp, normalise, multiply, sum),
each a pass of its own. Written as an exp-sum,
    score = sum_i e_i s_i / sum_i e_i,   e_i = exp(a s_i - max_j a s_j),
the weights are never stored, and torch.compile turns it into one pass that reads each
chunk's similarities once, converting them to float32 as it reads (``attention_sum``;
multihead: the same per head, summed). Each chunk is then one matrix product and that pass;
the benchmark sweeps the chunk size (``python -m benchmarks.scoring_speed``).
"""
import functools
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch
from torch import nn

from .attention import ATTENTION_TYPES, Attention
from .config import DualEncoderConfig
from .bi_encoder import DualEncoderModule, chunk_budget, score_in_chunks
from .encoder import TextEncoder
from .stored import (
    Candidates, CompiledOrEager, StoredCandidates, int8_product, num_candidates, quantize_contexts_int8, takes_int8_products,
)

POLY_TYPES = ("codes", "n_first")
# How the codes start (--codes-init), and the scale each uses unless --codes-init-scale says:
# normal: N(0, scale^2) entries; uniform: U[0, scale) entries (ParlAI's start, scale 1);
# orthogonal: orthonormal rows (as many as the hidden size allows) times scale
CODES_INITS = ("normal", "uniform", "orthogonal")
DEFAULT_CODES_SCALE = {"normal": 0.02, "uniform": 1.0, "orthogonal": 1.0}


def init_codes(n_codes: int, dim: int, kind: str = "normal", scale: Optional[float] = None) -> torch.Tensor:
    """[m, d] starting codes. Small normal codes attend uniformly at first (every context
    vector is then the mean of the context's outputs, every code gets the same gradient);
    uniform and orthogonal codes start distinct, at a scale that sets how peaked."""
    if kind not in CODES_INITS:
        raise ValueError(f"--codes-init {kind}: choose one of {CODES_INITS}")
    scale = DEFAULT_CODES_SCALE[kind] if scale is None else scale
    codes = torch.empty(n_codes, dim)
    if kind == "normal":
        nn.init.normal_(codes, std=scale)
    elif kind == "uniform":
        nn.init.uniform_(codes, 0.0, scale)
    else:
        nn.init.orthogonal_(codes)
        codes.mul_(scale)
    return codes


def mean_pairwise_cosine(vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """vectors [B, m, d], mask [B, m] -> [B]: the mean cosine of each example's distinct
    pairs of real context vectors (1: all equal, as in a bi-encoder; 0: orthogonal)."""
    unit = nn.functional.normalize(vectors.float(), dim=-1) * mask.unsqueeze(-1)
    cosines = torch.bmm(unit, unit.transpose(1, 2))  # [B, m, m]
    n = mask.sum(1).float()
    pairs = (n * (n - 1)).clamp(min=1)
    off_diagonal = cosines.sum((1, 2)) - cosines.diagonal(dim1=1, dim2=2).sum(1)
    return off_diagonal / pairs


def attention_entropy(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """weights [B, Q, T] over memory with mask [B, T] -> [B]: each query's entropy over
    the real positions divided by that of uniform attention, averaged over queries
    (1: uniform, every code reads the mean; near 0: each code reads one position)."""
    weights = weights.float()
    entropy = -(weights * torch.log(weights.clamp(min=1e-12))).sum(-1)  # [B, Q]
    uniform = torch.log(mask.sum(1).float().clamp(min=2)).unsqueeze(1)  # [B, 1]
    return (entropy / uniform).mean(1)


# ---- the softmax and weighted sum over the m context vectors -------------------------------
FLOAT_BYTES = 4  # the eager softmax and sums run in float32 whatever the product's dtype


def softmax_weighted_sum(sims: torch.Tensor, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Eager: sims [..., m] float32, mask broadcastable to it or None -> sum_i softmax_i(scale s)_i s_i [...]

    Differentiable (training), and the reference the fused pass is tested against.
    """
    logits = sims * scale if scale != 1.0 else sims
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    # in place when no gradient needs the softmax's output: one [..., m] tensor fewer
    weighted = weights * sims if weights.requires_grad else weights.mul_(sims)
    return weighted.sum(-1)


def attention_sum(
    logits: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    row_scales: Optional[torch.Tensor],
) -> torch.Tensor:
    """sum_i softmax_i(scale * r * logits + bias)_i r * values_i over the last dim, as an exp-sum.

    logits, values [..., m] in any float dtype (the products' bfloat16 is read as is and
    widened in registers); bias (float32), mask (bool, True = attend) and row_scales r
    (float32: int8 candidates' scales; None is 1) broadcastable to them, or None -> [...]
    float32. Basic/sqrt attention passes the similarities as both logits and values. The
    unnormalised weights e are never stored once compiled (``fused_attention_sum``): one
    pass over the inputs.
    """
    logits32, values32 = logits.float(), values.float()
    if row_scales is not None:
        logits32, values32 = logits32 * row_scales, values32 * row_scales
    logits32 = logits32 * scale
    if bias is not None:
        logits32 = logits32 + bias
    if mask is not None:
        logits32 = logits32.masked_fill(~mask, float("-inf"))
    e = torch.exp(logits32 - logits32.amax(-1, keepdim=True))  # [..., m]
    return (e * values32).sum(-1) / e.sum(-1)


fused_attention_sum = CompiledOrEager(attention_sum)


def _product_bytes(candidates: Candidates) -> int:
    """Bytes per similarity: the products come out in the candidates' (product) dtype."""
    dtype = candidates.product_dtype if isinstance(candidates, StoredCandidates) else candidates.dtype
    return torch.empty((), dtype=dtype).element_size()


def _row_bytes(candidates: Candidates, dim: int) -> int:
    """Bytes per candidate of the chunk that ``StoredCandidates.rows`` copies (int8: a
    bfloat16 row); other candidates are sliced, not copied."""
    if isinstance(candidates, StoredCandidates) and candidates.scales is not None:
        return dim * 2
    return 0


def _row_scales(scales: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    """int8 candidates' scales [n] viewed to broadcast over ``shape`` (None stays None)."""
    return None if scales is None else scales.view(shape)


def _stacked_terms(terms):
    """The folded multihead terms for the fused pass: K and V stacked [2 * B*H*m, d] (one
    matrix product gives logits and values), key bias [B, H, m] or None, b_o [d] or None."""
    key_proj, key_bias, value_proj, out_bias = terms
    bsz, heads, m, dim = key_proj.shape
    stacked = torch.cat([key_proj.reshape(-1, dim), value_proj.reshape(-1, dim)])  # [2*B*H*m, d]
    return stacked, key_bias, out_bias, (bsz, heads, m)


def _score_multihead_fused(stacked_terms, context_mask, masked, cands, scales=None):
    """Multihead scores [B, n] of one chunk: one product for logits and values, candidate-major
    ([n, B, H, m], or [B, n, H, m] per example), then the fused pass over m and a sum over H.
    ``scales`` [n]: int8 candidates' (shared candidates only)."""
    stacked, key_bias, out_bias, (bsz, heads, m) = stacked_terms
    stacked = stacked.to(cands.dtype)
    if cands.dim() == 2:
        both = torch.matmul(cands, stacked.t()).view(-1, 2, bsz, heads, m)  # [n, 2, B, H, m]
        bias_shape, mask_shape = (1, bsz, heads, m), (1, bsz, 1, m)
    else:
        flat = stacked.view(2, bsz, heads * m, -1).transpose(0, 1).reshape(bsz, 2 * heads * m, -1)
        both = torch.bmm(cands, flat.transpose(1, 2)).view(bsz, -1, 2, heads, m)  # [B, n, 2, H, m]
        bias_shape, mask_shape = (bsz, 1, heads, m), (bsz, 1, 1, m)
    axis = 1 if cands.dim() == 2 else 2  # the logits / values axis of ``both``
    logits, values = both.select(axis, 0), both.select(axis, 1)  # [n, B, H, m] or [B, n, H, m]
    bias = None if key_bias is None else key_bias.view(bias_shape)
    mask = context_mask.view(mask_shape) if masked else None
    row_scales = _row_scales(scales, (-1, 1, 1, 1))
    scores = fused_attention_sum(logits, values, 1.0, bias, mask, row_scales).sum(-1)  # [n, B] or [B, n]
    if out_bias is not None:
        term = (cands @ out_bias.to(cands.dtype)).float()  # [n] or [B, n]
        term = term if scales is None else term * scales
        scores = scores + (term.unsqueeze(-1) if cands.dim() == 2 else term)
    return scores.t().contiguous() if cands.dim() == 2 else scores


@dataclass
class PolyEncoderConfig(DualEncoderConfig):
    """A poly-encoder: ParlAI's transformer/polyencoder options, plus how the codes start
    and how vectors are compared (``similarity``)."""

    kind: ClassVar[str] = "poly"
    polyencoder_type: str = "codes"
    poly_n_codes: int = 64
    codes_attention_type: str = "basic"
    codes_attention_num_heads: int = 4
    poly_attention_type: str = "basic"
    poly_attention_num_heads: int = 4
    codes_init: str = "normal"
    codes_init_scale: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        if self.poly_n_codes < 1:
            raise ValueError(
                f"--poly-n-codes {self.poly_n_codes}: the poly-encoder needs at least 1 code "
                "(the paper uses 16, 64 or 360)."
            )
        if self.polyencoder_type not in POLY_TYPES:
            raise ValueError(f"--polyencoder-type {self.polyencoder_type}: choose one of {POLY_TYPES}")
        for name in ("codes_attention_type", "poly_attention_type"):
            if getattr(self, name) not in ATTENTION_TYPES:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: choose one of {ATTENTION_TYPES}")
        if self.codes_init not in CODES_INITS:
            raise ValueError(f"--codes-init {self.codes_init}: choose one of {CODES_INITS}")
        if self.codes_init_scale is not None and self.codes_init_scale <= 0:
            raise ValueError(f"--codes-init-scale {self.codes_init_scale}: give a positive scale.")


class PolyEncoderModule(DualEncoderModule):
    def __init__(
        self,
        context_encoder: TextEncoder,
        candidate_encoder: Optional[TextEncoder] = None,
        poly_type: str = "codes",
        n_codes: int = 64,
        codes_attention: str = "basic",
        codes_heads: int = 4,
        poly_attention: str = "basic",
        poly_heads: int = 4,
        reduction: str = "mean",
        first_m: int = 16,
        codes_init: str = "normal",
        codes_init_scale: Optional[float] = None,
        similarity: str = "dot",
        similarity_scale: float = 20.0,
    ):
        super().__init__(context_encoder, candidate_encoder, reduction, first_m, similarity, similarity_scale)
        if n_codes < 1:
            raise ValueError(f"--poly-n-codes {n_codes}: the poly-encoder needs at least 1 code")
        if poly_type not in POLY_TYPES:
            raise ValueError(f"--polyencoder-type {poly_type}: choose one of {POLY_TYPES}")
        dim = context_encoder.dim
        self.poly_type = poly_type
        self.n_codes = n_codes
        if poly_type == "codes":
            self.codes = nn.Parameter(init_codes(n_codes, dim, codes_init, codes_init_scale))
            self.codes_attention = Attention(codes_attention, dim, codes_heads)
        self.poly_attention = Attention(poly_attention, dim, poly_heads)
        # per example [B] of the last encode_context: is the poly-encoder still a bi-encoder?
        self.last_codes_stats: Dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: PolyEncoderConfig, context_encoder, candidate_encoder=None) -> "PolyEncoderModule":
        return cls(
            context_encoder,
            candidate_encoder,
            poly_type=config.polyencoder_type,
            n_codes=config.poly_n_codes,
            codes_attention=config.codes_attention_type,
            codes_heads=config.codes_attention_num_heads,
            poly_attention=config.poly_attention_type,
            poly_heads=config.poly_attention_num_heads,
            reduction=config.reduction_type,
            first_m=config.reduction_first_m,
            codes_init=config.codes_init,
            codes_init_scale=config.codes_init_scale,
            similarity=config.similarity,
            similarity_scale=config.similarity_scale,
        )

    def poly_parameters(self):
        """The poly-encoder's own parameters (codes, both attentions), not the backbone's."""
        own = [self.poly_attention] + ([self.codes_attention] if self.poly_type == "codes" else [])
        return ([self.codes] if self.poly_type == "codes" else []) + [p for m in own for p in m.parameters()]

    def score_encoded(self, context: Tuple[torch.Tensor, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        return self.score(*context, candidates)

    def encode_context(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] -> context vectors [B, m, d], as scored (``to_similarity_space``), and
        their mask [B, m]"""
        hidden, mask = self.context_encoder(ids)  # [B, T, d], [B, T]
        bsz = hidden.size(0)
        if self.poly_type == "codes":
            codes = self.codes.unsqueeze(0).expand(bsz, -1, -1)  # [B, m, d]
            vectors, weights = self.codes_attention(codes, hidden, mask, return_weights=True)  # [B, m, d], [B, m, T]
            vmask = mask.new_ones(bsz, self.n_codes)
            self._track_codes(vectors, vmask, weights, mask)
        else:
            vectors, vmask = hidden[:, : self.n_codes], mask[:, : self.n_codes]
            missing = self.n_codes - vectors.size(1)
            if missing > 0:  # context shorter than m: pad with masked zero vectors
                vectors = nn.functional.pad(vectors, (0, 0, 0, missing))
                vmask = nn.functional.pad(vmask, (0, missing), value=False)
            self._track_codes(vectors, vmask)
        return self.to_similarity_space(vectors, self.similarity_scale), vmask

    @torch.no_grad()
    def _track_codes(self, vectors, vmask, weights=None, mask=None):
        """last_codes_stats: the context vectors' mean pairwise cosine and (codes) the codes'
        attention entropy relative to uniform, per example; a few [B, m, m] products."""
        self.last_codes_stats = {"codes_cos": mean_pairwise_cosine(vectors, vmask)}
        if weights is not None:
            self.last_codes_stats["codes_entropy"] = attention_entropy(weights, mask)

    def score(
        self,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        candidates: Candidates,
        chunk_size: Optional[int] = None,
    ) -> torch.Tensor:
        """context [B, m, d], context_mask [B, m]; candidates [N, d], [B, N, d] or stored -> [B, N]

        In chunks of ``chunk_size`` candidates (default: as many as fit ``score_chunk_bytes``).
        The products run in the candidates' dtype (float32, or bfloat16: see the module's
        docstring; int8 stored candidates are read as bfloat16 a chunk at a time, their
        products then scaled); the scores are float32 either way. Without a gradient and from FUSED_MIN_CANDIDATES
        candidates (``fusing``), the softmax and the weighted sum are one compiled pass over
        each chunk's similarities (``attention_sum``).
        """
        score_chunk, per_candidate = self._chunk_plan(context, context_mask, candidates)
        budget = chunk_budget(self.score_chunk_bytes, context)
        int8 = self._takes_int8_products(context, candidates)
        return score_in_chunks(score_chunk, candidates, per_candidate, chunk_size, budget, int8)

    def default_chunk_size(self, context: torch.Tensor, context_mask: torch.Tensor, candidates: Candidates) -> int:
        """The candidates per chunk ``score`` takes when given no ``chunk_size``: as many as
        fit ``score_chunk_bytes`` (the benchmark's chunk sweep sets it beside others)."""
        per_candidate = self._chunk_plan(context, context_mask, candidates)[1]
        return max(1, chunk_budget(self.score_chunk_bytes, context) // max(1, per_candidate))

    def _chunk_plan(self, context, context_mask, candidates):
        """(score_chunk: a chunk of candidates [n, d] or [B, n, d] and their int8 scales [n]
        or None -> [B, n] scores, bytes its temporaries take per candidate) for this
        attention, fused or eager."""
        bsz, m = context_mask.shape
        masked = not bool(context_mask.all())
        fused = self.fusing(num_candidates(candidates)) and fused_attention_sum.enabled  # chunks sized for it
        if self._takes_int8_products(context, candidates):
            context_q, context_scales = quantize_contexts_int8(context)  # [d, B*m], [B]
            per_candidate = bsz * m * (4 if fused else 4 + 4 * FLOAT_BYTES)  # int32 similarities (+ eager's)
            return functools.partial(self._score_int8, context_q, context_scales, context_mask, masked, fused), per_candidate
        row_bytes = _row_bytes(candidates, context.size(-1))
        product = _product_bytes(candidates)
        if self.poly_attention.kind == "multihead":
            if not _foldable(self.poly_attention.mha):
                per_candidate = 4 * bsz * context.size(-1) * FLOAT_BYTES + row_bytes
                return functools.partial(self._score_attended, context, context_mask), per_candidate
            terms = self._multihead_terms(context)
            heads = terms[0].size(1)
            if fused:
                stacked = _stacked_terms(terms)
                per_candidate = 2 * bsz * heads * m * product + row_bytes
                return functools.partial(_score_multihead_fused, stacked, context_mask, masked), per_candidate
            per_candidate = 5 * bsz * heads * m * FLOAT_BYTES + row_bytes
            return functools.partial(self._score_multihead, terms, context_mask, masked), per_candidate
        # fused: the similarities are the only temporary; eager: 4 float32 tensors of them
        per_candidate = (bsz * m * product if fused else 4 * bsz * m * FLOAT_BYTES) + row_bytes
        return functools.partial(self._score_basic, context, context_mask, masked, fused=fused), per_candidate

    def _score_basic(self, context, context_mask, masked, cands, scales=None, fused=False):
        """basic/sqrt: one GEMM, a softmax over the m context vectors, a weighted sum.

        The similarities come out candidate-major ([n, B, m] or [B, n, m]), so the softmax
        and the sum run along contiguous rows of m, and the GEMM reads the candidates row by
        row: with the usual [B, m, n] the same scoring took about 1.5x longer (poly-64, 100k
        candidates, 1 thread). ``scales`` [n]: int8 candidates' (shared candidates only);
        ``fused``: softmax and sum in one compiled pass.
        """
        bsz, m, dim = context.shape
        if cands.dim() == 2:  # shared by the batch: one GEMM for every context vector
            flat = context.reshape(bsz * m, dim).to(cands.dtype)
            sims = torch.matmul(cands, flat.t()).view(-1, bsz, m)  # [n, B, m]
            mask = context_mask.view(1, bsz, m)
        else:
            sims = torch.bmm(cands, context.transpose(1, 2).to(cands.dtype))  # [B, n, m]
            mask = context_mask.view(bsz, 1, m)
        mask = mask if masked else None
        scale = self.poly_attention.scale
        row_scales = _row_scales(scales, (-1, 1, 1))
        if fused:
            scores = fused_attention_sum(sims, sims, scale, None, mask, row_scales)
        else:
            sims = sims.float() if row_scales is None else sims.float() * row_scales
            scores = softmax_weighted_sum(sims, mask, scale)
        return scores.t().contiguous() if cands.dim() == 2 else scores  # no copy when B = 1

    def _takes_int8_products(self, context, candidates) -> bool:
        """Stored int8 candidates multiplied as int8 (``stored.int8_product``): basic and sqrt
        attention, whose logits and values are the same similarities (multihead's two
        products would need a scale each)."""
        return self.poly_attention.kind != "multihead" and takes_int8_products(candidates, context)

    def _score_int8(self, context_q, context_scales, context_mask, masked, fused, cands, scales):
        """basic/sqrt over int8 candidates as stored [n, d] with their scales [n]: one int8
        product with the m context vectors quantized per context (context_q [d, B*m],
        context_scales [B]), each similarity then times its candidate's and its context's
        scale as the softmax reads it."""
        bsz, m = context_mask.shape
        sims = int8_product(cands, context_q).view(-1, bsz, m)  # [n, B, m] int32
        row_scales = (scales.unsqueeze(1) * context_scales).view(-1, bsz, 1)  # [n, B, 1]
        mask = context_mask.view(1, bsz, m) if masked else None
        scale = self.poly_attention.scale
        if fused:
            scores = fused_attention_sum(sims, sims, scale, None, mask, row_scales)
        else:
            scores = softmax_weighted_sum(sims.float() * row_scales, mask, scale)
        return scores.t().contiguous()  # [B, n]

    def _multihead_terms(self, context):
        """K [B, H, m, d], c [B, H, m] or None, V [B, H, m, d], b_o [d] or None (see above)."""
        mha = self.poly_attention.mha
        bsz, m, dim = context.shape
        heads = mha.num_heads
        head_dim = dim // heads
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3, dim=0)
        b_q = b_k = b_v = None
        if mha.in_proj_bias is not None:
            b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        scale = head_dim**-0.5
        keys = nn.functional.linear(context, w_k, b_k).view(bsz, m, heads, head_dim)
        values = nn.functional.linear(context, w_v, b_v).view(bsz, m, heads, head_dim)
        key_proj = torch.einsum("bmhe,hed->bhmd", keys, w_q.reshape(heads, head_dim, dim)) * scale
        key_bias = None
        if b_q is not None:
            key_bias = torch.einsum("bmhe,he->bhm", keys, b_q.reshape(heads, head_dim)) * scale
        out_weight = mha.out_proj.weight.reshape(dim, heads, head_dim)
        value_proj = torch.einsum("bmhe,dhe->bhmd", values, out_weight)
        return key_proj, key_bias, value_proj, mha.out_proj.bias

    @staticmethod
    def _score_multihead(terms, context_mask, masked, cands, scales=None):
        """Multihead scores [B, n] of one chunk, eager (context-major [B, H, m, n]);
        ``scales`` [n]: int8 candidates' (shared candidates only)."""
        key_proj, key_bias, value_proj, out_bias = terms
        bsz, heads, m, dim = key_proj.shape
        cands_t = cands.t() if cands.dim() == 2 else cands.transpose(1, 2)  # [d, n] or [B, d, n]
        key_proj, value_proj = key_proj.to(cands.dtype), value_proj.to(cands.dtype)
        scale_n = 1.0 if scales is None else scales  # [n]: along the last dim
        logits = torch.matmul(key_proj.reshape(bsz, heads * m, dim), cands_t).float().view(bsz, heads, m, -1) * scale_n
        if key_bias is not None:
            logits = logits + key_bias.unsqueeze(-1)
        if masked:
            logits = logits.masked_fill(~context_mask.view(bsz, 1, m, 1), float("-inf"))
        weights = torch.softmax(logits, dim=2)  # over the m context vectors, per head
        values = torch.matmul(value_proj.reshape(bsz, heads * m, dim), cands_t).float().view(bsz, heads, m, -1) * scale_n
        scores = (weights * values).sum((1, 2))  # [B, n]
        if out_bias is not None:
            scores = scores + (cands @ out_bias.to(cands.dtype)).float() * scale_n  # [n] or [B, n]
        return scores

    def _score_attended(self, context, context_mask, cands, scales=None):
        """Any other multihead layout: torch's attention on one chunk at a time."""
        cands = cands.to(context.dtype)  # torch's attention wants one dtype
        if scales is not None:
            cands = cands * scales.unsqueeze(-1)
        if cands.dim() == 2:
            cands = cands.unsqueeze(0).expand(context.size(0), -1, -1)
        attended = self.poly_attention(cands, context, context_mask)  # [B, n, d]
        return (attended * cands).sum(-1)


def _foldable(mha: nn.MultiheadAttention) -> bool:
    """Plain packed projections, no extra key/value biases: the folded form applies."""
    return (
        mha._qkv_same_embed_dim
        and mha.bias_k is None
        and mha.bias_v is None
        and not mha.add_zero_attn
        and mha.in_proj_weight is not None
    )
