"""Turn the raw CCC corpus (PyPI ``chitchat-dataset``) into per-split files ParlAI reads fast.

The raw corpus is one 40 MB JSON object, uuid -> {prompt, ratings, start, messages}, where
``messages`` is a list of message groups ``[{text, timestamp, sender}, ...]``. It has no official
split, so this module defines one: a conversation goes to train, valid or test by a stable hash
of its uuid, so the split never depends on Python's hash seed, file order or the dataset version.

Everything is built once into ``<datapath>/ccc/`` and marked with ParlAI's ``.built`` file:

- ``{train,valid,test}.jsonl``: one conversation a line, ``{"id", "turns"}``; valid and test
  lines also hold ``label_candidates``: for each turn after the first, 20 candidates (the turn
  itself plus 19 turns of other conversations of the same split, in a seeded order).
- ``{valid,test}_responses.txt``: every response of the split, deduplicated, one a line: the
  fixed candidate set for retrieval at scale (``--fixed-candidates-path``).
- ``stats.json``: conversation, turn and example counts per split.
"""
import hashlib
import importlib.util
import itertools
import json
import os
import random
import shutil
import tempfile
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from parlai_poly.storage import replace_dir

# Bump when the processed format or any rule below changes: ParlAI then rebuilds the folder.
VERSION = "ccc-v1"
TASK_FOLDER = "ccc"
SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")
# Percent of conversations per split, by hash bucket (0-99): 80 / 10 / 10.
SPLIT_UPPER_BUCKETS = (("train", 80), ("valid", 90), ("test", 100))
NUM_CANDIDATES = 20
CANDIDATE_SEED = 1905  # arXiv 1905.01969, the poly-encoder paper

# A conversation once parsed: (conversation id, its turns).
Conversation = Tuple[str, List[str]]


def raw_dataset_path() -> str:
    """Locate ``dataset.json`` inside the installed ``chitchat-dataset`` package.

    The corpus ships as a Python package rather than a download, so the file is found through
    the import system; a clear error beats a bare FileNotFoundError deep in a teacher.
    """
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The CCC task reads its data from the PyPI package `chitchat-dataset`, which is "
            "not installed: `pip install chitchat-dataset` (it is a dependency of parlai-poly)."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`chitchat-dataset` is installed but has no dataset.json at {path}")
    return path


def load_raw_dataset(path: Optional[str] = None) -> Dict[str, dict]:
    """Read the raw corpus, uuid -> conversation dict."""
    with open(path or raw_dataset_path(), encoding="utf-8") as f:
        return json.load(f)


def normalize_text(text: str) -> str:
    """Collapse all whitespace to single spaces.

    Some messages carry leading, trailing or doubled spaces; ParlAI joins history with newlines
    and the fixed-candidates file is one response a line, so no turn may hold a line break.
    """
    return " ".join(text.split())


def conversation_turns(conversation: dict) -> List[str]:
    """The turns of one raw conversation: consecutive messages of one sender, joined by a space.

    In the shipped data every message group already holds one sender and two adjacent groups
    never share one, but the groups are flattened and regrouped by sender anyway: that is the
    definition of a turn, and dropping empty messages can make two groups of one sender adjacent.
    """
    messages = (message for group in conversation["messages"] for message in group)
    non_empty = ((m["sender"], normalize_text(m["text"])) for m in messages)
    non_empty = [(sender, text) for sender, text in non_empty if text]
    return [
        " ".join(text for _, text in same_sender)
        for _, same_sender in itertools.groupby(non_empty, key=lambda pair: pair[0])
    ]


