"""Poly-encoder: m global context codes, attended by each cached candidate.

Context: m codes c_1..c_m attend over the context's outputs h_1..h_T,
    y^i_ctxt = sum_j softmax_j(c_i . h_j) h_j                 (--polyencoder-type codes)
or y^i_ctxt = h_i for the first m outputs                      (--polyencoder-type n_first).
Candidate: y_cand = red(T2(cand)), cacheable as in the bi-encoder.
Score: the candidate attends over the m context vectors,
    w = softmax_i(y_cand . y^i_ctxt),  score = (sum_i w_i y^i_ctxt) . y_cand.

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
float32 (``rescore_top``).
"""
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional, Tuple

import torch
from torch import nn

from .attention import ATTENTION_TYPES, Attention
from .config import ModelConfig
from .bi_encoder import DualEncoderModule, chunk_budget, score_in_chunks
from .encoder import TextEncoder

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


@dataclass
class PolyEncoderConfig(ModelConfig):
    """A poly-encoder: ParlAI's transformer/polyencoder options, plus how the codes start."""

    kind: ClassVar[str] = "poly"
    reduction_first_m: int = 16
    share_encoders: bool = True
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
    ):
        super().__init__(context_encoder, candidate_encoder, reduction, first_m)
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
        )

    def poly_parameters(self):
        """The poly-encoder's own parameters (codes, both attentions), not the backbone's."""
        own = [self.poly_attention] + ([self.codes_attention] if self.poly_type == "codes" else [])
        return ([self.codes] if self.poly_type == "codes" else []) + [p for m in own for p in m.parameters()]

    def score_encoded(self, context: Tuple[torch.Tensor, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        return self.score(*context, candidates)

    def encode_context(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] -> context vectors [B, m, d] and their mask [B, m]"""
        hidden, mask = self.context_encoder(ids)  # [B, T, d], [B, T]
        bsz = hidden.size(0)
        if self.poly_type == "codes":
            codes = self.codes.unsqueeze(0).expand(bsz, -1, -1)  # [B, m, d]
            vectors, weights = self.codes_attention(codes, hidden, mask, return_weights=True)  # [B, m, d], [B, m, T]
            vmask = mask.new_ones(bsz, self.n_codes)
            self._track_codes(vectors, vmask, weights, mask)
            return vectors, vmask
        vectors, vmask = hidden[:, : self.n_codes], mask[:, : self.n_codes]
        missing = self.n_codes - vectors.size(1)
        if missing > 0:  # context shorter than m: pad with masked zero vectors
            vectors = nn.functional.pad(vectors, (0, 0, 0, missing))
            vmask = nn.functional.pad(vmask, (0, missing), value=False)
        self._track_codes(vectors, vmask)
        return vectors, vmask

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
        candidates: torch.Tensor,
        chunk_size: Optional[int] = None,
    ) -> torch.Tensor:
        """context [B, m, d], context_mask [B, m]; candidates [N, d] or [B, N, d] -> [B, N]

        In chunks of ``chunk_size`` candidates (default: as many as fit ``score_chunk_bytes``).
        The products run in the candidates' dtype (float32, or bfloat16: see the module's
        docstring); the scores are float32 either way.
        """
        bsz, m = context_mask.shape
        masked = not bool(context_mask.all())
        budget = chunk_budget(self.score_chunk_bytes, candidates)
        floats = 4  # softmax and sums run in float32 whatever the product's dtype
        if self.poly_attention.kind == "multihead":
            if _foldable(self.poly_attention.mha):
                terms = self._multihead_terms(context)
                heads = terms[0].size(1)
                per_candidate = 5 * bsz * heads * m * floats
                return score_in_chunks(
                    lambda cands: self._score_multihead(terms, context_mask, masked, cands),
                    candidates,
                    per_candidate,
                    chunk_size,
                    budget,
                )
            per_candidate = 4 * bsz * context.size(-1) * floats
            return score_in_chunks(
                lambda cands: self._score_attended(context, context_mask, cands),
                candidates,
                per_candidate,
                chunk_size,
                budget,
            )
        per_candidate = 4 * bsz * m * floats
        return score_in_chunks(
            lambda cands: self._score_basic(context, context_mask, masked, cands),
            candidates,
            per_candidate,
            chunk_size,
            budget,
        )

    def _score_basic(self, context, context_mask, masked, cands):
        """basic/sqrt: one GEMM, a softmax over the m context vectors, a weighted sum.

        The similarities come out candidate-major ([n, B, m] or [B, n, m]), so the softmax
        and the sum run along contiguous rows of m, and the GEMM reads the candidates row by
        row: with the usual [B, m, n] the same scoring took about 1.5x longer (poly-64, 100k
        candidates, 1 thread).
        """
        bsz, m, dim = context.shape
        if cands.dim() == 2:  # shared by the batch: one GEMM for every context vector
            flat = context.reshape(bsz * m, dim).to(cands.dtype)
            sims = torch.matmul(cands, flat.t()).float().view(-1, bsz, m)  # [n, B, m]
            mask = context_mask.view(1, bsz, m)
        else:
            sims = torch.bmm(cands, context.transpose(1, 2).to(cands.dtype)).float()  # [B, n, m]
            mask = context_mask.view(bsz, 1, m)
        logits = sims * self.poly_attention.scale if self.poly_attention.scale != 1.0 else sims
        if masked:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        # in place when no gradient needs the softmax's output: one [n, B, m] tensor fewer
        weighted = weights * sims if weights.requires_grad else weights.mul_(sims)
        scores = weighted.sum(-1)  # [n, B] or [B, n]
        return scores.t().contiguous() if cands.dim() == 2 else scores  # no copy when B = 1

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
    def _score_multihead(terms, context_mask, masked, cands):
        key_proj, key_bias, value_proj, out_bias = terms
        bsz, heads, m, dim = key_proj.shape
        cands_t = cands.t() if cands.dim() == 2 else cands.transpose(1, 2)  # [d, n] or [B, d, n]
        key_proj, value_proj = key_proj.to(cands.dtype), value_proj.to(cands.dtype)
        logits = torch.matmul(key_proj.reshape(bsz, heads * m, dim), cands_t).float().view(bsz, heads, m, -1)
        if key_bias is not None:
            logits = logits + key_bias.unsqueeze(-1)
        if masked:
            logits = logits.masked_fill(~context_mask.view(bsz, 1, m, 1), float("-inf"))
        weights = torch.softmax(logits, dim=2)  # over the m context vectors, per head
        values = torch.matmul(value_proj.reshape(bsz, heads * m, dim), cands_t).float().view(bsz, heads, m, -1)
        scores = (weights * values).sum((1, 2))  # [B, n]
        if out_bias is not None:
            scores = scores + (cands @ out_bias.to(cands.dtype)).float()  # [n] or [B, n]
        return scores

    def _score_attended(self, context, context_mask, cands):
        """Any other multihead layout: torch's attention on one chunk at a time."""
        cands = cands.to(context.dtype)  # torch's attention wants one dtype
        if cands.dim() == 2:
            cands = cands.unsqueeze(0).expand(context.size(0), -1, -1)
        attended = self.poly_attention(cands, context, context_mask)  # [B, n, d]
        return (attended * cands).sum(-1)


def rescore_top(scores: torch.Tensor, rescore: Callable, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, N] with each row's top ``k`` replaced by ``rescore(candidates[top])``.

    ``rescore`` maps per-example candidates [B, k, d] to scores [B, k]: after a bfloat16
    pass over all N, the float32 candidates [N, d] scored again where the ranking is read.
    """
    k = min(k, scores.size(1))
    if k <= 0:
        return scores
    top = scores.topk(k, dim=1).indices  # [B, k]
    return scores.scatter(1, top, rescore(candidates[top]).to(scores.dtype))


def _foldable(mha: nn.MultiheadAttention) -> bool:
    """Plain packed projections, no extra key/value biases: the folded form applies."""
    return (
        mha._qkv_same_embed_dim
        and mha.bias_k is None
        and mha.bias_v is None
        and not mha.add_zero_attn
        and mha.in_proj_weight is not None
    )
