"""Attention of queries over a masked memory, as the Poly-encoder uses it twice.

Codes attend over the context's outputs (--codes-attention-type) and each candidate attends
over the context's m vectors (--poly-attention-type). Keys and values are the memory itself.
"""
import math

import torch
from torch import nn

ATTENTION_TYPES = ("basic", "sqrt", "multihead")


class Attention(nn.Module):
    """query [B, Q, d], memory [B, K, d], memory_mask [B, K] -> [B, Q, d].

    basic: softmax(q . k) v.  sqrt: softmax(q . k / sqrt(d)) v.
    multihead: torch's multi-head attention with learned projections, ``n_heads`` heads.
    """

    def __init__(self, kind: str, dim: int, n_heads: int = 4):
        super().__init__()
        if kind not in ATTENTION_TYPES:
            raise ValueError(f"attention type {kind}: choose one of {ATTENTION_TYPES}")
        self.kind = kind
        self.scale = 1.0 / math.sqrt(dim) if kind == "sqrt" else 1.0
        if kind == "multihead":
            if dim % n_heads:
                raise ValueError(f"{n_heads} attention heads do not divide hidden size {dim}")
            self.mha = nn.MultiheadAttention(dim, n_heads, batch_first=True)

    def logits(self, query: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor):
        """The basic/sqrt attention logits [B, Q, K], masked positions at -inf."""
        logits = torch.bmm(query, memory.transpose(1, 2)) * self.scale
        return logits.masked_fill(~memory_mask.unsqueeze(1), float("-inf"))

    def forward(self, query, memory, memory_mask, return_weights: bool = False):
        """[B, Q, d]; with ``return_weights`` also the attention weights [B, Q, K]
        (for multihead, averaged over the heads)."""
        if self.kind == "multihead":
            out, weights = self.mha(
                query, memory, memory, key_padding_mask=~memory_mask, need_weights=return_weights
            )
            return (out, weights) if return_weights else out
        weights = torch.softmax(self.logits(query, memory, memory_mask), dim=-1)
        out = torch.bmm(weights, memory)
        return (out, weights) if return_weights else out
