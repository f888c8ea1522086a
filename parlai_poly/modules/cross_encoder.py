"""Cross-encoder: context and candidate encoded together.

    y = red(T([ctxt ; cand])),  score = y . W

with segment 0 for the context ([CLS] ctxt [SEP]) and 1 for the candidate (cand [SEP]).
Every candidate costs a full forward pass: the most accurate and the slowest scorer.
Models migrated from ParlAI's transformer/crossencoder keep the candidate's start token
(``keep_candidate_start``), as ParlAI's ``concat_without_padding`` does.
"""
import torch
from torch import nn

from .encoder import TextEncoder
from .pooling import Pooling


class CrossEncoderModule(nn.Module):
    def __init__(self, encoder: TextEncoder, reduction: str = "first"):
        super().__init__()
        self.encoder = encoder
        self.pooling = Pooling(reduction)
        self.classifier = nn.Linear(encoder.dim, 1)

    def forward(self, ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """pairs ids [P, L], segments [P, L] -> scores [P]"""
        return self.classifier(self.pooling(*self.encoder(ids, segments))).squeeze(-1)

    @staticmethod
    def pair_inputs(
        context_ids, candidate_ids, context_index, candidate_index, pad_idx, keep_candidate_start=False
    ):
        """Join right-padded contexts [B, T] and candidates [M, L] into P pairs.

        Pair p is context ``context_index[p]`` ([CLS] x [SEP]) followed by candidate
        ``candidate_index[p]`` without its leading [CLS] (y [SEP]; with it when
        ``keep_candidate_start``), padded only to the longest pair. Returns ids [P, Lp] and
        segment ids [P, Lp].
        """
        ctx = context_ids[context_index]  # [P, T]
        cand = candidate_ids[candidate_index]  # [P, L]
        ctx_len = (ctx != pad_idx).sum(1, keepdim=True)  # [P, 1]
        cand_len = (cand != pad_idx).sum(1, keepdim=True).clamp(min=1)
        skip = 0 if keep_candidate_start else 1  # leading candidate tokens left out
        total = ctx_len + cand_len - skip
        pos = torch.arange(int(total.max()), device=ctx.device).unsqueeze(0)  # [1, Lp]
        from_context = pos < ctx_len
        ctx_tok = ctx.gather(1, pos.clamp(max=ctx.size(1) - 1).expand(ctx.size(0), -1))
        cand_pos = (pos - ctx_len + skip).clamp(0, cand.size(1) - 1)
        ids = torch.where(from_context, ctx_tok, cand.gather(1, cand_pos))
        valid = pos < total
        ids = ids.masked_fill(~valid, pad_idx)
        segments = (~from_context & valid).long()
        return ids, segments
