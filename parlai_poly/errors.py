"""Errors that name the file or option at fault and what to do about it."""


class ParlaiPolyError(ValueError):
    """Bad input: the message names what is wrong and how to fix it."""


class BackboneError(ParlaiPolyError):
    """The Hugging Face backbone given by --hf-model cannot be used."""


class ModelFileError(ParlaiPolyError):
    """A model file is missing, foreign or written by another agent type."""


class CandidateFileError(ParlaiPolyError):
    """A fixed-candidates file is missing, empty or not UTF-8."""


class ZooError(ParlaiPolyError):
    """A zoo entry is unknown, not built yet, or cannot be installed."""


def report_bad_input_on_exit() -> None:
    """From the command line, bad input gets its one-line message, not a traceback."""
    import sys

    default = sys.excepthook
    if getattr(default, "parlai_poly", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, ParlaiPolyError):
            print(f"parlai-poly: error: {exc}", file=sys.stderr)
        else:
            default(exc_type, exc, tb)

    hook.parlai_poly = True
    sys.excepthook = hook
