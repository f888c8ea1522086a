"""Where a label ranks among scored candidates, and the metrics of that rank, under ties.

One rule for ties everywhere: a label tied with t other candidates takes its place among
them in a random order, counted in expectation. With ``above`` candidates scored higher:

    rank  = 1 + above + t / 2
    R@k   = clip((k - above) / (t + 1), 0, 1)      (the chance a random order puts it in the top k)
    RR    = mean_{j=0..t} 1 / (1 + above + j) = (H(above + t + 1) - H(above)) / (t + 1)

so equal scores never earn credit for their position (a model scoring everything alike gets
chance, not a perfect R@1). Pure functions on tensors: scores [B, N], label indices [B].
"""
from typing import Callable, Dict, Optional, Sequence

import torch


def label_position(scores: torch.Tensor, labels: torch.Tensor):
    """(above [B], ties [B]): candidates scored above each example's label, and the other
    candidates scored exactly as it is."""
    label_scores = scores.gather(1, labels.view(-1, 1).to(scores.device))  # [B, 1]
    above = (scores > label_scores).sum(1)
    ties = (scores == label_scores).sum(1) - 1
    return above, ties


def expected_rank(above: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    return 1 + above.double() + ties.double() / 2


def reciprocal_rank(above: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """The mean of 1 / rank over the tied positions: a difference of harmonic numbers."""
    above, ties = above.double(), ties.double()
    harmonic = (torch.digamma(above + ties + 2) - torch.digamma(above + 1)) / (ties + 1)
    return torch.where(ties == 0, 1 / (1 + above), harmonic)


def recall_at(above: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    return ((k - above.double()) / (ties.double() + 1)).clamp(0.0, 1.0)


def rank_metrics(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, torch.Tensor]:
    """Per example [B]: 'rank', 'mrr' and 'R@k' for each k."""
    above, ties = label_position(scores, labels)
    metrics = {"rank": expected_rank(above, ties), "mrr": reciprocal_rank(above, ties)}
    for k in ks:
        metrics[f"R@{k}"] = recall_at(above, ties, k)
    return metrics


# ---- retrieve and rerank --------------------------------------------------------------------
def rerank_head(top: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor], k: Optional[int] = None) -> torch.Tensor:
    """Candidate indices [B, K] with the first ``k`` (all by default) reordered by ``score``,
    which maps indices [B, k] to their scores [B, k]; the rest keep their order."""
    k = top.size(1) if k is None else min(k, top.size(1))
    head = top[:, :k]
    head = head.gather(1, score(head).argsort(1, descending=True))
    return torch.cat([head, top[:, k:]], dim=1)


def cascade_scores(top: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """Scores [B, N] whose order is the cascade's: ``top`` [B, K] (best first) gets K..1, every
    other candidate its score in ``below`` [B, N] (which must stay under 1)."""
    ranked = torch.arange(top.size(1), 0, -1, dtype=below.dtype, device=below.device).expand_as(top)
    return below.scatter(1, top, ranked)
