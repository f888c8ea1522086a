"""Agents for ParlAI's ``-m`` option: ``parlai_poly.agents:bi``, ``:cross`` and ``:poly``.

Importing this module applies the ParlAI 1.7.2 compatibility fixes; ParlAI imports it while
parsing ``-m`` or loading one of our model files, before any agent is built.
"""
from .. import compat
from ..errors import report_bad_input_on_exit

compat.apply()

from .bi import BiEncoderAgent  # noqa: E402
from .cross import CrossEncoderAgent  # noqa: E402
from .poly import PolyEncoderAgent  # noqa: E402

bi = BiEncoderAgent
cross = CrossEncoderAgent
poly = PolyEncoderAgent

report_bad_input_on_exit()

__all__ = ["BiEncoderAgent", "CrossEncoderAgent", "PolyEncoderAgent", "bi", "cross", "poly"]
