"""Agents whose candidates are encoded apart from the context (bi and poly).

Their candidate vectors can be computed once and cached (--encode-candidate-vecs true, the
default). Fixed candidates (--eval-candidates fixed, and interactive mode) are a
``FixedCandidates`` (``fixed_candidates.py``): encoded through a checked cache beside the
model file, where ParlAI keeps pickles keyed by file name only.

Three more things differ from TorchRankerAgent:
- cached encodings are dropped once the model trains (ParlAI keeps using the encodings made
  before training in shared copies, and with --candidates fixed);
- an agent that is about to train encodes fixed candidates when first evaluating, not at
  start-up with weights that are about to change;
- ranking keeps only the top predictions it shows (torch.topk instead of a full sort of
  every candidate), while rank and MRR are computed from the full scores;
- fixed candidates can be kept and scored in bfloat16 or int8 (--candidate-store-dtype), each
  context's top --rescore-top-k scored again from their float32 encodings.
"""

from typing import Optional

import torch
from parlai.core.metrics import AverageMetric
from parlai.core.opt import Opt
from parlai.core.params import ParlaiParser
from parlai.utils import logging
from parlai.utils.data import DatatypeHelper

from .. import precision, ranking
from ..candidate_store import CandidateVectors, encode_sorted
from ..encoding_memo import EncodingMemo
from ..errors import ParlaiPolyError
from ..modules.config import SIMILARITIES
from ..modules.stored import rescore_top
from .base import RECALL_AT, HuggingFaceRankerAgent
from .fixed_candidates import FixedCandidates

UPDATES = "_parlai_poly_updates"  # attribute on the (shared) model: training steps taken


