"""Small, learnable stand-ins for ConvAI2, DSTC7 and Ubuntu v2, in the exact on-disk layout
ParlAI 1.7.2's own teachers read (see DESIGN.md section 5).

ParlAI cannot download its data sets here, yet the ranking agents must be trained and
evaluated through ParlAI's real teachers. These fixtures are generated, not copied: every
example is built around one topic word (a colour, an animal, a city, ...) that the context
mentions and the correct reply repeats, and no distractor mentions any topic word of the
example's dialogue. A ranking model that learns "pick the candidate that shares the topic word"
therefore beats chance after a little training, which is what the agents' tests need.

Everything is seeded: the same sizes and seed give byte-identical files, so writing the
fixtures twice into one datapath is a no-op rather than a conflict.

Files are generated into a staging directory next to the target, checked by the same
validators that ``prepare`` applies to the official data, marked with ParlAI's ``.built``
(last), and renamed into place in one step; an existing directory is never overwritten.
"""
import csv
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Set

from . import prepare

TOPIC_WORDS: Dict[str, List[str]] = {
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black",
               "white", "grey", "teal"],
    "animal": ["cats", "dogs", "horses", "rabbits", "parrots", "turtles", "lions", "wolves",
               "dolphins", "owls", "foxes", "bees"],
    "city": ["paris", "tokyo", "london", "berlin", "rome", "madrid", "boston", "chicago",
             "sydney", "toronto", "dublin", "lisbon"],
    "food": ["pizza", "sushi", "tacos", "pasta", "curry", "pancakes", "salad", "burgers",
             "noodles", "cheese", "soup", "waffles"],
    "sport": ["tennis", "soccer", "hockey", "golf", "baseball", "rugby", "cricket",
              "swimming", "cycling", "skiing", "boxing", "surfing"],
    "instrument": ["guitar", "piano", "violin", "drums", "flute", "trumpet", "cello",
                   "banjo", "harp", "ukulele", "saxophone", "clarinet"],
    "hobby": ["gardening", "knitting", "chess", "painting", "fishing", "hiking", "baking",
              "camping", "pottery", "poetry", "dancing", "photography"],
    "drink": ["coffee", "tea", "lemonade", "cocoa", "milkshakes", "smoothies", "cider",
              "espresso", "juice", "soda", "lattes", "kombucha"],
}
ALL_TOPICS: List[str] = [word for words in TOPIC_WORDS.values() for word in words]

# What the partner says (mentions the topic) and what a good reply says (repeats it).
PROMPT_TEMPLATES = [
    "my friend told me about {w} yesterday .",
    "what do you think of {w} ?",
    "i have been reading a lot about {w} lately .",
    "do you know anything about {w} ?",
    "i cannot stop thinking about {w} today .",
    "have you ever tried {w} ?",
]
REPLY_TEMPLATES = [
    "{w} is one of my favourite things .",
    "oh , i know a lot about {w} !",
    "honestly {w} always makes me happy .",
    "i was just talking about {w} with my sister .",
    "{w} ? i could talk about that all day .",
    "not many people ask me about {w} .",
]
# ConvAI2's persona turn: the right reply names a word from the persona lines.
PERSONA_QUESTION = "tell me something you love ."
PERSONA_REPLY = "i love {w} more than anything ."
PERSONA_ORIGINAL = "i love {w}."
PERSONA_REVISED = "{w} is what i like best."

REPLY_UNIVERSE: List[str] = [
    template.format(w=word) for word in ALL_TOPICS for template in REPLY_TEMPLATES + [PERSONA_REPLY]
]
REPLY_TOPIC: Dict[str, str] = {
    template.format(w=word): word for word in ALL_TOPICS for template in REPLY_TEMPLATES + [PERSONA_REPLY]
}


@dataclass(frozen=True)
class FixtureSizes:
    """Examples per split (ConvAI2 has no test split: ParlAI maps test to valid)."""

    train: int = 200
    valid: int = 40
    test: int = 40


