"""Every agent of ours as a distillation student: the ``--distill-*`` options.

With ``--distill-teacher MODELFILE`` a training step scores the step's contexts against the
same candidate texts the student scores (the batch's labels with ``--candidates batch``, each
example's own with ``inline``) with the teacher, and the loss becomes

    loss = (1 - w) * label loss + w * distill loss          (w = --distill-weight)

per example, so w = 0 is plain training on labels and w = 1 ignores the labels entirely
(the unsupervised Trans-Encoder loop: there the batch's other responses are just more pairs
to score). ``distill_loss`` and ``teacher_top1`` (how often the student's best candidate is
the teacher's) are recorded as train metrics, and ``label_loss`` too when w < 1.

The agents hold a ``Distillation`` only when they train with ``--distill-teacher`` (the
agent's ``distillation`` is None otherwise) and call it from three hooks: batchify (the
contexts' texts, for the teacher), _build_candidates (the candidates' texts) and train_step.
The loss hook sits where ParlAI computes the loss: TorchRankerAgent.train_step calls
``self.criterion(scores, label_inds)`` once and then averages, backpropagates and records
it; for the length of one train step the criterion is this mixed loss, so none of ParlAI's
train_step is copied. Evaluation is untouched (the label loss, as ever).
"""
import os
from typing import Optional

import torch
from parlai.core.metrics import AverageMetric
from parlai.core.opt import Opt
from parlai.core.params import ParlaiParser
from parlai.utils import logging
from parlai.utils.data import DatatypeHelper

from ..errors import ParlaiPolyError
from .losses import LOSSES, distill_loss
from .teacher import TeacherScorer, candidate_rows

CONTEXT_TEXTS = "_context_texts"  # a Batch field; the underscore keeps it off the GPU


def add_distill_args(parser: ParlaiParser) -> None:
    """The --distill-* options, which every agent of ours takes (any of them can be a student)."""
    group = parser.add_argument_group("parlai-poly distillation (this model as the student)")
    group.add_argument(
        "--distill-teacher",
        type=str,
        default=None,
        help="Model file of ours (cross, poly or bi) whose scores of each training example's "
        "candidates this model learns from; several, comma-separated, give the mean of their "
        "standardized scores (Trans-Encoder's mutual distillation). Loaded once, in eval mode, "
        "when training.",
    )
    group.add_argument(
        "--distill-loss",
        type=str,
        default="kl",
        choices=sorted(LOSSES),
        help="kl: KL(softmax(teacher/T) || softmax(student/T)) x T^2 over each example's "
        "candidates. margin-mse: Hofstaetter et al.'s MSE of score margins label - negative "
        "(raw scores; uses the label as the positive). bce: Trans-Encoder's loss for a "
        "cross-encoder student, BCE against sigmoid(z(teacher)/T). mse: Trans-Encoder's "
        "regression for a bi-encoder student, MSE of z(student) and z(teacher). z() "
        "standardizes each example's scores over its candidates.",
    )
    group.add_argument(
        "--distill-weight",
        type=float,
        default=0.5,
        help="w in loss = (1 - w) * label loss + w * distill loss. 1: the labels are ignored "
        "entirely (unsupervised); 0: labels only (the teacher just gives metrics).",
    )
    group.add_argument(
        "--distill-temperature",
        type=float,
        default=1.0,
        help="T: softens kl's distributions and sets the slope of bce's pseudo-labels; "
        "margin-mse and mse ignore it.",
    )
    group.add_argument(
        "--distill-top-k",
        type=int,
        default=0,
        help="0: the teacher scores every candidate of each example. k > 0: only the label and "
        "the student's k best other candidates, and the distill loss is over those k + 1 "
        "(a cross-encoder teacher pays a forward pass per pair: at batch 64, k=7 scores 8 "
        "pairs per example instead of 64). The label loss still sees every candidate.",
    )
    group.add_argument(
        "--distill-cache-dir",
        type=str,
        default=None,
        help="Keep the teacher's scores here (safetensors + JSON, keyed by sha256 of the "
        "teacher's weights and each context and candidate text), so a second epoch, run or "
        "student reuses them. Default: computed on the fly every time.",
    )


