"""Confidence intervals for ranking metrics whose examples come in conversations.

Turns of one conversation are not independent (the same history, the same people), so a
binomial standard error over examples understates the real one. The bootstrap here resamples
whole conversations with replacement and recomputes the mean over the examples they hold;
the paired version does so for the per-example difference of two models on the same
examples, which is far tighter than comparing two separate intervals.
"""
from typing import Dict, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000


def conversation_bootstrap(
    values: Sequence[float],
    conversations: Sequence[str],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> Dict[str, float]:
    """Mean of per-example ``values`` with a percentile interval from resampling conversations.

    Returns {"mean", "low", "high", "examples", "conversations"}. Each resample draws as many
    conversations as there are, with replacement, and takes the mean over all their examples
    (a conversation drawn twice counts twice).
    """
    values = np.asarray(values, dtype=np.float64)
    means = bootstrap_means(values, conversations, resamples, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {
        "mean": float(values.mean()),
        "low": float(low),
        "high": float(high),
        "examples": int(len(values)),
        "conversations": int(len(set(conversations))),
    }


def bootstrap_means(values: Sequence[float], conversations: Sequence[str], resamples: int, seed: int) -> np.ndarray:
    """[resamples] means over the examples of conversations drawn with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(conversations):
        raise ValueError(f"{len(values)} values but {len(conversations)} conversation ids")
    if len(values) == 0:
        raise ValueError("no examples to bootstrap")
    _, group = np.unique(np.asarray(conversations), return_inverse=True)
    sums = np.bincount(group, weights=values)  # [G]
    counts = np.bincount(group).astype(np.float64)  # [G]
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))  # [R, G]
    return sums[draws].sum(1) / counts[draws].sum(1)  # [R]


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], conversations: Sequence[str], **kwargs
) -> Dict[str, float]:
    """The mean difference a - b over the same examples, with its conversation bootstrap CI."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must cover the same examples: {len(a)} against {len(b)}")
    return conversation_bootstrap(a - b, conversations, **kwargs)


def format_interval(result: Dict[str, float], digits: int = 3, signed: bool = False) -> str:
    """'0.612 [0.598, 0.627]' (``signed``: '+0.012 [-0.003, +0.027]')."""
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{fmt.format(result['mean'])} [{fmt.format(result['low'])}, {fmt.format(result['high'])}]"
