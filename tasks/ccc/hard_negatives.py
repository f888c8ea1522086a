"""Hard negatives for CCC train: the responses a bi-encoder wrongly prefers among random ones.

Against random negatives a model that starts as a good bi-encoder has little left to learn:
nearly every random response is already far below the true one. R@1/20 is decided by the one
or two of a test example's 19 random negatives that the bi-encoder confuses with the answer,
so each train example gets the label, ``HARD`` such confusers (each the response the
bi-encoder ranks highest among 19 random ones, as a test example would draw them) and
``RANDOM`` plain random responses. The bi-encoder's top few among all responses make worse
negatives, as many of them are answers as good as the label. Measured on the cross-encoder
started from ``ccc_bi`` (400 updates, first 1,024 CCC test examples): R@1/20 0.596 with
in-batch random negatives at lr 5e-5 (0.634 at 1e-5), 0.587 with these and 0.443 with 7 of the
top 32 of 13k responses, both at 2e-5.

Encoding all 100k train contexts would take 20 to 30 minutes on 2 CPU cores, so only a seeded
sample of ``conversations`` train conversations is mined and trained on (400: about 14k
examples, 5 minutes), and responses are drawn from those conversations. The result goes to
``<datapath>/ccc/hard_negatives/<key>.jsonl`` in the format of valid and test (``{"id",
"turns", "label_candidates"}``), written atomically; the key covers the model file's bytes and
every setting, so a changed model is mined again, an unchanged one never.
"""
import hashlib
import json
import os
import random
from typing import Callable, List, Sequence

import torch

from parlai_poly.candidate_store import CandidateVectors, encode_sorted
from parlai_poly.errors import ParlaiPolyError
from parlai_poly.storage import atomic_write_text

from . import build as ccc_build

HARD = 7
RANDOM = 8
FORMAT = "ccc-hard-negatives-v3"


def mined_path(datapath: str, model_file: str, conversations: int) -> str:
    digest = hashlib.sha256(f"{FORMAT}:{HARD}:{RANDOM}:{conversations}:".encode())
    with open(model_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return os.path.join(datapath, ccc_build.TASK_FOLDER, "hard_negatives", digest.hexdigest()[:16] + ".jsonl")


def build(datapath: str, model_file: str, conversations: int) -> str:
    """The mined file for ``model_file`` (a bi-encoder; ``zoo:`` paths work), mining it if needed."""
    from parlai.core.build_data import modelzoo_path

    model_file = modelzoo_path(datapath, model_file)
    if not os.path.isfile(model_file):
        raise ParlaiPolyError(f"--ccc-hard-negatives-model {model_file}: no such model file.")
    path = mined_path(datapath, model_file, conversations)
    if not os.path.isfile(path):
        records = sample_conversations(ccc_build.read_conversations(datapath, "train"), conversations)
        mined = mine(records, load_bi_encoder(model_file, datapath))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in mined))
    return path


def sample_conversations(records, n: int) -> List[dict]:
    records = list(records)
    if n < 1:
        raise ParlaiPolyError(f"--ccc-hard-negatives-conversations {n}: must be at least 1.")
    picked = sorted(random.Random(f"{FORMAT}:sample").sample(range(len(records)), min(n, len(records))))
    return [records[i] for i in picked]


def load_bi_encoder(model_file: str, datapath: str):
    from parlai.core.agents import create_agent_from_opt_file

    from parlai_poly import compat
    from parlai_poly.modules import BiEncoderModule

    compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything

    overrides = {"datatype": "test", "datapath": datapath}
    agent = create_agent_from_opt_file({"model_file": model_file, "override": overrides, "datapath": datapath})
    if agent is None or not isinstance(getattr(agent, "unwrapped_model", None), BiEncoderModule):
        raise ParlaiPolyError(
            f"--ccc-hard-negatives-model {model_file}: mining needs a parlai_poly bi-encoder "
            f"(-m parlai_poly.agents:bi), whose contexts and responses are each one vector."
        )
    agent.model.eval()
    return agent


def context_ids(agent, texts: Sequence[str]) -> List[torch.Tensor]:
    """Each text as the agent reads a context: one episode, through its own history and truncation."""
    ids = []
    for text in texts:
        agent.reset()
        ids.append(agent.observe({"text": text, "episode_done": True})["text_vec"])
    agent.reset()
    return ids


def encode(agent, texts: Sequence[str], vectorize, module_encode, desc: str) -> torch.Tensor:
    vectors = CandidateVectors.from_texts(texts, vectorize)
    return encode_sorted(
        vectors, module_encode, agent.NULL_IDX, 64, lambda d, dtype: torch.empty(len(vectors), d, dtype=dtype), desc
    )


def mine(records: Sequence[dict], agent) -> List[dict]:
    """``records`` with ``label_candidates``: per turn after the first, label + hard + random."""
    model = agent.unwrapped_model
    pool = ccc_build.response_pool([(r["id"], r["turns"]) for r in records])  # (conversation, text)
    examples = [(i, t) for i, r in enumerate(records) for t in range(1, len(r["turns"]))]
    contexts = ["\n".join(records[i]["turns"][:t]) for i, t in examples]
    context_encs = encode(agent, contexts, lambda t: context_ids(agent, t), model.encode_context, "Encoding contexts")
    responses = [text for _, text in pool]
    response_encs = encode(agent, responses, agent.vectorize_fixed_candidates, model.encode_candidates, "Encoding responses")
    position = {text: j for j, (_, text) in enumerate(pool)}  # equal texts score equally
    for start in range(0, len(examples), 1024):
        chunk = examples[start : start + 1024]
        with torch.inference_mode():
            scores = model.score(context_encs[start : start + len(chunk)], response_encs).numpy()  # [n, P]
        for (i, t), row in zip(chunk, scores):
            records[i].setdefault("label_candidates", [None] * (len(records[i]["turns"]) - 1))
            by_text = lambda text, row=row: row[position[text]]  # noqa: E731  (bound per row)
            records[i]["label_candidates"][t - 1] = candidates_for(records[i], i, t, by_text, pool)
    return list(records)


def candidates_for(record: dict, index: int, turn: int, score: Callable[[str], float], pool) -> List[str]:
    label = record["turns"][turn]
    rng = ccc_build.candidate_rng(ccc_build.CANDIDATE_SEED, f"hard:{record['id']}", turn)
    hard: List[str] = []
    while len(hard) < HARD:  # each: the bi-encoder's favourite among a test example's negatives
        drawn = ccc_build.draw_label_candidates(label, index, pool, rng, ccc_build.NUM_CANDIDATES)
        negatives = [text for text in drawn if text != label and text not in hard]
        hard.append(max(negatives, key=score))
    drawn = ccc_build.draw_label_candidates(label, index, pool, rng, 1 + RANDOM + HARD)
    easy = [text for text in drawn if text != label and text not in hard][:RANDOM]
    candidates = [label] + hard + easy
    rng.shuffle(candidates)
    return candidates
