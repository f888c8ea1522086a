"""The bi-encoder agent: ``-m parlai_poly.agents:bi``."""
from parlai.core.opt import Opt
from parlai.core.params import ParlaiParser

from ..modules import BiEncoderConfig
from .dual_encoder import DualEncoderAgent


class BiEncoderAgent(DualEncoderAgent):
    agent_name = "bi"
    config_class = BiEncoderConfig

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
