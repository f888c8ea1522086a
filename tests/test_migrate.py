"""parlai_poly.migrate: model files of ParlAI's own transformer agents, scored the same by ours.

Each setting trains a tiny model with ParlAI's own agent on integration_tests (20 steps),
migrates it, moves the migrated files elsewhere (nothing may point back at the original),
and scores the same contexts and candidates with both agents.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

from parlai.core.agents import create_agent_from_model_file, create_agent_from_shared
from parlai.core.dict import DictionaryAgent
from parlai.core.message import Message
from parlai.scripts.eval_model import EvalModel
from parlai.scripts.train_model import TrainModel
from parlai_poly import compat
from parlai_poly.errors import ModelFileError, ParlaiPolyError
from parlai_poly.migrate import migrate
from parlai_poly.model_file import is_safetensors, read_metadata

compat.apply()  # ParlAI 1.7.2's fixes: the ParlAI models trained here need them too

pytestmark = pytest.mark.usefixtures("no_downloads")

TOLERANCE = 1e-4  # measured here: up to about 1e-5 (poly n_first, scores up to 20), else < 4e-6
TINY = dict(
    task="integration_tests",
    n_layers=1,
    n_heads=2,
    embedding_size=16,
    ffn_size=32,
    batchsize=8,
    max_train_steps=20,
    validation_every_n_epochs=-1,
    short_final_eval=True,
    validation_max_exs=8,
    log_every_n_secs=1000,
    verbose=False,
    text_truncate=32,
    label_truncate=16,
)
# every mapped option at a non-default value somewhere: variants (aiayn: no embedding
# LayerNorm), activations, --output-scaling, --embeddings-scale, segments, learned positions,
# reductions, shared encoders (a candidate MLP), poly codes / n_first and each attention type
SETTINGS = {
    "bi_shared": ("transformer/biencoder", dict(variant="aiayn", activation="gelu", output_scaling=0.5)),
    "bi_separate": (
        "transformer/biencoder",
        dict(variant="xlm", share_encoders=False, reduction_type="first", n_segments=2, learn_positional_embeddings=True, embeddings_scale=False),
    ),
    "poly_codes": (
        "transformer/polyencoder",
        dict(variant="xlm", poly_n_codes=3, codes_attention_type="multihead", codes_attention_num_heads=2, poly_attention_type="sqrt", activation="gelu"),
    ),
    "poly_n_first": (
        "transformer/polyencoder",
        dict(variant="bart", polyencoder_type="n_first", poly_n_codes=4, poly_attention_type="multihead", poly_attention_num_heads=2, output_scaling=2.0),
    ),
    "cross": ("transformer/crossencoder", dict(variant="xlm", reduction_type="first")),
}
DUAL = [name for name in SETTINGS if not name.startswith("cross")]
EVAL = {"datatype": "valid", "return_cand_scores": True, "interactive_mode": False}


class ParlaiModels:
    """Trains each setting with ParlAI's own agent on first use (inside a test, so that the
    no_downloads fixture guards it) and migrates it: {name: (ParlAI file, migrated file)}."""

    def __init__(self, root):
        self.root = root
        self.files = {}

    def get(self, name):
        if name not in self.files:
            model, options = SETTINGS[name]
            parlai_file = str(self.root / "parlai" / name / "model")
            TrainModel.main(**TINY, **options, model=model, model_file=parlai_file)
            migrated = self.root / "migrated" / name
            assert migrate(parlai_file, str(migrated / "model")) == name.split("_")[0]
            moved = self.root / "moved" / name  # the model must not depend on where it was written
            shutil.move(str(migrated), str(moved))
            self.files[name] = (parlai_file, str(moved / "model"))
        return self.files[name]


@pytest.fixture(scope="module")
def parlai_models(tmp_path_factory):
    return ParlaiModels(tmp_path_factory.mktemp("migrate"))


def examples(seed=0):
    """Contexts and inline candidates of varied lengths: one context longer than
    text_truncate, candidates longer than label_truncate, a word out of the dictionary."""
    rng = random.Random(seed)

    def digits(n):
        return " ".join(str(rng.randrange(10)) for _ in range(n))

    out = []
    for n in (1, 3, 8, 20, 45, 5):
        cands = sorted({digits(rng.choice((1, 2, 4, 7, 20))) + " 0" * rng.randrange(2) for _ in range(6)})
        out.append((digits(n) + (" hello" if n == 5 else ""), cands))
    return out


def batch_scores(agent, batch):
    """{candidate: score} of each example, scored as one batch (padded contexts)."""
    shared = agent.share()
    copies = [create_agent_from_shared(shared) for _ in batch]
    observations = [
        copy.observe(Message({"text": text, "label_candidates": cands, "episode_done": True}))
        for copy, (text, cands) in zip(copies, batch)
    ]
    replies = agent.batch_act(observations)
    return [dict(zip(r["text_candidates"], r["sorted_scores"].tolist())) for r in replies]


def max_difference(theirs, ours):
    diffs = []
    for a, b in zip(theirs, ours):
        assert a.keys() == b.keys()
        diffs += [abs(a[c] - b[c]) for c in a]
    return max(diffs)


@pytest.mark.slow
@pytest.mark.parametrize("name", SETTINGS)
def test_same_scores_as_parlai(parlai_models, name):
    parlai_file, our_file = parlai_models.get(name)
    theirs = create_agent_from_model_file(parlai_file, dict(EVAL, eval_candidates="inline"))
    ours = create_agent_from_model_file(our_file, dict(EVAL, eval_candidates="inline"))
    assert ours.agent_name == name.split("_")[0]
    assert isinstance(ours.dict, DictionaryAgent) and ours.dict.tok2ind == theirs.dict.tok2ind
    scores = batch_scores(theirs, examples())
    difference = max_difference(scores, batch_scores(ours, examples()))
    largest = max(abs(v) for s in scores for v in s.values())
    print(f"{name}: max |score difference| {difference:.2e} (scores up to {largest:.3g})")
    assert difference < TOLERANCE
    # the scores differ between candidates, so the comparison can tell orderings apart
    assert max(max(s.values()) - min(s.values()) for s in scores) > 100 * TOLERANCE


@pytest.mark.slow
def test_reversed_history_truncates_the_same(parlai_models):
    """--history-reversed keeps the start of a long context, in ParlAI and in ours."""
    files = parlai_models.get("poly_n_first")
    theirs, ours = (create_agent_from_model_file(f, dict(EVAL, history_reversed=True)) for f in files)
    assert max_difference(batch_scores(theirs, examples()), batch_scores(ours, examples())) < TOLERANCE


@pytest.mark.slow
def test_cross_pair_too_long_for_the_positions(parlai_models):
    """ParlAI's truncation is kept; a pair past the 1024 positions is refused when met."""
    ours = create_agent_from_model_file(parlai_models.get("cross")[1], dict(EVAL, text_truncate=1000, label_truncate=200))
    ours.observe({"text": " ".join(["1"] * 990), "label_candidates": ["2 " * 100, "3"], "episode_done": True})
    with pytest.raises(ParlaiPolyError, match="pair of 1094 tokens exceeds the model's 1024 positions"):
        ours.act()


