"""parlai-poly: bi-, cross- and poly-encoder ranking agents for ParlAI on Hugging Face backbones."""

__version__ = "0.1.0"
