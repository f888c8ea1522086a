"""Fixed-candidates files: one candidate per line, UTF-8.

Blank lines are not candidates (an empty reply would compete with the real ones), and a line
that repeats an earlier one is the same candidate (counted twice it would change N in R@k/N
while hits@k stayed): both are skipped, with a warning naming their lines.
"""
import copy
import os
from typing import Dict, List

from .errors import CandidateFileError

SHOWN_LINES = 10  # line numbers a warning lists before "and N more"


def read_candidate_file(path: str) -> List[str]:
    """The distinct non-blank candidates of ``path`` in file order, or an error naming the
    file, the line and the fix. Skipped lines are reported through ParlAI's logger."""
    if not os.path.isfile(path):
        raise CandidateFileError(
            f"--fixed-candidates-path {path}: no such file. Give a text file with one "
            "candidate per line."
        )
    cands: Dict[str, int] = {}  # candidate -> its first line
    blank, repeated = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise CandidateFileError(
                    f"{path}, line {lineno}: not UTF-8 ({e.reason} at byte {e.start}). "
                    "Re-encode the file as UTF-8, e.g. iconv -t utf-8."
                ) from e
            if not text:
                blank.append(lineno)
            elif text in cands:
                repeated.append(lineno)
            else:
                cands[text] = lineno
    _warn_skipped(path, blank, "blank", "they are not candidates")
    _warn_skipped(path, repeated, "repeating an earlier line", "each candidate counts once")
    if not cands:
        raise CandidateFileError(
            f"--fixed-candidates-path {path}: the file has no candidates. Put one candidate "
            "per line."
        )
    return list(cands)


def _warn_skipped(path: str, lines: List[int], what: str, why: str) -> None:
    if not lines:
        return
    from parlai.utils import logging

    shown = ", ".join(map(str, lines[:SHOWN_LINES])) + (f" and {len(lines) - SHOWN_LINES} more" if len(lines) > SHOWN_LINES else "")
    logging.warning(f"{path}: skipped {len(lines)} line(s) {what} ({why}): line {shown}")


def task_labels(opt, split: str = "train") -> List[str]:
    """Every distinct label of ``opt``'s task in ``split``, in the teacher's order, with a
    progress bar (a large task takes minutes). ``opt``: a parsed ParlAI Opt naming the task
    and its own options."""
    from parlai.core.teachers import create_task_agent_from_taskname
    from tqdm import tqdm

    opt = copy.deepcopy(opt)
    opt.update(datatype=f"{split}:evalmode", interactive_task=False, batchsize=1)
    teacher = create_task_agent_from_taskname(opt)[0]
    seen: Dict[str, None] = {}
    for _ in tqdm(range(teacher.num_examples()), desc=f"Collecting {split} labels", unit="ex", mininterval=2):
        act = teacher.act()
        for label in act.get("labels") or act.get("eval_labels") or ():  # evalmode: eval_labels
            seen.setdefault(label.strip(), None)
    seen.pop("", None)
    return list(seen)
