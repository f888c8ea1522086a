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
"""
from typing import Optional, Tuple

import torch
from torch import nn

from .attention import Attention
from .encoder import TextEncoder
from .pooling import Pooling

POLY_TYPES = ("codes", "n_first")


class PolyEncoderModule(nn.Module):
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
    ):
        super().__init__()
        if n_codes < 1:
            raise ValueError(f"--poly-n-codes {n_codes}: the poly-encoder needs at least 1 code")
        if poly_type not in POLY_TYPES:
            raise ValueError(f"--polyencoder-type {poly_type}: choose one of {POLY_TYPES}")
        dim = context_encoder.dim
        self.context_encoder = context_encoder
        self.candidate_encoder = candidate_encoder  # None: shared with the context
        self.pooling = Pooling(reduction, first_m)
        self.poly_type = poly_type
        self.n_codes = n_codes
        if poly_type == "codes":
            # small codes give near-uniform attention at first: every y^i starts as the mean
            # of the context's outputs, i.e. the backbone's own mean-pooled embedding
            self.codes = nn.Parameter(torch.randn(n_codes, dim) * 0.02)
            self.codes_attention = Attention(codes_attention, dim, codes_heads)
        self.poly_attention = Attention(poly_attention, dim, poly_heads)

    def encode_context(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] -> context vectors [B, m, d] and their mask [B, m]"""
        hidden, mask = self.context_encoder(ids)  # [B, T, d], [B, T]
        bsz = hidden.size(0)
        if self.poly_type == "codes":
            codes = self.codes.unsqueeze(0).expand(bsz, -1, -1)  # [B, m, d]
            vectors = self.codes_attention(codes, hidden, mask)
            return vectors, mask.new_ones(bsz, self.n_codes)
        vectors, vmask = hidden[:, : self.n_codes], mask[:, : self.n_codes]
        missing = self.n_codes - vectors.size(1)
        if missing > 0:  # context shorter than m: pad with masked zero vectors
            vectors = nn.functional.pad(vectors, (0, 0, 0, missing))
            vmask = nn.functional.pad(vmask, (0, missing), value=False)
        return vectors, vmask

    def encode_candidates(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, L] -> [N, d]"""
        encoder = self.candidate_encoder if self.candidate_encoder is not None else self.context_encoder
        return self.pooling(*encoder(ids))

    def score(self, context: torch.Tensor, context_mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """context [B, m, d], context_mask [B, m]; candidates [N, d] or [B, N, d] -> [B, N]"""
        if self.poly_attention.kind == "multihead":
            if candidates.dim() == 2:
                candidates = candidates.unsqueeze(0).expand(context.size(0), -1, -1)
            attended = self.poly_attention(candidates, context, context_mask)  # [B, N, d]
            return (attended * candidates).sum(-1)
        if candidates.dim() == 2:
            sims = torch.matmul(context, candidates.t()).transpose(1, 2)  # [B, N, m], one GEMM
        else:
            sims = torch.bmm(candidates, context.transpose(1, 2))  # [B, N, m]
        logits = (sims * self.poly_attention.scale).masked_fill(~context_mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(logits, dim=-1)  # [B, N, m]
        return (weights * sims).sum(-1)
