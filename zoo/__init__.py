"""The parlai-poly model zoo, installed as ``parlai_poly.zoo``."""
