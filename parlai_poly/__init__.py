"""parlai-poly: bi-, cross- and poly-encoder ranking agents for ParlAI on Hugging Face backbones."""

__version__ = "0.1.0"


def __getattr__(name):
    """``from parlai_poly import Ranker`` without importing torch and ParlAI on every import
    of the package (the start-up hook imports it in every interpreter)."""
    if name == "Ranker":
        from .api import Ranker

        return Ranker
    raise AttributeError(f"module 'parlai_poly' has no attribute {name!r}")
