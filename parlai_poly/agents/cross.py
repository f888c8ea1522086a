"""The cross-encoder agent: ``-m parlai_poly.agents:cross``.

Every (context, candidate) pair is one forward pass, so candidates cannot be cached; unlike
ParlAI's own cross-encoder it scores inline, batch (each context against every label of the
batch) and fixed candidates (in chunks of pairs).
"""
import os

import torch
from torch import nn
from parlai.core.opt import Opt
from parlai.core.params import ParlaiParser
from parlai.utils import logging
from parlai.utils.data import DatatypeHelper

from ..backbone import load_config
from ..candidate_file import read_candidate_file
from ..candidate_store import CandidateVectors
from ..errors import ModelFileError, ParlaiPolyError
from ..model_file import is_safetensors, load_weights, read_metadata
from ..modules import CrossEncoderConfig
from ..modules.cross_encoder import CROSS_HEADS, pair_lengths, score_pairs
from .. import ranking
from .base import PAD_SCORE, HuggingFaceRankerAgent, read_json_opt
from .cascade import RetrieveAndRerank, add_retrieve_args, check_retrieve_options


def check_hard_negative_options(opt: Opt) -> None:
    """--hard-negatives needs a retriever to choose them and a pool to choose from."""
    if opt.get("hard_negatives", 0) < 0 or opt.get("hard_negatives_pool", 1) < 1:
        raise ParlaiPolyError(
            f"--hard-negatives {opt.get('hard_negatives')} --hard-negatives-pool {opt.get('hard_negatives_pool')}: "
            "the first must be at least 0, the second at least 1."
        )
    if opt.get("hard_negatives", 0) > 0 and not opt.get("retrieve_model_file"):
        raise ParlaiPolyError(
            f"--hard-negatives {opt['hard_negatives']} needs --retrieve-model-file: the bi-encoder "
            "that picks them from the fixed candidates (--fixed-candidates-path, or the task's "
            "train labels)."
        )
    if opt.get("hard_negatives", 0) >= opt.get("hard_negatives_pool", 63):
        raise ParlaiPolyError(
            f"--hard-negatives {opt['hard_negatives']} of --hard-negatives-pool "
            f"{opt['hard_negatives_pool']}: choose fewer than the pool holds, or draw a larger pool."
        )