class Distillation:
    """A training agent's teacher (loaded at its first training step, not before: ParlAI
    builds agents that never train from the same options, such as the final evaluation's
    reload) and the mixed loss. Shared copies of the agent see the one teacher through
    ``holder``."""

    def __init__(self, agent, opt: Opt, holder: Optional[dict] = None):
        self.agent = agent
        self.opt = opt
        self.holder = {} if holder is None else holder
        self.candidates = None  # the texts the student scores this step: one list, or one per example

    @classmethod
    def for_agent(cls, agent, opt: Opt, shared=None) -> Optional["Distillation"]:
        """The agent's distillation, or None when it does not train with a teacher."""
        if not (teacher_files(opt) and trains(opt)):
            return None
        return cls(agent, opt, shared.get("distill_holder") if shared else None)

    @property
    def scorer(self):
        """The TeacherScorer, once a training step has loaded it."""
        return self.holder.get("scorer")

    def share(self, shared: dict) -> None:
        shared["distill_holder"] = self.holder

    def flush(self) -> None:
        if self.scorer is not None:
            self.scorer.flush()

    def build_scorer(self, opt: Opt):
        from parlai.core.build_data import modelzoo_path

        # zoo: paths resolve under this run's datapath, as -mf and --init-model do
        files = [modelzoo_path(opt.get("datapath"), path) for path in teacher_files(opt)]
        logging.info(f"Distilling from {', '.join(files)} ({opt['distill_loss']}, weight {opt['distill_weight']})")
        overrides = {"no_cuda": opt.get("no_cuda", False), "gpu": opt.get("gpu", -1)}
        return TeacherScorer(files, opt.get("distill_cache_dir"), overrides)

    # ---- the training step ----------------------------------------------------------
    def attach_texts(self, obs_batch, batch) -> None:
        """The teacher gets the texts (it may tokenize differently): the history string each
        row's text_vec was made from, in the batch's (maybe sorted) order."""
        if batch.valid_indices is not None:
            batch[CONTEXT_TEXTS] = [
                obs_batch[i].get("full_text") or obs_batch[i].get("text", "") for i in batch.valid_indices.tolist()
            ]

    def train_step(self, batch, train_step):
        """``train_step(batch)`` (ParlAI's) with the agent's criterion the mixed loss."""
        if self.scorer is None:
            self.holder["scorer"] = self.build_scorer(self.opt)
        agent = self.agent
        label_loss = agent.criterion
        agent.criterion = lambda scores, label_inds: self.distilled_loss(batch, scores, label_inds, label_loss)
        try:
            return train_step(batch)
        finally:
            agent.criterion = label_loss

    def distilled_loss(self, batch, scores, label_inds, label_loss) -> torch.Tensor:
        """Per-example loss [B] of student ``scores`` [B, N]."""
        opt = self.opt
        # with negatives gathered across workers this worker's candidates come first
        student = scores[:, : max(len(row) for row in candidate_rows(self.candidates, scores.size(0)))]
        candidates, distill_labels = self.candidates, label_inds
        if 0 < (opt.get("distill_top_k") or 0) < student.size(1) - 1:
            chosen = top_k_with_label(student, label_inds, opt["distill_top_k"])  # [B, k + 1], label first
            candidates = chosen_texts(self.candidates, chosen)
            student, distill_labels = student.gather(1, chosen), torch.zeros_like(label_inds)
        teacher, mask = self.scorer.scores(batch[CONTEXT_TEXTS], candidates)  # [B, N'] or [B, k + 1]
        teacher, mask = teacher.to(scores.device), mask.to(scores.device)
        student = student[:, : teacher.size(1)]
        distill = distill_loss(opt["distill_loss"], student, teacher, mask, distill_labels, opt["distill_temperature"])
        record = self.agent.record_local_metric
        record("distill_loss", AverageMetric.many(distill.detach()))
        record("teacher_top1", AverageMetric.many(top1_agreement(student, teacher, mask)))
        weight = opt["distill_weight"]
        if weight >= 1:
            return distill  # the labels take no part at all
        labels = label_loss(scores, label_inds)
        record("label_loss", AverageMetric.many(labels.detach()))
        return (1 - weight) * labels + weight * distill


def top_k_with_label(student: torch.Tensor, label_inds: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k + 1] candidate indices: each example's label, then the k candidates other than
    the label that ``student`` [B, N] scores highest (padding scores -1e20: last)."""
    others = student.detach().scatter(1, label_inds.unsqueeze(1), float("-inf"))
    return torch.cat([label_inds.unsqueeze(1), others.topk(k, dim=1).indices], 1)


def chosen_texts(candidates, chosen: torch.Tensor):
    """One list of texts per example: the candidates (one shared list, or one per example)
    at ``chosen`` [B, k + 1]; a padding column past an example's own list gives no text."""
    rows = candidate_rows(candidates, chosen.size(0))
    return [[row[j] for j in picks if j < len(row)] for row, picks in zip(rows, chosen.tolist())]


def trains(opt: Opt) -> bool:
    return DatatypeHelper.is_training(opt.get("datatype") or "train") and not opt.get("interactive_mode")


def teacher_files(opt: Opt):
    return [path.strip() for path in (opt.get("distill_teacher") or "").split(",") if path.strip()]


def check_distill_options(opt: Opt) -> None:
    weight = opt.get("distill_weight", 0.5)
    if not 0 <= weight <= 1:
        raise ParlaiPolyError(f"--distill-weight {weight}: must be between 0 and 1.")
    if (opt.get("distill_top_k") or 0) < 0:
        raise ParlaiPolyError(
            f"--distill-top-k {opt['distill_top_k']}: give 0 (the teacher scores every candidate) "
            "or the number of the student's best other candidates it scores beside the label."
        )
    if opt.get("distill_temperature", 1.0) <= 0:
        raise ParlaiPolyError(f"--distill-temperature {opt.get('distill_temperature')}: must be positive.")
    model_file = opt.get("model_file")
    for path in teacher_files(opt):
        if model_file and os.path.abspath(path) == os.path.abspath(model_file):
            raise ParlaiPolyError(
                f"--distill-teacher {path} is this run's own model file: a teacher must be "
                "another model, which stays fixed while the student trains."
            )


def top1_agreement(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] 1.0 where the student's and the teacher's best real candidate are the same."""
    low = float("-inf")
    best_student = student.detach().masked_fill(~mask, low).argmax(-1)
    return (best_student == teacher.masked_fill(~mask, low).argmax(-1)).float()