@pytest.mark.slow
@pytest.mark.parametrize("name", DUAL)
def test_same_scores_on_fixed_candidates(parlai_models, tmp_path, name):
    """Fixed candidates go through our cached encodings (sorted by length, chunked)."""
    parlai_file, our_file = parlai_models.get(name)
    path = tmp_path / "cands.txt"
    path.write_text("".join(f"{c}\n" for c in sorted({c for _, cs in examples(1) for c in cs})))
    fixed = dict(EVAL, eval_candidates="fixed", fixed_candidates_path=str(path), repeat_blocking_heuristic=False)
    theirs = create_agent_from_model_file(parlai_file, dict(fixed))
    ours = create_agent_from_model_file(our_file, dict(fixed))
    difference = max_difference(batch_scores(theirs, examples(2)), batch_scores(ours, examples(2)))
    print(f"{name} (fixed candidates): max |score difference| {difference:.2e}")
    assert difference < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", ["poly_n_first", "cross"])
def test_eval_model_reports_the_same(parlai_models, name):
    """What `parlai eval_model -mf MIGRATED -t integration_tests` reports is ParlAI's report."""
    reports = [
        EvalModel.main(model_file=f, task="integration_tests", datatype="valid", batchsize=8, num_examples=24)
        for f in parlai_models.get(name)
    ]
    for metric in ("exs", "loss", "hits@1", "hits@5", "mrr"):
        theirs, ours = (float(getattr(r[metric], "value", lambda: r[metric])()) for r in reports)
        assert abs(theirs - ours) < TOLERANCE, metric


@pytest.mark.slow
def test_saved_again_scores_the_same(parlai_models, tmp_path):
    """Our agent saves a migrated model with ParlAI's dictionary in its order, and the options
    that select that dictionary and the backbone config."""
    _, our_file = parlai_models.get("bi_shared")
    ours = create_agent_from_model_file(our_file, dict(EVAL, eval_candidates="inline"))
    again = str(tmp_path / "again")
    ours.save(again)
    with open(our_file + ".dict") as a, open(again + ".dict") as b:
        assert a.read() == b.read()
    reloaded = create_agent_from_model_file(again, dict(EVAL, eval_candidates="inline"))
    assert batch_scores(reloaded, examples()) == batch_scores(ours, examples())