@dataclass
class Exchange:
    """One ranking example: the turns before the reply, the reply, and the topic words the
    distractors must avoid (so that the correct reply is the only one on topic)."""

    turns: List[str]
    reply: str
    topics_in_dialogue: Set[str] = field(default_factory=set)


def split_rng(task: str, split: str, seed: int) -> random.Random:
    """A generator per task and split, so changing one split's size leaves the others alone.

    String seeds are hashed with SHA-512 by ``random``, so this is stable across runs and
    independent of PYTHONHASHSEED."""
    return random.Random(f"parlai-poly-fixture/{task}/{split}/{seed}")


def prompt_about(rng: random.Random, word: str) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(w=word)


def reply_about(rng: random.Random, word: str) -> str:
    return rng.choice(REPLY_TEMPLATES).format(w=word)


def sample_distractors(rng: random.Random, exchange: Exchange, count: int) -> List[str]:
    """``count`` distinct replies on topics the dialogue never mentions, in random order.

    They come from the same generator as every other example's reply, as real distractors
    are other conversations' replies."""
    allowed = [r for r in REPLY_UNIVERSE if REPLY_TOPIC[r] not in exchange.topics_in_dialogue]
    return rng.sample(allowed, count)


def topic_dialogue(rng: random.Random, num_exchanges: int, avoid: Sequence[str] = ()) -> List[Exchange]:
    """A dialogue of prompt/reply pairs, each pair on a fresh topic; one Exchange per reply,
    each seeing all turns before it."""
    words = rng.sample([w for w in ALL_TOPICS if w not in avoid], num_exchanges)
    turns: List[str] = []
    exchanges = []
    for word in words:
        turns.append(prompt_about(rng, word))
        reply = reply_about(rng, word)
        exchanges.append(Exchange(list(turns), reply, set(words) | set(avoid)))
        turns.append(reply)
    return exchanges


# ----------------------------------------------------------------------------- ConvAI2

CONVAI2_TURNS_PER_EPISODE = 4
CONVAI2_PERSONA_LINES = 4
CONVAI2_CANDIDATES = 20
CONVAI2_VARIANTS = ("self_original", "self_revised", "both_original", "none_original")


@dataclass
class PersonaEpisode:
    """One ConvAI2 episode: both personas (as topic words) and the exchanges to rank."""

    own_persona: List[str]
    partner_persona: List[str]
    exchanges: List[Exchange]
    candidates: List[List[str]]


def convai2_episode(rng: random.Random, num_turns: int) -> PersonaEpisode:
    """First turn asks about the persona (learnable only from the persona lines), the rest
    are topic turns (learnable from the partner's line)."""
    own = rng.sample(ALL_TOPICS, CONVAI2_PERSONA_LINES)
    partner = rng.sample([w for w in ALL_TOPICS if w not in own], CONVAI2_PERSONA_LINES)
    loved = rng.choice(own)
    mentioned = set(own) | set(partner)
    first = Exchange([PERSONA_QUESTION], PERSONA_REPLY.format(w=loved), set(mentioned))
    rest = topic_dialogue(rng, num_turns - 1, avoid=sorted(mentioned)) if num_turns > 1 else []
    exchanges = [first] + rest
    dialogue_topics = set().union(*(e.topics_in_dialogue for e in exchanges))
    for exchange in exchanges:
        exchange.topics_in_dialogue = dialogue_topics
    # label last, as in the real ConvAI2 files
    candidates = [sample_distractors(rng, e, CONVAI2_CANDIDATES - 1) + [e.reply] for e in exchanges]
    return PersonaEpisode(own, partner, exchanges, candidates)