class DualEncoderAgent(HuggingFaceRankerAgent):
    @classmethod
    def add_cmdline_args(cls, parser: ParlaiParser, partial_opt: Opt = None) -> ParlaiParser:
        super().add_cmdline_args(parser, partial_opt=partial_opt)
        group = parser.add_argument_group("parlai-poly dual encoder")
        group.add_argument(
            "--share-encoders",
            type="bool",
            default=True,
            help="One encoder for context and candidates; false: two, from the same weights.",
        )
        group.add_argument(
            "--similarity",
            type=str,
            default="dot",
            choices=SIMILARITIES,
            help="How a context vector and a candidate vector are compared. dot: their dot "
            "product, the Poly-encoder paper's. cosine: their cosine times --similarity-scale, "
            "as sentence-transformers' MultipleNegativesRankingLoss trains; cached candidates "
            "are then unit vectors.",
        )
        group.add_argument(
            "--similarity-scale",
            type=float,
            default=20.0,
            help="With --similarity cosine, what the cosines are multiplied by before the "
            "softmax over candidates (MultipleNegativesRankingLoss's scale: 20).",
        )
        group.add_argument(
            "--candidate-cache-dir",
            type=str,
            default=None,
            help="Where encoded fixed candidates are cached (safetensors + JSON manifest). "
            "Default: beside the model file; with no model file either, they are encoded in "
            "memory every run. The cache is reused only while the candidate file, the weights "
            "and the encoding options are unchanged; --fixed-candidate-vecs replace rebuilds it.",
        )
        group.add_argument(
            "--candidate-store-dtype",
            type=str,
            default="auto",
            choices=precision.STORE_DTYPES,
            help="How cached fixed candidates are kept and scored: float32; bfloat16 (half the "
            "bytes read per context); int8 with per-vector scales (a quarter; scores move more). "
            "bfloat16 and int8 stores also keep the float32 encodings on disk, memory-mapped, and "
            "each context's --rescore-top-k best are scored again from them. auto (the default): "
            f"bfloat16 from {precision.BF16_AUTO_MIN_CANDIDATES:,} candidates on a CPU whose "
            "bfloat16 products are timed faster than float32's (as for --precision auto), "
            "float32 elsewhere. Changing it converts the cache without encoding again.",
        )
        group.add_argument(
            "--rescore-top-k",
            type=int,
            default=-1,
            help="With a bfloat16 or int8 candidate store (and the poly-encoder's --score-dtype "
            "bfloat16), each context's best this many candidates are scored again in float32, so "
            "the ranking shown is float32's. -1 (the default): as many as the ranking shows "
            "(--rank-top-k, else --cap-num-predictions; at least 10, for R@10); 0: none.",
        )
        return parser

    def check_options(self, opt: Opt):
        super().check_options(opt)
        if opt.get("rescore_top_k", -1) < -1:
            raise ParlaiPolyError(
                f"--rescore-top-k {opt['rescore_top_k']}: give -1 (as many as the ranking shows), "
                "0 (no float32 rescoring) or the number of top candidates to score again."
            )
        if (opt.get("candidate_store_dtype") or "auto") not in precision.STORE_DTYPES:
            raise ParlaiPolyError(
                f"--candidate-store-dtype {opt['candidate_store_dtype']}: choose one of "
                f"{', '.join(precision.STORE_DTYPES)}."
            )

    def encode_candidates(self, padded_cands: torch.Tensor) -> torch.Tensor:
        """[N, L] -> [N, d]; TorchRankerAgent calls this to cache fixed candidates."""
        return self.unwrapped_model.encode_candidates(padded_cands.long())

    def encode_candidate_batch(self, cand_vecs: torch.Tensor) -> torch.Tensor:
        """[N, L] -> [N, d] or [B, C, L] -> [B, C, d] (evaluation only).

        Through the encoding memo: a candidate seen before under the same weights (the same
        response among many examples' inline candidates) is not encoded again.
        """
        shape = cand_vecs.shape
        if getattr(self, "_encoding_memo", None) is None:
            self._encoding_memo = EncodingMemo()
        encs = self._encoding_memo.encode(
            cand_vecs.reshape(-1, shape[-1]),
            self.NULL_IDX,
            self._encode_ids,
            self.opt.get("encode_candidate_vecs_batchsize", 256),
            self._weights_version(),
        )
        return encs.to(cand_vecs.device).view(*shape[:-1], -1)

    def score_batch(self, batch, cand_vecs, cand_encs=None):
        if self.model.training:
            # one forward through the (maybe distributed) model: gradients sync only so;
            # batch candidates then include every worker's labels as negatives
            gather = self.candidates == "batch" and cand_vecs.dim() == 2
            return self.model(batch.text_vec, cand_vecs.long(), gather_negatives=gather)
        context = self.unwrapped_model.encode_context(batch.text_vec)
        cands = cand_encs if cand_encs is not None else self.encode_candidate_batch(cand_vecs)
        return self.score_encoded(context, cands)

    def score_encoded(self, context, cands) -> torch.Tensor:
        """Scores [B, N] of what encode_context gave against encoded candidates.

        Cached candidates with a compact copy (``low_precision_copy``) are scored from it,
        then each context's top ``rescore_top_k()`` again from the float32 ``cands``.
        """
        model = self.unwrapped_model
        fast = self.low_precision_copy(cands)
        if fast is None:
            return model.score_encoded(context, cands)
        scores = model.score_encoded(context, fast)
        return rescore_top(scores, lambda top: model.score_encoded(context, top), cands, self.rescore_top_k())

    def low_precision_copy(self, cands):
        """The bfloat16 or int8 copy to score ``cands`` [N, d] from: the candidate store's,
        when they are its fixed candidates; None for float32 scoring (a float32 store,
        training, other candidates, or no more candidates than are rescored anyway)."""
        if self.model.training or self._fixed is None:
            return None
        stored = self._fixed.stored_for(cands)
        if stored is None or len(stored) <= self.rescore_top_k():
            return None
        return stored

    def rescore_top_k(self) -> int:
        """How many of each context's best candidates a bfloat16 or int8 pass scores again
        in float32: --rescore-top-k, or by default as many as the ranking shows (eval_step's
        top k, else --cap-num-predictions; a full sort shows them all, rescored or not) and at
        least R@k's largest k, so the predictions, their scores and hits@k read float32's."""
        k = self.opt.get("rescore_top_k", -1)
        if k is not None and k >= 0:
            return k
        legacy = self.opt.get("bf16_rescore_top_k")  # the poly-encoder's earlier option
        if legacy is not None:
            return legacy
        shown = self.rank_top_k if self.rank_top_k > 0 else self.opt.get("cap_num_predictions", 100)
        return max(shown, max(RECALL_AT))

    # ---- fixed candidates through the candidate store ---------------------------------
    def _weights_version(self) -> int:
        return getattr(self.model, UPDATES, 0)

    def _is_training_agent(self) -> bool:
        if self.opt.get("interactive_mode"):
            return False
        return DatatypeHelper.is_training(self.opt.get("datatype") or "train")

    def set_fixed_candidates(self, shared):
        self._fixed: Optional[FixedCandidates] = None
        if shared:
            super().set_fixed_candidates(shared)
            self._fixed = shared.get("parlai_poly_fixed")
            self._fixed_encs_version = shared.get("fixed_encs_version", 0)
            return
        self._fixed_encs_version = self._weights_version()
        if "fixed" not in (self.candidates, self.eval_candidates):
            self.fixed_candidates = self.fixed_candidate_vecs = self.fixed_candidate_encs = None
            self.num_fixed_candidates = 0
            return
        setting = self.opt.get("fixed_candidate_vecs") or "reuse"
        if setting not in ("reuse", "replace"):
            raise ParlaiPolyError(
                f"--fixed-candidate-vecs {setting}: parlai-poly never loads pickled candidate "
                "vectors; it keeps its own checked cache (see --candidate-cache-dir). Use "
                "'reuse' (the default) or 'replace' to rebuild that cache."
            )
        fixed = self._fixed = FixedCandidates(self, self._fixed_candidates_file(), rebuild=setting == "replace")
        self.fixed_candidates = fixed.texts
        self.num_fixed_candidates = len(fixed)
        if self.encode_candidate_vecs and not self._is_training_agent():
            vecs, encs = fixed.encoded(self._encode_ids, self._scoring_device())
            self._set_fixed_encs(encs)
        else:
            # about to train: encodings made now would be stale after the first update;
            # eval_step encodes them when first needed (through the store if still untrained)
            vecs = fixed.padded()
            self.fixed_candidate_encs = None
        self.fixed_candidate_vecs = vecs.cuda() if self.use_cuda else vecs

    @property
    def fixed(self) -> Optional[FixedCandidates]:
        """The fixed candidate set, when this agent uses one."""
        return self._fixed

    @property
    def candidate_store(self):
        """The fixed candidates' store (its ``status`` and ``reason`` tell what loading did)."""
        return self._fixed.store if self._fixed is not None else None

    def _fixed_candidates_file(self) -> str:
        """--fixed-candidates-path, or the task's labels ParlAI writes beside the model file."""
        if self.fixed_candidates_path:
            return self.fixed_candidates_path
        if not self.opt.get("model_file"):
            raise ParlaiPolyError(
                "Fixed candidates need --fixed-candidates-path FILE (one candidate per line): "
                "with no model file there is nowhere to build them from the task."
            )
        path = self.get_task_candidates_path()
        logging.info(f"setting fixed_candidates path to: {path}")
        self.fixed_candidates_path = path
        return path

    def _set_fixed_encs(self, encs):
        if self.use_cuda:
            encs = encs.cuda()
        self.fixed_candidate_encs = encs.half() if self.fp16 else encs.float()
        self._fixed_encs_version = self._weights_version()

    def _scoring_device(self) -> Optional[torch.device]:
        """Where cached encodings are scored: the GPU with --no-cuda false, else None (CPU)."""
        return torch.device("cuda") if self.use_cuda else None

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self.use_cuda:
            ids = ids.cuda()
        return self.encode_candidates(ids)

    def _make_candidate_encs(self, vecs):
        """Encodings of ``vecs`` [N, L], sorted by length, under inference mode.

        For the fixed candidates of a model not trained in this process: through the store.
        """
        vocab_encs = getattr(self, "vocab_candidate_encs", None)
        if vecs is getattr(self, "vocab_candidate_vecs", None) and vocab_encs is not None:
            return vocab_encs  # ParlAI's eval_step asks again for vocab candidates
        fixed = vecs is getattr(self, "fixed_candidate_vecs", None) and vecs is not None
        if fixed and self._fixed is not None and self._weights_version() == 0:
            encs = self._fixed.encoded(self._encode_ids, self._scoring_device())[1]
        else:
            cpu = vecs.cpu().to(torch.int32)
            width = cpu.size(1)
            real = cpu != self.NULL_IDX  # right-padded: a row ends after its last real token
            lengths = torch.where(real.any(1), width - real.flip(1).to(torch.int8).argmax(1), 0)
            vectors = CandidateVectors(cpu[torch.arange(width) < lengths.unsqueeze(1)].numpy(), lengths.numpy())
            was_training = self.model.training
            self.model.eval()
            try:
                encs = encode_sorted(
                    vectors,
                    self._encode_ids,
                    self.NULL_IDX,
                    self.opt.get("encode_candidate_vecs_batchsize", 256),
                    lambda d, dtype: torch.empty(len(vectors), d, dtype=dtype),
                    desc=f"Encoding {len(vectors)} candidates",
                )
            finally:
                self.model.train(was_training)
        if fixed:
            self._fixed_encs_version = self._weights_version()
        return encs.to(vecs.device)

    def set_vocab_candidates(self, shared):
        super().set_vocab_candidates(shared)
        self._vocab_encs_version = shared.get("vocab_encs_version", 0) if shared else self._weights_version()

    def share(self):
        shared = super().share()
        shared["parlai_poly_fixed"] = self._fixed  # ParlAI's own "fixed_candidates" is the texts
        shared["fixed_encs_version"] = self._fixed_encs_version
        shared["vocab_encs_version"] = self._vocab_encs_version
        return shared

    def _maybe_invalidate_fixed_encs_cache(self):
        """Called by train_step: the weights are about to change, so are the encodings."""
        setattr(self.model, UPDATES, self._weights_version() + 1)
        self.fixed_candidate_encs = None

    # ---- eval: fresh encodings, top-k ranking, exact rank metrics ---------------------
    def eval_step(self, batch):
        version = self._weights_version()
        if self.fixed_candidate_encs is not None and self._fixed_encs_version != version:
            self.fixed_candidate_encs = None  # made before training: ParlAI's eval_step re-encodes
        if self.vocab_candidate_encs is not None and self._vocab_encs_version != version:
            self.vocab_candidate_encs = None
            encs = self._make_candidate_encs(self.vocab_candidate_vecs)
            self.vocab_candidate_encs = encs.half() if self.fp16 else encs.float()
            self._vocab_encs_version = version
        saved = self.rank_top_k
        self.rank_top_k = self.eval_top_k()
        self._exact_ranks = None
        self._fix_rank_metrics = self.rank_top_k > 0
        try:
            return super().eval_step(batch)
        finally:
            self.rank_top_k = saved
            self._fix_rank_metrics = False

    def eval_top_k(self) -> int:
        """How many candidates eval_step ranks: --rank-top-k if given, else enough for every
        prediction shown (--cap-num-predictions, --topk sampling, plus lines the repeat
        blocking may drop). 0: a full sort, kept when --return-cand-scores asks for all."""
        if self.opt.get("rank_top_k", -1) > 0:
            return self.opt["rank_top_k"]
        if self.opt.get("return_cand_scores", False):
            return 0
        k = max(self.opt.get("cap_num_predictions", 100), 1)
        if self.opt.get("inference", "max") == "topk":
            k = max(k, self.opt.get("topk", 5))
        if self.opt.get("repeat_blocking_heuristic", True) and self.eval_candidates == "fixed":
            k += sum(len(h.split("\n")) for h in self.history.history_raw_strings)
        return k

    def record_local_metric(self, keyname, values):
        if getattr(self, "_fix_rank_metrics", False) and keyname in ("rank", "mrr"):
            values = self.exact_rank_metrics()[keyname]
        super().record_local_metric(keyname, values)

    def exact_rank_metrics(self):
        """rank and MRR from the full score matrix, not from the top-k list (where ParlAI
        would give a label below the top k rank N + 1), ties as ``parlai_poly.ranking`` counts them."""
        if self._exact_ranks is None:
            metrics = ranking.rank_metrics(self._last_scores, self._last_candidates[2], ks=())
            self._exact_ranks = {name: AverageMetric.many(values.tolist()) for name, values in metrics.items()}
        return self._exact_ranks
