"""The poly-encoder agent: ``-m parlai_poly.agents:poly``.

Options mirror ParlAI's transformer/polyencoder so its users find them where they expect.
"""
import weakref

import torch
from parlai.core.metrics import AverageMetric
from parlai.core.opt import Opt
from parlai.core.params import ParlaiParser

from ..errors import ParlaiPolyError
from ..modules import PolyEncoderConfig
from ..modules.attention import ATTENTION_TYPES
from ..modules.poly_encoder import CODES_INITS, POLY_TYPES
from ..modules.stored import StoredCandidates
from ..precision import BF16_AUTO_MIN_CANDIDATES, bfloat16_pays
from .dual_encoder import DualEncoderAgent
from .cascade import RetrieveAndRerank, add_retrieve_args, check_retrieve_options

SCORE_DTYPES = ("auto", "float32", "bfloat16")


class PolyEncoderAgent(DualEncoderAgent):
    agent_name = "poly"
    config_class = PolyEncoderConfig

    @classmethod
    def add_cmdline_args(cls, parser: ParlaiParser, partial_opt: Opt = None) -> ParlaiParser:
        super().add_cmdline_args(parser, partial_opt=partial_opt)
        group = parser.add_argument_group("Poly-encoder")
        group.add_argument(
            "--polyencoder-type",
            type=str,
            default="codes",
            choices=POLY_TYPES,
            help="codes: m learned codes attend over the context; n_first: its first m outputs.",
        )
        group.add_argument("--poly-n-codes", type=int, default=64, help="m, the number of context vectors.")
        group.add_argument(
            "--codes-attention-type",
            type=str,
            default="basic",
            choices=ATTENTION_TYPES,
            help="How the codes attend over the context's outputs.",
        )
        group.add_argument("--codes-attention-num-heads", type=int, default=4)
        group.add_argument(
            "--poly-attention-type",
            type=str,
            default="basic",
            choices=ATTENTION_TYPES,
            help="How each candidate attends over the m context vectors.",
        )
        group.add_argument("--poly-attention-num-heads", type=int, default=4)
        group.add_argument(
            "--codes-init",
            type=str,
            default="normal",
            choices=CODES_INITS,
            help="How the codes start: normal N(0, 0.02^2) (attention uniform at first: every "
            "context vector is the mean-pooled one), uniform U[0, 1) (ParlAI's), orthogonal "
            "(orthonormal rows times --codes-init-scale). Every run logs codes_cos (mean "
            "cosine between the m context vectors; 1 = a bi-encoder) and codes_entropy "
            "(codes' attention entropy, 1 = uniform).",
        )
        group.add_argument(
            "--codes-init-scale",
            type=float,
            default=None,
            help="The scale of --codes-init: std for normal (0.02), upper bound for uniform "
            "(1), row norm for orthogonal (1).",
        )
        group.add_argument(
            "--codes-lr-multiplier",
            type=float,
            default=1.0,
            help="The poly-encoder's own parameters (codes and attention layers, which start "
            "from scratch while the backbone is pretrained) learn at --learningrate times this.",
        )
        scoring = parser.add_argument_group("Poly-encoder scoring of cached candidates")
        scoring.add_argument(
            "--score-dtype",
            type=str,
            default="auto",
            choices=SCORE_DTYPES,
            help="Precision of the products between context vectors and cached candidates that "
            "are kept in float32 (vocab candidates, or fixed ones with --candidate-store-dtype "
            "float32). bfloat16 keeps a bfloat16 copy of them in memory and runs the products in "
            "it (softmax and sums in float32), then scores each context's --rescore-top-k best "
            "again in float32. auto (the default): fixed candidates as their store keeps them; "
            f"vocab candidates in bfloat16 from {BF16_AUTO_MIN_CANDIDATES:,} on a CPU whose "
            "bfloat16 products are timed faster than float32's (as for --precision auto), "
            "float32 elsewhere.",
        )
        scoring.add_argument(
            "--bf16-rescore-top-k",
            type=int,
            default=None,
            help="Deprecated: --rescore-top-k (which it sets when given).",
        )
        cascade = parser.add_argument_group("Retrieve and rerank (fixed candidates)")
        add_retrieve_args(cascade, "this poly-encoder then orders", top_k=100)
        cascade.add_argument(
            "--rerank-model-file",
            type=str,
            default=None,
            help="A cross-encoder model file: it reorders the poly-encoder's --rerank-top-k best.",
        )
        cascade.add_argument("--rerank-top-k", type=int, default=10)
        return parser

    @classmethod
    def upgrade_opt(cls, opt_from_disk: Opt):
        """Files saved before --rescore-top-k hold --bf16-rescore-top-k's old default, 100, which
        would cap the rescoring for good: left out, as it was never asked for."""
        opt_from_disk = super().upgrade_opt(opt_from_disk)
        if "rescore_top_k" not in opt_from_disk and opt_from_disk.get("bf16_rescore_top_k") == 100:
            opt_from_disk["bf16_rescore_top_k"] = None
        return opt_from_disk

    def check_options(self, opt: Opt):
        super().check_options(opt)
        if opt.get("codes_lr_multiplier", 1.0) <= 0:
            raise ParlaiPolyError(
                f"--codes-lr-multiplier {opt['codes_lr_multiplier']}: give a positive factor "
                "(1: the codes learn at --learningrate)."
            )
        if (opt.get("bf16_rescore_top_k") or 0) < 0:
            raise ParlaiPolyError(
                f"--bf16-rescore-top-k {opt['bf16_rescore_top_k']}: give 0 (no float32 "
                "rescoring) or the number of top candidates to score again (or use --rescore-top-k)."
            )
        check_retrieve_options(opt)

    def init_optim(self, params, optim_states=None, saved_optim_type=None, is_finetune=False):
        """ParlAI's optimizer, with the poly-encoder's own parameters in a second group at
        --learningrate x --codes-lr-multiplier (ParlAI's schedulers scale every group)."""
        multiplier = self.opt.get("codes_lr_multiplier", 1.0)
        if multiplier != 1.0:
            own = {id(p) for p in self.unwrapped_model.poly_parameters()}
            params = list(params)
            params = [
                {"params": [p for p in params if id(p) not in own]},
                {"params": [p for p in params if id(p) in own], "lr": self.opt["learningrate"] * multiplier},
            ]
        return super().init_optim(params, optim_states, saved_optim_type, is_finetune=is_finetune)

    # ---- bfloat16 scoring of cached candidates -----------------------------------------
    def low_precision_copy(self, cands):
        """The candidate store's compact copy (``DualEncoderAgent``), else with --score-dtype
        a bfloat16 copy of float32 cached candidates (``_bfloat16_copy``)."""
        return super().low_precision_copy(cands) or self._bfloat16_copy(cands)

    def _bfloat16_copy(self, cands):
        """A bfloat16 copy of shared cached candidates [N, d], made once per tensor; None
        where float32 scoring applies (the option, training, few or per-example candidates,
        and with --score-dtype auto the fixed candidates: their store's dtype decides)."""
        if self.model.training or cands.dim() != 2 or cands.dtype != torch.float32:
            return None
        auto = self.opt.get("score_dtype", "auto") == "auto"
        if auto and self._fixed is not None and self._fixed.holds(cands):
            return None
        if self._score_dtype(cands.size(0)) != torch.bfloat16 or cands.size(0) <= self.rescore_top_k():
            return None  # float32 asked for, or every candidate would be rescored anyway
        source, copy = getattr(self, "_bf16_cache", (None, None))
        if source is None or source() is not cands:
            copy = StoredCandidates(cands.to(torch.bfloat16))  # [N, d]; keyed weakly, so old encodings can go
            self._bf16_cache = (weakref.ref(cands), copy)
        return copy

    def _score_dtype(self, num_candidates: int):
        setting = self.opt.get("score_dtype", "auto")
        if setting == "auto":
            setting = "bfloat16" if bfloat16_pays(num_candidates, self.use_cuda) else "float32"
        return torch.bfloat16 if setting == "bfloat16" else torch.float32

    def score_batch(self, batch, cand_vecs, cand_encs=None):
        cascade = self.opt.get("retrieve_model_file") and self.eval_candidates == "fixed"
        if cascade and cand_encs is not None and not self.model.training:
            if getattr(self, "_cascade", None) is None:
                self._cascade = RetrieveAndRerank(self)
            return self._cascade.scores(self, batch, cand_encs)
        scores = super().score_batch(batch, cand_vecs, cand_encs)
        for name, values in self.unwrapped_model.last_codes_stats.items():
            self.record_local_metric(name, AverageMetric.many(values.tolist()))
        self.unwrapped_model.last_codes_stats = {}
        return scores
