"""Every agent of ours as a distillation student: the ``--distill-*`` options.

With ``--distill-teacher MODELFILE`` a training step scores the step's contexts against the
same candidate texts the student scores (the batch's labels with ``--candidates batch``, each
example's own with ``inline``) with the teacher, and the loss becomes

    loss = (1 - w) * label loss + w * distill loss          (w = --distill-weight)

per example, so w = 0 is plain training on labels and w = 1 ignores the labels entirely
(the unsupervised Trans-Encoder loop: there the batch's other responses are just more pairs
to score). ``distill_loss`` and ``teacher_top1`` (how often the student's best candidate is
the teacher's) are recorded as train metrics, and ``label_loss`` too when w < 1.

The hook sits where ParlAI computes the loss: TorchRankerAgent.train_step calls
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

CONTEXT_TEXTS = "_context_texts"  # a Batch field; the underscore keeps it off the GPU


class DistillationMixin:
    @classmethod
    def add_cmdline_args(cls, parser: ParlaiParser, partial_opt: Optional[Opt] = None) -> ParlaiParser:
        super().add_cmdline_args(parser, partial_opt=partial_opt)
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
            "--distill-cache-dir",
            type=str,
            default=None,
            help="Keep the teacher's scores here (safetensors + JSON, keyed by sha256 of the "
            "teacher's weights and each context and candidate text), so a second epoch, run or "
            "student reuses them. Default: computed on the fly every time.",
        )
        return parser

    def __init__(self, opt: Opt, shared=None):
        if not shared:
            self.check_distill_options(opt)
        super().__init__(opt, shared)
        self._distilling = bool(self.teacher_files(opt)) and self._trains(opt)
        # the teacher is loaded at the first training step, not here: ParlAI builds agents
        # that never train from the same options (the final evaluation's reload); shared
        # copies see the one teacher through this holder
        self._distill_holder = shared["distill_holder"] if shared else {}

    @property
    def distiller(self):
        """The TeacherScorer, once a training step has loaded it; None before or when not distilling."""
        return self._distill_holder.get("scorer")

    @staticmethod
    def _trains(opt: Opt) -> bool:
        return DatatypeHelper.is_training(opt.get("datatype") or "train") and not opt.get("interactive_mode")

    @staticmethod
    def teacher_files(opt: Opt):
        return [path.strip() for path in (opt.get("distill_teacher") or "").split(",") if path.strip()]

    def check_distill_options(self, opt: Opt) -> None:
        weight = opt.get("distill_weight", 0.5)
        if not 0 <= weight <= 1:
            raise ParlaiPolyError(f"--distill-weight {weight}: must be between 0 and 1.")
        if opt.get("distill_temperature", 1.0) <= 0:
            raise ParlaiPolyError(f"--distill-temperature {opt.get('distill_temperature')}: must be positive.")
        model_file = opt.get("model_file")
        for path in self.teacher_files(opt):
            if model_file and os.path.abspath(path) == os.path.abspath(model_file):
                raise ParlaiPolyError(
                    f"--distill-teacher {path} is this run's own model file: a teacher must be "
                    "another model, which stays fixed while the student trains."
                )

    def build_distiller(self, opt: Opt):
        from parlai.core.build_data import modelzoo_path

        from .teacher import TeacherScorer  # loads ParlAI agents: only when distilling

        # zoo: paths resolve under this run's datapath, as -mf and --init-model do
        files = [modelzoo_path(opt.get("datapath"), path) for path in self.teacher_files(opt)]
        logging.info(f"Distilling from {', '.join(files)} ({opt['distill_loss']}, weight {opt['distill_weight']})")
        overrides = {"no_cuda": opt.get("no_cuda", False), "gpu": opt.get("gpu", -1)}
        return TeacherScorer(files, opt.get("distill_cache_dir"), overrides)

    def share(self):
        shared = super().share()
        shared["distill_holder"] = self._distill_holder
        return shared

    def shutdown(self):
        # ParlAI shuts the final evaluation's worlds down at the end of training
        if self.distiller is not None:
            self.distiller.flush()
        super().shutdown()

    # ---- the training step ----------------------------------------------------------
    def batchify(self, obs_batch, sort=False):
        batch = super().batchify(obs_batch, sort=sort)
        if self._distilling and batch.valid_indices is not None:
            # the teacher gets the texts (it may tokenize differently): the history string
            # each row's text_vec was made from, in the batch's (maybe sorted) order
            batch[CONTEXT_TEXTS] = [
                obs_batch[i].get("full_text") or obs_batch[i].get("text", "") for i in batch.valid_indices.tolist()
            ]
        return batch

    def _build_candidates(self, batch, source, mode):
        cands, cand_vecs, label_inds = super()._build_candidates(batch, source, mode)
        self._distill_candidates = cands  # texts: one list (batch) or one per example
        return cands, cand_vecs, label_inds

    def train_step(self, batch):
        if not self._distilling:
            return super().train_step(batch)
        if self.distiller is None:
            self._distill_holder["scorer"] = self.build_distiller(self.opt)
        label_loss = self.criterion

        def mixed_loss(scores, label_inds):
            return self.distilled_loss(batch, scores, label_inds, label_loss)

        self.criterion = mixed_loss
        try:
            return super().train_step(batch)
        finally:
            self.criterion = label_loss

    def distilled_loss(self, batch, scores, label_inds, label_loss) -> torch.Tensor:
        """Per-example loss [B] of student ``scores`` [B, N]."""
        teacher, mask = self.distiller.scores(batch[CONTEXT_TEXTS], self._distill_candidates)  # [B, N']
        # with negatives gathered across workers this worker's candidates come first
        student = scores[:, : teacher.size(1)]
        teacher, mask = teacher.to(scores.device), mask.to(scores.device)
        opt = self.opt
        distill = distill_loss(opt["distill_loss"], student, teacher, mask, label_inds, opt["distill_temperature"])
        self.record_local_metric("distill_loss", AverageMetric.many(distill.detach()))
        self.record_local_metric("teacher_top1", AverageMetric.many(top1_agreement(student, teacher, mask)))
        weight = opt["distill_weight"]
        if weight >= 1:
            return distill  # the labels take no part at all
        labels = label_loss(scores, label_inds)
        self.record_local_metric("label_loss", AverageMetric.many(labels.detach()))
        return (1 - weight) * labels + weight * distill


def top1_agreement(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] 1.0 where the student's and the teacher's best real candidate are the same."""
    low = float("-inf")
    best_student = student.detach().masked_fill(~mask, low).argmax(-1)
    return (best_student == teacher.masked_fill(~mask, low).argmax(-1)).float()