def convai2_episodes(num_examples: int, split: str, seed: int) -> List[PersonaEpisode]:
    rng = split_rng("convai2", split, seed)
    episodes = []
    remaining = num_examples
    while remaining > 0:
        turns = min(CONVAI2_TURNS_PER_EPISODE, remaining)
        episodes.append(convai2_episode(rng, turns))
        remaining -= turns
    return episodes


def persona_lines(episode: PersonaEpisode, variant: str) -> List[str]:
    """The context lines ParlAI merges into the first example's text, per file variant."""
    template = PERSONA_REVISED if variant == "self_revised" else PERSONA_ORIGINAL
    if variant == "none_original":
        return []
    own = [f"your persona: {template.format(w=w)}" for w in episode.own_persona]
    if variant == "both_original":
        own += [f"partner's persona: {PERSONA_ORIGINAL.format(w=w)}" for w in episode.partner_persona]
    return own


def fbdialog_lines(episode: PersonaEpisode, variant: str, with_candidates: bool) -> List[str]:
    """``N text`` context lines then ``N prompt<TAB>reply<TAB><TAB>c1|...|c20``, N from 1."""
    body = persona_lines(episode, variant)
    for exchange, candidates in zip(episode.exchanges, episode.candidates):
        line = f"{exchange.turns[-1]}\t{exchange.reply}"
        if with_candidates:
            line += "\t\t" + "|".join(candidates)
        body.append(line)
    return [f"{number} {text}" for number, text in enumerate(body, start=1)]


