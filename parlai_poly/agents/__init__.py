"""Agents for ParlAI's ``-m`` option: ``parlai_poly.agents:bi``, ``:cross`` and ``:poly``.

Importing this module applies the ParlAI 1.7.2 compatibility fixes; ParlAI imports it while
parsing ``-m`` or loading one of our model files, before any agent is built.
"""
import sys

from .. import compat
from ..errors import ParlaiPolyError

compat.apply()

from .bi import BiEncoderAgent  # noqa: E402
from .cross import CrossEncoderAgent  # noqa: E402
from .poly import PolyEncoderAgent  # noqa: E402

bi = BiEncoderAgent
cross = CrossEncoderAgent
poly = PolyEncoderAgent

_default_excepthook = sys.excepthook


def _report_bad_input(exc_type, exc, tb):
    """From the command line, bad input gets its message, not a traceback."""
    if issubclass(exc_type, ParlaiPolyError):
        print(f"parlai-poly: error: {exc}", file=sys.stderr)
    else:
        _default_excepthook(exc_type, exc, tb)


sys.excepthook = _report_bad_input

__all__ = ["BiEncoderAgent", "CrossEncoderAgent", "PolyEncoderAgent", "bi", "cross", "poly"]