@pytest.mark.slow
@pytest.mark.parametrize("name", SETTINGS)
def test_migrated_files_hold_no_pickle(parlai_models, name):
    _, our_file = parlai_models.get(name)
    folder = os.path.dirname(our_file)
    for file in os.listdir(folder):  # also the cached encodings other tests left there
        full = os.path.join(folder, file)
        if is_safetensors(full):
            continue
        with open(full, "rb") as f:
            data = f.read()
        data.decode("utf-8")  # JSON or ParlAI's text dictionary; a pickle is not UTF-8
        assert not data.startswith(b"PK"), file  # nor a zip, torch.save's format
    assert is_safetensors(our_file)
    assert read_metadata(our_file)["agent"] == name.split("_")[0]
    with open(our_file + ".opt") as f:
        opt = json.load(f)
    assert opt["hf_config"]["model_type"] == "bert" and not opt.get("hf_model")
    assert opt["parlai_dictionary"] is True
    with open(our_file + ".dict", encoding="utf-8") as f:
        assert f.readline().startswith("__null__\t")


# ---- what is refused ----------------------------------------------------------------------
def copy_with_opt(parlai_file, folder, **changes):
    """ParlAI's files copied into ``folder``, their .opt changed."""
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, "model")
    for suffix in ("", ".dict"):
        shutil.copy(parlai_file + suffix, out + suffix)
    with open(parlai_file + ".opt") as f:
        opt = json.load(f)
    opt.update(changes)
    with open(out + ".opt", "w") as f:
        json.dump(opt, f)
    return out


@pytest.mark.parametrize(
    "name, changes, named",
    [
        ("bi_shared", {"normalize_sent_emb": True}, "--normalize-sent-emb"),
        ("bi_shared", {"use_memories": True}, "--use-memories"),
        ("poly_codes", {"variant": "prelayernorm"}, "--variant prelayernorm"),
        ("poly_codes", {"reduction_type": "max"}, "--reduction-type max"),
        ("cross", {"dict_tokenizer": "bytelevelbpe"}, "--dict-tokenizer bytelevelbpe"),
        ("cross", {"model": "transformer/generator"}, "transformer/generator"),
    ],
)
@pytest.mark.slow
def test_unsupported_options_are_refused_by_name(parlai_models, tmp_path, name, changes, named):
    parlai_file = copy_with_opt(parlai_models.get(name)[0], tmp_path / "in", **changes)
    with pytest.raises(ModelFileError, match=named):
        migrate(parlai_file, str(tmp_path / "out" / "model"))
    assert not os.path.exists(tmp_path / "out" / "model")


@pytest.mark.slow
def test_command_line(parlai_models, tmp_path):
    parlai_file = copy_with_opt(parlai_models.get("cross")[0], tmp_path / "in", variant="prelayernorm")
    command = [sys.executable, "-m", "parlai_poly.migrate", parlai_file, str(tmp_path / "out")]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 2 and "--variant prelayernorm" in refused.stderr
    assert "Traceback" not in refused.stderr
    command[3] = parlai_models.get("cross")[0]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "parlai_poly.agents:cross" in done.stdout and is_safetensors(str(tmp_path / "out"))


class NotATensor:
    """What a weights-only load must refuse to build."""


@pytest.mark.parametrize("content", ["garbage", "object", "no_model", "missing"])
def test_foreign_files_give_model_file_errors(tmp_path, content):
    path = str(tmp_path / "model")
    if content == "garbage":
        with open(path, "wb") as f:
            f.write(os.urandom(1000))
    elif content == "object":  # a pickle that would run code to build an arbitrary object
        torch.save({"model": {"w": torch.zeros(2)}, "extra": NotATensor()}, path)
    elif content == "no_model":
        torch.save({"weights": torch.zeros(2)}, path)
    if content != "missing":
        with open(path + ".opt", "w") as f:
            json.dump({"model": "transformer/polyencoder"}, f)
        with open(path + ".dict", "w") as f:
            f.write("__null__\t1\n")
    with pytest.raises(ModelFileError, match=re.escape(path)):
        migrate(path, str(tmp_path / "out"))


def test_pickled_opt_is_refused(tmp_path):
    path = str(tmp_path / "model")
    torch.save({"model": {}}, path)
    with open(path + ".opt", "wb") as f:
        f.write(b"\x80\x04\x95")  # the start of a pickle, as very old ParlAI wrote its .opt
    with pytest.raises(ModelFileError, match="not JSON"):
        migrate(path, str(tmp_path / "out"))