def write_convai2_files(folder: Path, sizes: FixtureSizes = FixtureSizes(), seed: int = 0) -> None:
    """All four persona variants, with and without candidates, for train and valid."""
    for split, count in (("train", sizes.train), ("valid", sizes.valid)):
        episodes = convai2_episodes(count, split, seed)
        for variant in CONVAI2_VARIANTS:
            for with_candidates, suffix in ((True, ""), (False, "_no_cands")):
                lines = [line for ep in episodes for line in fbdialog_lines(ep, variant, with_candidates)]
                write_text(folder / f"{split}_{variant}{suffix}.txt", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- DSTC7

DSTC7_CANDIDATES = 100
DSTC7_SPLITS = (("train", "train"), ("dev", "valid"), ("test", "test"))
DSTC7_EXAMPLE_ID_BASE = {"train": 100000, "dev": 200000, "test": 300000, "augmented": 400000}


@dataclass
class Dstc7Example:
    example_id: int
    exchange: Exchange
    correct_id: str
    options: List[Dict[str, str]]


CANDIDATE_ID_ALPHABET = string.ascii_uppercase + string.digits


def candidate_id(rng: random.Random) -> str:
    """Ten upper-case letters and digits, like the real DSTC7 candidate ids."""
    return "".join(rng.choices(CANDIDATE_ID_ALPHABET, k=10))


def dstc7_example(rng: random.Random, example_id: int, exchange: Exchange) -> Dstc7Example:
    """100 options with the correct one at a random place, ids unique within the example."""
    texts = sample_distractors(rng, exchange, DSTC7_CANDIDATES - 1)
    texts.insert(rng.randrange(DSTC7_CANDIDATES), exchange.reply)
    ids: List[str] = []
    while len(ids) < DSTC7_CANDIDATES:
        new_id = candidate_id(rng)
        if new_id not in ids:
            ids.append(new_id)
    options = [{"candidate-id": i, "utterance": t} for i, t in zip(ids, texts)]
    correct_id = ids[texts.index(exchange.reply)]
    return Dstc7Example(example_id, exchange, correct_id, options)


def dstc7_dialogues(rng: random.Random, count: int) -> List[List[Exchange]]:
    """Dialogues of 1 to 3 prompt/reply pairs; the last reply is the one to rank."""
    return [topic_dialogue(rng, rng.randint(1, 3)) for _ in range(count)]


def dstc7_json_record(example: Dstc7Example, include_answer: bool) -> dict:
    """One element of ubuntu_*_subtask_1.json, the speakers alternating as in the real data."""
    messages = [
        {"speaker": f"participant_{i % 2}", "utterance": turn}
        for i, turn in enumerate(example.exchange.turns)
    ]
    record = {"example-id": example.example_id, "messages-so-far": messages}
    if include_answer:
        record["options-for-correct-answers"] = [
            {"candidate-id": example.correct_id, "utterance": example.exchange.reply}
        ]
    record["options-for-next"] = example.options
    return record


def write_dstc7_files(folder: Path, sizes: FixtureSizes = FixtureSizes(), seed: int = 0) -> None:
    """Train/dev/test JSON, the test answers TSV, and the augmented and sampled train files.

    The test JSON carries no answer, as in the released test set: ParlAI's teacher takes it
    from ubuntu_responses_subtask_1.tsv."""
    counts = {"train": sizes.train, "dev": sizes.valid, "test": sizes.test}
    train_dialogues: List[List[Exchange]] = []
    for split, _ in DSTC7_SPLITS:
        rng = split_rng("dstc7", split, seed)
        dialogues = dstc7_dialogues(rng, counts[split])
        if split == "train":
            train_dialogues = dialogues
        base = DSTC7_EXAMPLE_ID_BASE[split]
        examples = [dstc7_example(rng, base + i, d[-1]) for i, d in enumerate(dialogues)]
        records = [dstc7_json_record(e, include_answer=split != "test") for e in examples]
        write_text(folder / f"ubuntu_{split}_subtask_1.json", json_list_text(records))
        if split == "test":
            tsv = "".join(f"{e.example_id}\t{e.correct_id}\t{e.exchange.reply}\n" for e in examples)
            write_text(folder / "ubuntu_responses_subtask_1.tsv", tsv)
    augmented = dstc7_augmented_records(train_dialogues, seed)
    for suffix in ("augmented", "sampled"):
        write_text(folder / f"ubuntu_train_subtask_1_{suffix}.json", json_list_text(augmented))


def json_list_text(records: List[dict]) -> str:
    """A JSON list with one example per line, so a checker's line number finds the example."""
    return "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"


def dstc7_augmented_records(dialogues: List[List[Exchange]], seed: int) -> List[dict]:
    """Every reply of every train dialogue as its own example, as the Augmented teachers
    expect (the Sampled teacher keeps 16 of the 100 options itself)."""
    rng = split_rng("dstc7", "augmented", seed)
    exchanges = [exchange for dialogue in dialogues for exchange in dialogue]
    base = DSTC7_EXAMPLE_ID_BASE["augmented"]
    return [
        dstc7_json_record(dstc7_example(rng, base + i, exchange), include_answer=True)
        for i, exchange in enumerate(exchanges)
    ]


# ----------------------------------------------------------------------------- Ubuntu

UBUNTU_DISTRACTORS = 9
UBUNTU_EVAL_HEADER = ["Context", "Ground Truth Utterance"] + [f"Distractor_{i}" for i in range(UBUNTU_DISTRACTORS)]
UBUNTU_TRAIN_HEADER = ["Context", "Utterance", "Label"]


def ubuntu_context(exchange: Exchange) -> str:
    """Turns joined the Ubuntu v2 way: each utterance ends with __eou__, each turn with __eot__."""
    return " ".join(f"{turn} __eou__ __eot__" for turn in exchange.turns)


def ubuntu_rows(split: str, count: int, seed: int) -> List[List[str]]:
    """Dialogues of 2 or 3 pairs (so ubuntu:multiturn keeps them: it needs 3+ turns).

    Train rows are positives only: ParlAI's teacher ignores the Label column."""
    rng = split_rng("ubuntu", split, seed)
    rows = []
    for _ in range(count):
        exchange = topic_dialogue(rng, rng.randint(2, 3))[-1]
        context, response = ubuntu_context(exchange), f"{exchange.reply} __eou__"
        if split == "train":
            rows.append([context, response, "1"])
        else:
            distractors = [f"{d} __eou__" for d in sample_distractors(rng, exchange, UBUNTU_DISTRACTORS)]
            rows.append([context, response] + distractors)
    return rows


def write_ubuntu_files(folder: Path, sizes: FixtureSizes = FixtureSizes(), seed: int = 0) -> None:
    for split, count in (("train", sizes.train), ("valid", sizes.valid), ("test", sizes.test)):
        header = UBUNTU_TRAIN_HEADER if split == "train" else UBUNTU_EVAL_HEADER
        write_csv(folder / f"{split}.csv", [header] + ubuntu_rows(split, count, seed))


# ----------------------------------------------------------------------------- writing

FIXTURE_NOTE_TEXT = (
    "This directory holds SYNTHETIC fixture data written by `python -m parlai_poly.tasks "
    "fixtures`, not the real data set.\nEach correct reply repeats a topic word of its "
    "context; it exists to try the agents offline.\n"
)


def write_text(path: Path, text: str) -> None:
    """Plain UTF-8 with \\n line ends (DSTC7's test TSV reader relies on the \\n)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_csv(path: Path, rows: List[List[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\r\n").writerows(rows)


FIXTURE_WRITERS: Dict[str, Callable[[Path, FixtureSizes, int], None]] = {
    "convai2": write_convai2_files,
    "dstc7": write_dstc7_files,
    "ubuntu": write_ubuntu_files,
}


def write_fixture(task: str, datapath, sizes: FixtureSizes = FixtureSizes(), seed: int = 0,
                  log: Callable[[str], None] = prepare.quiet) -> Path:
    """Generate one task's fixture into ``<datapath>/<ParlAI folder>`` and return that folder.

    Goes through the same staging, validation and refusal rules as ``prepare``: an existing
    folder with other content (real data, say) is never touched."""
    layout = prepare.LAYOUTS[task]

    def populate(folder: Path) -> None:
        FIXTURE_WRITERS[task](folder, sizes, seed)
        write_text(folder / prepare.FIXTURE_NOTE, FIXTURE_NOTE_TEXT)

    return prepare.install_dataset(layout, Path(datapath), populate, log)


def write_convai2_fixture(datapath, sizes: FixtureSizes = FixtureSizes(), seed: int = 0) -> Path:
    return write_fixture("convai2", datapath, sizes, seed)


def write_dstc7_fixture(datapath, sizes: FixtureSizes = FixtureSizes(), seed: int = 0) -> Path:
    return write_fixture("dstc7", datapath, sizes, seed)


def write_ubuntu_fixture(datapath, sizes: FixtureSizes = FixtureSizes(), seed: int = 0) -> Path:
    return write_fixture("ubuntu", datapath, sizes, seed)


def write_all_fixtures(datapath, sizes: FixtureSizes = FixtureSizes(), seed: int = 0,
                       log: Callable[[str], None] = prepare.quiet) -> List[Path]:
    return [write_fixture(task, datapath, sizes, seed, log) for task in FIXTURE_WRITERS]


# ----------------------------------------------------------------------------- reading back


def teacher_examples(task: str, datatype: str, datapath) -> List[dict]:
    """One epoch of what ParlAI's own teacher for ``task`` serves from ``datapath``.

    For smoke checks that data (a fixture or prepared real data) reads as the agents will see
    it. Use ``train:ordered`` for train (plain ``train`` never ends; ``train:evalmode`` ends
    but serves ``eval_labels`` instead of ``labels``)."""
    from parlai.core.params import ParlaiParser
    from parlai.core.teachers import create_task_agent_from_taskname

    opt = ParlaiParser(True, False).parse_args(
        ["--task", task, "--datatype", datatype, "--datapath", str(datapath)]
    )
    teacher = create_task_agent_from_taskname(opt)[0]
    examples = []
    while not teacher.epoch_done():
        examples.append(dict(teacher.act()))
    return examples
