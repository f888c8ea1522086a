"""Bi-encoder: context and candidate encoded apart, scored by a dot product.

    y_ctxt = red(T1(ctxt)),  y_cand = red(T2(cand)),  score = y_ctxt . y_cand

T1 and T2 start from the same backbone and are one module unless --share-encoders false.
Candidates do not see the context, so their vectors can be computed once and cached.
"""
from typing import Optional

import torch
from torch import nn

from .encoder import TextEncoder
from .pooling import Pooling


class BiEncoderModule(nn.Module):
    def __init__(
        self,
        context_encoder: TextEncoder,
        candidate_encoder: Optional[TextEncoder] = None,
        reduction: str = "mean",
        first_m: int = 16,
    ):
        super().__init__()
        self.context_encoder = context_encoder
        self.candidate_encoder = candidate_encoder  # None: shared with the context
        self.pooling = Pooling(reduction, first_m)

    def encode_context(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, d]"""
        return self.pooling(*self.context_encoder(ids))

    def encode_candidates(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, L] -> [N, d]"""
        encoder = self.candidate_encoder if self.candidate_encoder is not None else self.context_encoder
        return self.pooling(*encoder(ids))

    @staticmethod
    def score(context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """context [B, d]; candidates [N, d] shared by the batch, or [B, N, d] -> scores [B, N]"""
        if candidates.dim() == 2:
            return context @ candidates.t()
        return torch.bmm(candidates, context.unsqueeze(-1)).squeeze(-1)