class CrossEncoderAgent(HuggingFaceRankerAgent):
    agent_name = "cross"
    config_class = CrossEncoderConfig
    default_reduction = "first"

    @classmethod
    def add_cmdline_args(cls, parser: ParlaiParser, partial_opt: Opt = None) -> ParlaiParser:
        super().add_cmdline_args(parser, partial_opt=partial_opt)
        group = parser.add_argument_group("Cross-encoder")
        group.add_argument(
            "--cross-pairs-per-pass",
            type=int,
            default=256,
            help="How many (context, candidate) pairs go through the encoder at once.",
        )
        group.add_argument(
            "--cross-candidate-start",
            type="bool",
            default=False,
            help="Keep each candidate's start token in a pair, as ParlAI's transformer/"
            "crossencoder does (parlai_poly.migrate sets it for the models it converts).",
        )
        group.add_argument(
            "--cross-head",
            choices=CROSS_HEADS,
            default="linear",
            help="linear: a linear layer on the --reduction-type of the pair's outputs (the "
            "paper's, starts at chance). segment-cosine: a learned scale times the cosine of "
            "the mean outputs over the context and over the candidate, which starts from what "
            "a mean-pooled bi-encoder backbone such as MiniLM already ranks well. reader: "
            "segment-cosine of the two texts read apart (exactly the bi-encoder given with "
            "--init-model), plus a linear term, starting at 0, on one more token that reads "
            "both texts in every layer and that no other token reads. residual: the score of "
            "the bi-encoder given with --init-model, frozen, plus a linear term, starting at 0, "
            "on the mean outputs of the pair read with full attention: reading across can only "
            "add to the bi-encoder's score.",
        )
        group.add_argument(
            "--cross-segment-attention-bias",
            type=float,
            default=None,
            help="Read the pair as the bi-encoder reads its two texts, joined only by attention "
            "across them, whose logits get a learned per-head bias starting at this value "
            "(-8: start as a bi-encoder, e.g. one given with --init-model, and learn how much to "
            "read across). Needs --cross-head segment-cosine. Unset: plain full attention.",
        )
        group.add_argument(
            "--cross-segment-gate",
            type=float,
            default=None,
            help="Read the pair as two texts, as --cross-segment-attention-bias does, but add "
            "each token's attention over the other text to its attention over its own, times a "
            "learned gate per layer and head starting at this value (0: start exactly as the "
            "bi-encoder given with --init-model, with a full gradient to open it). Needs "
            "--cross-head segment-cosine; not with --cross-segment-attention-bias.",
        )
        negatives = parser.add_argument_group("Training negatives")
        negatives.add_argument(
            "--hard-negatives",
            type=int,
            default=0,
            help="In training, pair each context with its label and the K fixed candidates, of "
            "--hard-negatives-pool drawn at random, that the bi-encoder --retrieve-model-file "
            "scores highest (never the label itself), instead of the batch's other labels: the "
            "confusions a bi-encoder makes among random candidates, where a cross-encoder "
            "started from it can improve on it. 0: the --candidates of training as set.",
        )
        negatives.add_argument(
            "--hard-negatives-pool",
            type=int,
            default=63,
            help="How many fixed candidates are drawn at random for each example for "
            "--hard-negatives to choose from.",
        )
        retrieve = parser.add_argument_group("Retrieve, then cross-encode (fixed candidates)")
        # only the retrieved are read: a large response set answers in a fraction of a second
        add_retrieve_args(retrieve, "this cross-encoder then orders, one pass per pair", top_k=20)
        parser.set_defaults(encode_candidate_vecs=False)
        return parser

    def check_options(self, opt: Opt):
        super().check_options(opt)
        if opt.get("encode_candidate_vecs"):
            raise ParlaiPolyError(
                "--encode-candidate-vecs true: a cross-encoder reads each candidate together "
                "with its context, so there is nothing to encode ahead. Leave it false (the "
                "default), or use -m parlai_poly.agents:poly or :bi for cached candidates."
            )
        modes = (opt.get("candidates"), opt.get("eval_candidates"), opt.get("interactive_candidates"))
        if "vocab" in modes:
            raise ParlaiPolyError(
                "vocab candidates with the cross-encoder would run one full forward pass per "
                "token of the vocabulary; use fixed, inline or batch candidates."
            )
        given = opt.get("override") or {}
        if opt.get("cross_head") in ("segment-cosine", "reader", "residual") and "reduction_type" in given:
            raise ParlaiPolyError(
                f"--reduction-type {given['reduction_type']} with --cross-head {opt['cross_head']}: "
                "that head always takes the mean outputs over the context and over the candidate, "
                "so the option would be ignored. Leave it out, or use --cross-head linear."
            )
        check_retrieve_options(opt)
        check_hard_negative_options(opt)
        max_positions = load_config(opt.get("hf_model"), opt.get("hf_config")).max_position_embeddings
        # ParlAI's layout: its truncation is kept as is, and a pair that does not fit is
        # refused when met (score_pairs), as ParlAI's own agent cannot score it either
        parlai_layout = opt.get("cross_candidate_start")
        if opt["text_truncate"] + opt["label_truncate"] - 1 > max_positions and not parlai_layout:
            raise ParlaiPolyError(
                f"--text-truncate {opt['text_truncate']} + --label-truncate "
                f"{opt['label_truncate']}: a pair would exceed the backbone's {max_positions} "
                "positions; lower one of them."
            )

    def set_fixed_candidates(self, shared):
        """Fixed candidates are tokenized from their file each run: a cross-encoder has no
        encodings to cache, and ParlAI's pickled vectors, keyed by file name, go stale."""
        hard_negatives = self.opt.get("hard_negatives", 0) > 0 and DatatypeHelper.is_training(self.opt["datatype"])
        wanted = "fixed" in (self.candidates, self.eval_candidates) or hard_negatives
        if shared or not wanted:
            return super().set_fixed_candidates(shared)
        path = self.fixed_candidates_path or self.get_task_candidates_path()
        self.fixed_candidates_path = path
        self.fixed_candidates = read_candidate_file(path)
        self.num_fixed_candidates = len(self.fixed_candidates)
        vectors = CandidateVectors.from_texts(self.fixed_candidates, self.vectorize_fixed_candidates)
        vecs = vectors.padded(self.NULL_IDX).long()
        self.fixed_candidate_vecs = vecs.cuda() if self.use_cuda else vecs
        self.fixed_candidate_encs = None

    def load(self, path: str):
        """--init-model of a bi- or poly-encoder file: start from its context encoder."""
        other_agent = read_metadata(path).get("agent") if is_safetensors(path) else None
        if other_agent not in ("bi", "poly"):
            return super().load(path)
        weights = load_weights(path, other_agent)
        encoder = {k: v for k, v in weights.items() if k.startswith("context_encoder.")}
        state = self.unwrapped_model.state_dict()
        missing = [k for k in state if k.startswith("encoder.") and "context_" + k not in encoder]
        if missing:
            raise ModelFileError(
                f"{path}: its context encoder does not fit this cross-encoder's backbone (no "
                f"{missing[0]}); use the backbone options it was trained with ({path}.opt)."
            )
        state.update({k: encoder["context_" + k] for k in state if k.startswith("encoder.")})
        if self.opt.get("cross_head") == "residual":
            state.update(self.residual_prior(path, other_agent, encoder))
        self.unwrapped_model.load_state_dict(state)
        logging.info(f"--init-model {path}: cross-encoder initialized from its context encoder")
        return {}  # a new training: none of the other agent's optimizer state applies

    @staticmethod
    def residual_prior(path: str, other_agent: str, context_encoder: dict) -> dict:
        """The residual head's frozen bi-encoder (its weights and scale) from the file ``path``,
        which must score by the cosine of mean outputs, as that head's prior does."""
        bi_opt = read_json_opt(path + ".opt") if os.path.isfile(path + ".opt") else {}
        read_as = (other_agent, bi_opt.get("similarity"), bi_opt.get("reduction_type"), bi_opt.get("candidate_mlp"))
        if read_as != ("bi", "cosine", "mean", False):
            raise ModelFileError(
                f"--cross-head residual --init-model {path}: the residual head keeps the score of a "
                "bi-encoder trained with --similarity cosine --reduction-type mean (and no "
                f"--candidate-mlp), as its prior; this file is a {other_agent}-encoder read as "
                f"{read_as[1:]} ({path}.opt). Start from such a bi-encoder, or use another --cross-head."
            )
        prior = {"prior_" + k[len("context_"):]: v for k, v in context_encoder.items()}
        prior["prior_scale"] = torch.tensor(float(bi_opt["similarity_scale"]))
        return prior

    def _build_candidates(self, batch, source, mode):
        """With --hard-negatives in training: each example's label (index 0) and its hard
        negatives [B, 1 + K, L]; else as set."""
        if mode != "train" or self.opt.get("hard_negatives", 0) <= 0:
            return super()._build_candidates(batch, source, mode)
        if batch.label_vec is None:
            raise ParlaiPolyError("--hard-negatives: training examples need labels.")
        negatives = self.retriever().hardest_of_random(
            batch.text_vec, self.opt["hard_negatives_pool"], self.opt["hard_negatives"], self.label_indices(batch.labels)
        )  # [B, K]
        fixed = self.fixed_candidate_vecs.to(batch.label_vec.device)
        rows = [batch.label_vec[:, None, :], fixed[negatives]]  # [B, 1, Ll], [B, K, Lf]
        width = max(r.size(-1) for r in rows)
        cand_vecs = torch.cat([nn.functional.pad(r, (0, width - r.size(-1)), value=self.NULL_IDX) for r in rows], 1)
        cands = [[label] + [self.fixed_candidates[i] for i in row] for label, row in zip(batch.labels, negatives.tolist())]
        label_inds = torch.zeros(len(cands), dtype=torch.long, device=cand_vecs.device)
        return self.remember_candidates(cands, cand_vecs, label_inds)

    def retriever(self) -> RetrieveAndRerank:
        """The --retrieve-model-file bi-encoder over this agent's fixed candidates, loaded once."""
        if getattr(self, "_retriever", None) is None:
            self._retriever = RetrieveAndRerank(self)
        return self._retriever

    def label_indices(self, labels) -> torch.Tensor:
        """[B] the index of each label among the fixed candidates, -1 where it is not one."""
        if getattr(self, "_fixed_index", None) is None:
            self._fixed_index = {text: i for i, text in enumerate(self.fixed_candidates)}
        return torch.tensor([self._fixed_index.get(label, -1) for label in labels])

    def score_batch(self, batch, cand_vecs, cand_encs=None):
        """Pairs each context with its candidates: [B, C, L] per example, [N, L] shared;
        with --retrieve-model-file, fixed candidates through the retriever first."""
        if self.retrieves(cand_vecs):
            top, below = self.retriever().retrieve(batch)  # [B, K], [B, N]: this agent reranks
            top = ranking.rerank_head(top, lambda head: self.score_head(batch.text_vec, cand_vecs, head))
            return ranking.cascade_scores(top, below)
        context = batch.text_vec  # [B, T]
        bsz, device = context.size(0), context.device
        if cand_vecs.dim() == 3:
            per_example = cand_vecs.size(1)
            flat = cand_vecs.reshape(-1, cand_vecs.size(-1))  # [B*C, L]
            context_index = torch.arange(bsz, device=device).repeat_interleave(per_example)
            cand_index = torch.arange(flat.size(0), device=device)
        else:
            per_example = cand_vecs.size(0)
            flat = cand_vecs
            context_index = torch.arange(bsz, device=device).repeat_interleave(per_example)
            cand_index = torch.arange(per_example, device=device).repeat(bsz)
        real = (flat[cand_index] != self.NULL_IDX).any(-1)  # skip padding candidates
        scores = torch.full((cand_index.size(0),), PAD_SCORE, device=device)
        scores = scores.masked_scatter(real, self.score_pairs(context, flat, context_index[real], cand_index[real]))
        return scores.view(bsz, per_example)

    def retrieves(self, cand_vecs) -> bool:
        """Whether these candidates go through --retrieve-model-file: the fixed ones, in eval."""
        return (
            bool(self.opt.get("retrieve_model_file"))
            and not self.model.training
            and self.eval_candidates == "fixed"
            and cand_vecs is self.fixed_candidate_vecs
        )

    def score_head(self, context, cands, head):
        """Scores [B, k] of each context [B, T] with its candidates ``head`` [B, k] of ``cands``."""
        bsz, k = head.shape
        context_index = torch.arange(bsz, device=head.device).repeat_interleave(k)
        return self.score_pairs(context, cands, context_index, head.reshape(-1)).view(bsz, k)

    def score_pairs(self, context, cands, context_index, cand_index):
        """Scores [P] of the pairs, computed longest first so each pass pads little."""
        two_texts = self.unwrapped_model.two_texts  # [CLS] per text
        keep_start = self.opt.get("cross_candidate_start", False) or two_texts
        self.check_pair_lengths(pair_lengths(context, cands, context_index, cand_index, self.NULL_IDX), keep_start)
        if self.model.training:
            per_pass = self.training_pairs_per_pass(len(cand_index))
        else:
            per_pass = self.opt["cross_pairs_per_pass"]
        return score_pairs(self.model, context, cands, context_index, cand_index, self.NULL_IDX, keep_start, per_pass)

    def training_pairs_per_pass(self, num_pairs: int):
        """Training keeps every pass's activations for backward anyway, so passes only cut
        padding: --length-groups passes of similar length (score_pairs sorts them). A
        distributed model must see one forward per step: one pass then (None), through
        self.model, the wrapper."""
        groups = self.opt.get("length_groups", 1)
        if groups <= 1 or self.model is not self.unwrapped_model:
            return None
        return -(-num_pairs // groups)  # ceil: at most ``groups`` passes

    def check_pair_lengths(self, lengths, keep_start):
        """Pairs [P] longer than the backbone's positions would fail deep inside it."""
        if not len(lengths):
            return
        longest = int(lengths.max()) - (0 if keep_start else 1)
        max_positions = self.unwrapped_model.encoder.max_positions
        if longest > max_positions:
            raise ParlaiPolyError(
                f"A (context, candidate) pair of {longest} tokens exceeds the model's "
                f"{max_positions} positions (ParlAI's own cross-encoder cannot score it either); "
                "lower --text-truncate or --label-truncate so that they add up to at most that."
            )