def split_of(conversation_id: str) -> str:
    """The split of a conversation, from the sha256 of its id: stable across runs and machines."""
    digest = hashlib.sha256(conversation_id.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    for split, upper in SPLIT_UPPER_BUCKETS:
        if bucket < upper:
            return split
    raise AssertionError("unreachable: the last upper bucket is 100")


def split_conversations(raw: Dict[str, dict]) -> Dict[str, List[Conversation]]:
    """Group conversations with at least two turns by split, sorted by id.

    A single-turn conversation (one person talking to nobody) has no (context, reply) pair.
    Sorting by id makes everything downstream independent of the JSON's key order.
    """
    by_split: Dict[str, List[Conversation]] = {split: [] for split in SPLITS}
    for conversation_id in sorted(raw):
        turns = conversation_turns(raw[conversation_id])
        if len(turns) >= 2:
            by_split[split_of(conversation_id)].append((conversation_id, turns))
    return by_split


def responses_of(conversations: Iterable[Conversation]) -> List[str]:
    """Every turn that answers another (all but each conversation's first), deduplicated in order."""
    return list(dict.fromkeys(turn for _, turns in conversations for turn in turns[1:]))


def candidate_rng(seed: int, conversation_id: str, turn_index: int) -> random.Random:
    """A generator per example, so its candidates do not depend on which examples came before.

    ``random.Random`` seeds from a str through sha512, independent of PYTHONHASHSEED.
    """
    return random.Random(f"ccc-candidates:{seed}:{conversation_id}:{turn_index}")


def draw_label_candidates(
    label: str,
    conversation_index: int,
    pool: Sequence[Tuple[int, str]],
    rng: random.Random,
    num_candidates: int = NUM_CANDIDATES,
) -> List[str]:
    """The label plus ``num_candidates - 1`` distinct negatives, shuffled.

    Negatives come from ``pool`` (conversation index, response) entries of other conversations;
    a negative whose text equals the label ("Hello?" occurs hundreds of times) or another
    negative is redrawn, so the label is among the candidates exactly once.
    """
    candidates = [label]
    seen = {label}
    # Rejections are rare on real data; the bound only stops a pool too small from looping forever.
    draws_left = 1000 * num_candidates
    while len(candidates) < num_candidates:
        if draws_left == 0:
            raise ValueError(f"too few distinct responses in other conversations for {num_candidates} candidates")
        draws_left -= 1
        owner, text = pool[rng.randrange(len(pool))]
        if owner != conversation_index and text not in seen:
            candidates.append(text)
            seen.add(text)
    rng.shuffle(candidates)
    return candidates


def response_pool(conversations: Sequence[Conversation]) -> List[Tuple[int, str]]:
    """(conversation index, response) for every response of a split: what negatives are drawn from."""
    return [(index, turn) for index, (_, turns) in enumerate(conversations) for turn in turns[1:]]


def label_candidates_for(
    conversations: Sequence[Conversation], seed: int = CANDIDATE_SEED
) -> Iterator[List[List[str]]]:
    """For each conversation, one candidate list per turn after the first (its label turn)."""
    pool = response_pool(conversations)
    for index, (conversation_id, turns) in enumerate(conversations):
        yield [
            draw_label_candidates(turns[t], index, pool, candidate_rng(seed, conversation_id, t))
            for t in range(1, len(turns))
        ]


def processed_path(datapath: str, split: str) -> str:
    """The processed conversations of one split."""
    return os.path.join(datapath, TASK_FOLDER, f"{split}.jsonl")


def fixed_candidates_path(datapath: str, split: str = "test") -> str:
    """The deduplicated responses of ``split`` (valid or test), one a line; built if needed.

    Pass it to a ranking agent as ``--fixed-candidates-path`` with ``--eval-candidates fixed``.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"fixed candidates exist for {EVAL_SPLITS}, not {split!r}")
    build(datapath)
    return os.path.join(datapath, TASK_FOLDER, f"{split}_responses.txt")


def read_jsonl(path: str) -> Iterator[dict]:
    """Stream the records of a processed split file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def read_conversations(datapath: str, split: str) -> Iterator[dict]:
    """Stream the processed conversations of a split, building them first if needed."""
    build(datapath)
    return read_jsonl(processed_path(datapath, split))


def _write_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_lines(path: str, lines: Iterable[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def write_processed(folder: str, raw: Dict[str, dict], seed: int = CANDIDATE_SEED) -> dict:
    """Write every processed file into ``folder``; return the statistics written to stats.json."""
    by_split = split_conversations(raw)
    stats = {"raw_conversations": len(raw), "splits": {}}
    for split, conversations in by_split.items():
        records = [{"id": cid, "turns": turns} for cid, turns in conversations]
        if split in EVAL_SPLITS:
            for record, candidates in zip(records, label_candidates_for(conversations, seed)):
                record["label_candidates"] = candidates
            responses = responses_of(conversations)
            _write_lines(os.path.join(folder, f"{split}_responses.txt"), responses)
        _write_jsonl(os.path.join(folder, f"{split}.jsonl"), records)
        stats["splits"][split] = {
            "conversations": len(conversations),
            "turns": sum(len(turns) for _, turns in conversations),
            "examples": sum(len(turns) - 1 for _, turns in conversations),
            **({"distinct_responses": len(responses)} if split in EVAL_SPLITS else {}),
        }
    kept = sum(s["conversations"] for s in stats["splits"].values())
    stats["dropped_single_turn_conversations"] = len(raw) - kept
    with open(os.path.join(folder, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    return stats


def build(datapath: str, raw_path: Optional[str] = None) -> str:
    """Build ``<datapath>/ccc/`` once and return it.

    Files are written into a staging folder next to it, marked done with ParlAI's ``.built``
    convention, and renamed into place in one step, so an interrupted build never leaves a
    folder that looks built, and a reader never sees half-written files.
    """
    from parlai.core import build_data  # ParlAI is only needed once something gets built

    dpath = os.path.join(datapath, TASK_FOLDER)
    if build_data.built(dpath, VERSION):
        return dpath
    refuse_foreign_folder(dpath)
    os.makedirs(datapath, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{TASK_FOLDER}-building-", dir=datapath)
    try:
        write_processed(staging, load_raw_dataset(raw_path))
        build_data.mark_done(staging, VERSION)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the built folder is ordinary data
        if build_data.built(dpath, VERSION):  # another process finished first
            return dpath
        # an older build of ours is replaced (checked again: it may have changed meanwhile)
        replace_dir(staging, dpath, lambda path: foreign_files(str(path)) is None, lambda path: foreign_folder_error(str(path)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dpath


# What a build of ours ever writes into <datapath>/ccc/ (hard_negatives.py mines into the
# subfolder): a folder holding anything else is not ours to replace
OWN_FILES = {".built", "stats.json", "hard_negatives"} | {f"{s}.jsonl" for s in SPLITS} | {
    f"{s}_responses.txt" for s in EVAL_SPLITS
}


def foreign_files(dpath: str) -> Optional[List[str]]:
    """None if ``dpath`` is absent, empty or an older build of ours (our ``.built`` marker and
    nothing but the files a build writes); else what in it is not ours."""
    if not os.path.lexists(dpath):
        return None
    if not os.path.isdir(dpath) or os.path.islink(dpath):
        return [os.path.basename(dpath)]
    names = set(os.listdir(dpath))
    foreign = sorted(names if names and ".built" not in names else names - OWN_FILES)
    return foreign or None


def foreign_folder_error(dpath: str):
    from parlai_poly.errors import ParlaiPolyError

    if not os.path.isdir(dpath) or os.path.islink(dpath):
        return ParlaiPolyError(f"{dpath} exists and is not a folder of ours; move it away to build the CCC task there.")
    foreign = foreign_files(dpath) or []
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    return ParlaiPolyError(
        f"{dpath} holds files that the CCC task did not write ({shown}); it would have to "
        f"replace that folder to build version {VERSION}. Move those files elsewhere, or "
        "use another --datapath. Nothing was changed."
    )


def refuse_foreign_folder(dpath: str) -> None:
    """Refuse to replace ``dpath`` unless it is absent, empty, or an older build of ours."""
    if foreign_files(dpath) is not None:
        raise foreign_folder_error(dpath)


def default_datapath() -> str:
    """The datapath ParlAI itself would use: $PARLAI_DATAPATH, else ``<parlai_home>/data``."""
    from parlai.core.params import ParlaiParser

    return ParlaiParser(True, False).parse_args([])["datapath"]


def read_stats(datapath: str) -> dict:
    """The counts written at build time."""
    with open(os.path.join(build(datapath), "stats.json")) as f:
        return json.load(f)
