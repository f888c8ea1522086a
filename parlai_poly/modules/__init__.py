"""Model modules: tensors in, tensors out. Agents own candidates and metrics.

``build_module(config, encoder)`` builds any of them from its config (``config.py``)."""
import copy

from torch import nn

from .attention import Attention
from .bi_encoder import BiEncoderConfig, BiEncoderModule
from .config import ModelConfig
from .cross_encoder import CrossEncoderConfig, CrossEncoderModule
from .encoder import TextEncoder
from .poly_encoder import PolyEncoderConfig, PolyEncoderModule
from .pooling import Pooling

MODULES = {"bi": BiEncoderModule, "poly": PolyEncoderModule, "cross": CrossEncoderModule}


def build_module(config: ModelConfig, encoder: TextEncoder) -> nn.Module:
    """The model ``config`` describes, on ``encoder``; a dual encoder with
    ``share_encoders`` false gets a copy of it (same weights) for its candidates."""
    candidate = None if getattr(config, "share_encoders", True) else copy.deepcopy(encoder)
    return MODULES[config.kind].from_config(config, encoder, candidate)


__all__ = [
    "Attention",
    "BiEncoderConfig",
    "BiEncoderModule",
    "CrossEncoderConfig",
    "CrossEncoderModule",
    "ModelConfig",
    "PolyEncoderConfig",
    "PolyEncoderModule",
    "Pooling",
    "TextEncoder",
    "build_module",
]
