"""Cross-encoder: context and candidate encoded together.

    h = T([ctxt ; cand])
    linear head (the paper's):  score = red(h) . W
    segment-cosine head:        score = s * cos(mean(h over ctxt), mean(h over cand))

with segment 0 for the context ([CLS] ctxt [SEP]) and 1 for the candidate (cand [SEP]).
The linear head starts at chance; the segment-cosine head starts from what a backbone trained
as a mean-pooled bi-encoder (all-MiniLM-L6-v2) already knows, well above chance before any
fine-tuning, and every token still attends across the pair.
Every candidate costs a full forward pass: the most accurate and the slowest scorer.
Models migrated from ParlAI's transformer/crossencoder keep the candidate's start token
(``keep_candidate_start``), as ParlAI's ``concat_without_padding`` does.
"""
import math

import torch
from torch import nn

from .encoder import TextEncoder
from .pooling import Pooling


CROSS_HEADS = ("linear", "segment-cosine")
INITIAL_COSINE_SCALE = 20.0  # sentence-transformers' scale for in-batch negatives


class CrossEncoderModule(nn.Module):
    def __init__(self, encoder: TextEncoder, reduction: str = "first", head: str = "linear"):
        super().__init__()
        if head not in CROSS_HEADS:
            raise ValueError(f"--cross-head {head}: choose one of {CROSS_HEADS}")
        self.encoder = encoder
        self.head = head
        if head == "linear":
            self.pooling = Pooling(reduction)
            self.classifier = nn.Linear(encoder.dim, 1)
        else:
            self.pooling = Pooling("mean")
            self.log_scale = nn.Parameter(torch.tensor(math.log(INITIAL_COSINE_SCALE)))

    def forward(self, ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """pairs ids [P, L], segments [P, L] -> scores [P]"""
        hidden, mask = self.encoder(ids, segments)  # [P, L, d], [P, L]
        if self.head == "linear":
            return self.classifier(self.pooling(hidden, mask)).squeeze(-1)
        context = self.pooling(hidden, mask & (segments == 0))  # [P, d]
        candidate = self.pooling(hidden, mask & (segments == 1))  # [P, d]
        return self.log_scale.exp() * nn.functional.cosine_similarity(context, candidate, dim=-1)

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
