"""Fixed-candidates files: one candidate per line, UTF-8."""
import os
from typing import List

from .errors import CandidateFileError


def read_candidate_file(path: str) -> List[str]:
    """The candidates of ``path``, or an error naming the file, the line and the fix."""
    if not os.path.isfile(path):
        raise CandidateFileError(
            f"--fixed-candidates-path {path}: no such file. Give a text file with one "
            "candidate per line."
        )
    cands = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                cands.append(raw.decode("utf-8").strip())
            except UnicodeDecodeError as e:
                raise CandidateFileError(
                    f"{path}, line {lineno}: not UTF-8 ({e.reason} at byte {e.start}). "
                    "Re-encode the file as UTF-8, e.g. iconv -t utf-8."
                ) from e
    if not any(cands):
        raise CandidateFileError(
            f"--fixed-candidates-path {path}: the file has no candidates. Put one candidate "
            "per line."
        )
    return cands
