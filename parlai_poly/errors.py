"""Errors that name the file or option at fault and what to do about it."""


class ParlaiPolyError(ValueError):
    """Bad input: the message names what is wrong and how to fix it."""


class BackboneError(ParlaiPolyError):
    """The Hugging Face backbone given by --hf-model cannot be used."""


class ModelFileError(ParlaiPolyError):
    """A model file is missing, foreign or written by another agent type."""


class CandidateFileError(ParlaiPolyError):
    """A fixed-candidates file is missing, empty or not UTF-8."""
