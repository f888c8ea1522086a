"""Reductions of a sequence of hidden states to one vector (the paper's red())."""
import torch
from torch import nn

REDUCTIONS = ("first", "mean", "max", "mean_first_m")


class Pooling(nn.Module):
    """hidden [B, T, d], mask [B, T] -> [B, d].

    first: the first output (the [CLS] position), the paper's best bi-encoder (83.3).
    mean: mean over real tokens, how sentence-transformers models such as MiniLM are trained.
    max: max over real tokens.
    mean_first_m: mean of the first m outputs (the paper's third variant).
    """

    def __init__(self, reduction: str = "mean", first_m: int = 16):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"--reduction-type {reduction}: choose one of {REDUCTIONS}")
        self.reduction = reduction
        self.first_m = first_m

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.reduction == "first":
            return hidden[:, 0]
        if self.reduction == "max":
            return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1).values
        if self.reduction == "mean_first_m":
            hidden, mask = hidden[:, : self.first_m], mask[:, : self.first_m]
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
