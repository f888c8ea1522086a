"""The poly-encoder agent: ``-m parlai_poly.agents:poly``.

Options mirror ParlAI's transformer/polyencoder so its users find them where they expect.
"""
from parlai.core.opt import Opt
from parlai.core.params import ParlaiParser

from ..errors import ParlaiPolyError
from ..modules import PolyEncoderModule
from ..modules.attention import ATTENTION_TYPES
from ..modules.poly_encoder import POLY_TYPES
from .cached_candidates import CachedCandidateAgent
from .cascade import RetrieveAndRerank


class PolyEncoderAgent(CachedCandidateAgent):
    agent_name = "poly"

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
        cascade = parser.add_argument_group("Retrieve and rerank (fixed candidates)")
        cascade.add_argument(
            "--retrieve-model-file",
            type=str,
            default=None,
            help="A bi-encoder model file: it picks --retrieve-top-k fixed candidates, which "
            "this poly-encoder then orders.",
        )
        cascade.add_argument("--retrieve-top-k", type=int, default=100)
        cascade.add_argument(
            "--rerank-model-file",
            type=str,
            default=None,
            help="A cross-encoder model file: it reorders the poly-encoder's --rerank-top-k best.",
        )
        cascade.add_argument("--rerank-top-k", type=int, default=10)
        return parser

    def check_options(self, opt: Opt):
        super().check_options(opt)
        if opt["poly_n_codes"] < 1:
            raise ParlaiPolyError(
                f"--poly-n-codes {opt['poly_n_codes']}: the poly-encoder needs at least 1 code "
                "(the paper uses 16, 64 or 360)."
            )

    def build_model(self):
        context, candidate = self.build_encoders()
        opt = self.opt
        return PolyEncoderModule(
            context,
            candidate,
            poly_type=opt["polyencoder_type"],
            n_codes=opt["poly_n_codes"],
            codes_attention=opt["codes_attention_type"],
            codes_heads=opt["codes_attention_num_heads"],
            poly_attention=opt["poly_attention_type"],
            poly_heads=opt["poly_attention_num_heads"],
            reduction=opt["reduction_type"],
            first_m=opt["reduction_first_m"],
        )

    def score_batch(self, batch, cand_vecs, cand_encs=None):
        cascade = self.opt.get("retrieve_model_file") and self.eval_candidates == "fixed"
        if cascade and cand_encs is not None and not self.model.training:
            if getattr(self, "_cascade", None) is None:
                self._cascade = RetrieveAndRerank(self)
            return self._cascade.scores(self, batch, cand_encs)
        return super().score_batch(batch, cand_vecs, cand_encs)
