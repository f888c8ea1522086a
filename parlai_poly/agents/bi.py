"""The bi-encoder agent: ``-m parlai_poly.agents:bi``."""
from parlai.core.opt import Opt
from parlai.core.params import ParlaiParser

from ..candidate_store import module_sha256
from ..modules import BiEncoderModule
from .cached_candidates import CachedCandidateAgent


class BiEncoderAgent(CachedCandidateAgent):
    agent_name = "bi"

    @classmethod
    def add_cmdline_args(cls, parser: ParlaiParser, partial_opt: Opt = None) -> ParlaiParser:
        super().add_cmdline_args(parser, partial_opt=partial_opt)
        parser.add_argument_group("Bi-encoder").add_argument(
            "--candidate-mlp",
            type="bool",
            default=False,
            help="Pass candidate vectors through Linear-ReLU-Linear, as ParlAI's transformer/"
            "biencoder does with --share-encoders true (parlai_poly.migrate sets it).",
        )
        return parser

    def build_model(self):
        context, candidate = self.build_encoders()
        opt = self.opt
        return BiEncoderModule(
            context, candidate, opt["reduction_type"], opt["reduction_first_m"], opt.get("candidate_mlp", False)
        )

    def candidate_cache_key(self, path: str) -> dict:
        key = super().candidate_cache_key(path)
        mlp = self.unwrapped_model.candidate_mlp
        if mlp is not None:  # part of every candidate's encoding
            key["candidate_mlp_sha256"] = module_sha256(mlp)
        return key
