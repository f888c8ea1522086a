"""Distillation losses: a student's scores against a teacher's, per example.

Every function takes scores over each example's candidates and returns one loss per example:

    student  [B, N]  the student's scores (gradients flow through these)
    teacher  [B, N]  the teacher's scores for the same (context, candidate) pairs
    mask     [B, N]  bool, True for real candidates; padding candidates take no part
    labels   [B]     index of each example's label among its candidates (margin-mse only)
    -> loss  [B]

- ``kl``: KL(softmax(teacher / T) || softmax(student / T)) over the candidates, times T^2
  (Hinton et al. 2015: the T^2 keeps the gradients' size as T changes, so the weight that
  mixes it with the label loss means the same at any T).
- ``margin-mse``: Hofstaetter et al. 2020 (arXiv 2010.02666): the squared difference between
  the student's margin s(q, p+) - s(q, p-) and the teacher's t(q, p+) - t(q, p-), with the
  example's label as p+ and each other real candidate as a p-, averaged over the p-. Raw
  scores, as they define it: student and teacher scores must be on comparable scales.
- ``bce``: Trans-Encoder's loss for a cross-encoder student (Liu et al. 2022): binary
  cross-entropy of sigmoid(student) against the pseudo-label sigmoid(z(teacher) / T).
- ``mse``: Trans-Encoder's regression loss for a bi-encoder student: mean squared error
  between z(student) and z(teacher).

z() standardizes scores over each example's real candidates (mean 0, standard deviation 1).
Trans-Encoder's models all score in [0, 1] (cosines, sigmoids), so its raw labels fit each
other; ours do not (a bi-encoder's dot products, a cross-encoder's logits, any range), and a
raw regression would mostly teach the student the teacher's scale. Ranking depends only on
each context's pattern of scores, which z() keeps. For ``mse`` this makes the loss
2 * (1 - Pearson correlation) of the two rows.
"""
from typing import Callable, Dict

import torch
import torch.nn.functional as F

EPS = 1e-6  # variance floor: an example whose scores are all equal has z = 0, not NaN

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, N] -> [B]: the mean over real candidates."""
    return x.masked_fill(~mask, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)


def standardize(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B, N]: (x - mean) / std over each row's real candidates; padding -> 0."""
    scores = scores.masked_fill(~mask, 0.0)
    mean = _masked_mean(scores, mask).unsqueeze(-1)  # [B, 1]
    var = _masked_mean((scores - mean) ** 2, mask).unsqueeze(-1)  # population variance
    return ((scores - mean) / (var + EPS).sqrt()).masked_fill(~mask, 0.0)


def _masked_log_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # the dtype's lowest value rather than -inf: padding then gets probability 0 and a
    # finite log-probability, so 0 * (log p - log q) stays 0 (with -inf it is NaN)
    return F.log_softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1)


def kl(student, teacher, mask, labels=None, temperature: float = 1.0) -> torch.Tensor:
    log_q = _masked_log_softmax(student / temperature, mask)  # student
    log_p = _masked_log_softmax(teacher / temperature, mask)  # teacher
    terms = log_p.exp() * (log_p - log_q)  # [B, N]
    return terms.masked_fill(~mask, 0.0).sum(-1) * temperature**2


def margin_mse(student, teacher, mask, labels, temperature: float = 1.0) -> torch.Tensor:
    positive = labels.view(-1, 1)  # [B, 1]
    student_margin = student.gather(1, positive) - student  # [B, N]: s(q, p+) - s(q, p-)
    teacher_margin = teacher.gather(1, positive) - teacher
    negatives = mask.clone()
    negatives.scatter_(1, positive, False)  # the label is not its own negative
    return _masked_mean((student_margin - teacher_margin) ** 2, negatives)


def bce(student, teacher, mask, labels=None, temperature: float = 1.0) -> torch.Tensor:
    target = torch.sigmoid(standardize(teacher, mask) / temperature)  # [B, N] in (0, 1)
    losses = F.binary_cross_entropy_with_logits(student.masked_fill(~mask, 0.0), target, reduction="none")
    return _masked_mean(losses, mask)


def mse(student, teacher, mask, labels=None, temperature: float = 1.0) -> torch.Tensor:
    return _masked_mean((standardize(student, mask) - standardize(teacher, mask)) ** 2, mask)


LOSSES: Dict[str, LossFn] = {"kl": kl, "margin-mse": margin_mse, "bce": bce, "mse": mse}
NEEDS_LABELS = ("margin-mse",)  # uses the label as its positive: not label-free


def distill_loss(name: str, student, teacher, mask, labels=None, temperature: float = 1.0) -> torch.Tensor:
    """The loss ``name`` (one of LOSSES) per example [B]."""
    mask = mask.to(torch.bool)
    # padding scores (-1e20 from the agents) would overflow once squared: 0 from here on
    student = student.masked_fill(~mask, 0.0)
    teacher = teacher.detach().to(student.dtype).masked_fill(~mask, 0.0)
    return LOSSES[name](student, teacher, mask, labels, temperature)
