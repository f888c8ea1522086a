"""Model modules: tensors in, tensors out. Agents own candidates and metrics."""
from .attention import Attention
from .bi_encoder import BiEncoderModule
from .cross_encoder import CrossEncoderModule
from .encoder import TextEncoder
from .poly_encoder import PolyEncoderModule
from .pooling import Pooling

__all__ = [
    "Attention",
    "BiEncoderModule",
    "CrossEncoderModule",
    "PolyEncoderModule",
    "Pooling",
    "TextEncoder",
]
