"""The CCC task: turn parsing, split, candidates, the processed files and the ParlAI teachers.

The processed data is built once per module into a temporary datapath (about 5 s).
"""
import filecmp
import hashlib
import json
import os
from collections import Counter

import numpy as np
import pytest

from benchmarks import ccc_baselines as baselines
from benchmarks.ccc_baselines import RankingExample
from parlai_poly.tasks.ccc import build as ccc_build
from parlai_poly.tasks.ccc import hard_negatives
from parlai_poly.tasks.ccc.__main__ import main as fixed_candidates_cli
from parlai_poly.tasks.ccc.agents import perspective_episodes


def message(sender, text):
    return {"text": text, "timestamp": "2018-05-02T19:38:15Z", "sender": sender}


def conversation(*groups):
    return {"prompt": "p", "ratings": {}, "start": "2018-05-02T19:38:01Z", "messages": [list(g) for g in groups]}


@pytest.fixture(scope="module")
def datapath(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("parlai_data"))
    ccc_build.build(path)
    return path


@pytest.fixture(scope="module")
def processed(datapath):
    return {split: list(ccc_build.read_conversations(datapath, split)) for split in ccc_build.SPLITS}


@pytest.fixture(scope="module")
def stats(datapath):
    return ccc_build.read_stats(datapath)


def create_teacher(datapath, datatype, *extra_args):
    from parlai.core.params import ParlaiParser
    from parlai.core.teachers import create_task_agent_from_taskname

    args = ["--task", "parlai_poly.tasks.ccc", "--datatype", datatype, "--datapath", datapath]
    opt = ParlaiParser(True, False).parse_args(args + list(extra_args))
    return create_task_agent_from_taskname(opt)[0]


def all_examples(teacher):
    examples = []
    while True:
        examples.append(teacher.act())
        if teacher.epoch_done():
            return examples


# --- parsing --------------------------------------------------------------------------------


def test_turns_join_consecutive_messages_of_one_sender():
    raw = conversation(
        [message("a", "Hello"), message("a", "  how are   you? ")],
        [message("b", "fine"), message("b", "")],
        [message("b", "and you?")],  # the same sender in the next group continues the turn
        [message("a", "")],  # an empty turn vanishes...
        [message("b", "still there?")],  # ...so b's messages around it form one turn
        [message("a", "yes\nsorry")],
    )
    assert ccc_build.conversation_turns(raw) == [
        "Hello how are you?",
        "fine and you? still there?",
        "yes sorry",
    ]


def test_single_turn_conversations_are_dropped():
    raw = {
        "monologue": conversation([message("a", "anyone?"), message("a", "hello?")]),
        "dialogue": conversation([message("a", "hi")], [message("b", "hey")]),
        "silent-partner": conversation([message("a", "hi")], [message("b", " ")]),
    }
    by_split = ccc_build.split_conversations(raw)
    kept = [c for conversations in by_split.values() for c in conversations]
    assert kept == [("dialogue", ["hi", "hey"])]


@pytest.mark.slow
def test_real_data_counts(stats):
    """The shipped corpus: 7,168 conversations, 44% single-turn; 131,569 pairs before 12 empty
    turns are removed (they cost 21 pairs and one conversation)."""
    splits = stats["splits"]
    assert stats["raw_conversations"] == 7168
    assert stats["dropped_single_turn_conversations"] == 3151
    assert sum(s["conversations"] for s in splits.values()) == 4017
    assert sum(s["examples"] for s in splits.values()) == 131548
    assert sum(s["turns"] for s in splits.values()) - sum(s["conversations"] for s in splits.values()) == 131548


# --- split ----------------------------------------------------------------------------------


def test_split_is_a_stable_hash_of_the_id():
    conversation_id = "a07edb12-6b91-4138-b11e-02421888d699"
    bucket = int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") % 100
    expected = "train" if bucket < 80 else "valid" if bucket < 90 else "test"
    assert ccc_build.split_of(conversation_id) == expected
    ids = [f"conversation-{i}" for i in range(20000)]
    first, second = [ccc_build.split_of(i) for i in ids], [ccc_build.split_of(i) for i in ids]
    assert first == second
    shares = {split: count / len(ids) for split, count in Counter(first).items()}
    assert shares["train"] == pytest.approx(0.8, abs=0.01)
    assert shares["valid"] == pytest.approx(0.1, abs=0.01)
    assert shares["test"] == pytest.approx(0.1, abs=0.01)


@pytest.mark.slow
def test_processed_splits_are_disjoint_and_follow_the_hash(processed, stats):
    ids = {split: [record["id"] for record in records] for split, records in processed.items()}
    for split, split_ids in ids.items():
        assert len(split_ids) == len(set(split_ids)) == stats["splits"][split]["conversations"]
        assert all(ccc_build.split_of(i) == split for i in split_ids)
    assert not set(ids["train"]) & set(ids["valid"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["valid"]) & set(ids["test"])
    assert all(len(record["turns"]) >= 2 for records in processed.values() for record in records)


@pytest.mark.slow
def test_rebuild_replaces_a_stale_version_with_identical_files(datapath, tmp_path):
    stale = tmp_path / "ccc"
    stale.mkdir()
    (stale / ".built").write_text("2020-01-01\nold-version")
    (stale / "train.jsonl").write_text("an older build's file\n")
    (stale / "hard_negatives").mkdir()
    ccc_build.build(str(tmp_path))
    assert not (stale / "hard_negatives").exists()
    assert (stale / ".built").read_text().split("\n")[1] == ccc_build.VERSION
    names = sorted(n for n in os.listdir(os.path.join(datapath, "ccc")) if n != ".built")
    assert names == sorted(n for n in os.listdir(stale) if n != ".built")
    _, mismatch, errors = filecmp.cmpfiles(os.path.join(datapath, "ccc"), stale, names, shallow=False)
    assert mismatch == errors == []
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".ccc-building")]


def test_missing_package_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(ccc_build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="chitchat-dataset"):
        ccc_build.raw_dataset_path()


# --- candidates -----------------------------------------------------------------------------


def small_split(num_conversations=12, turns_each=4):
    return [
        (f"c{c}", [f"conversation {c} turn {t}" for t in range(turns_each)])
        for c in range(num_conversations)
    ]


def test_negatives_come_from_other_conversations_deterministically():
    conversations = small_split()
    first = list(ccc_build.label_candidates_for(conversations, seed=3))
    assert first == list(ccc_build.label_candidates_for(conversations, seed=3))
    assert first != list(ccc_build.label_candidates_for(conversations, seed=4))
    for (conversation_id, turns), per_turn in zip(conversations, first):
        assert len(per_turn) == len(turns) - 1
        for label, candidates in zip(turns[1:], per_turn):
            assert len(candidates) == 20 and len(set(candidates)) == 20
            assert candidates.count(label) == 1
            negatives = [c for c in candidates if c != label]
            assert not any(n.startswith(f"conversation {conversation_id[1:]} ") for n in negatives)


def test_too_small_a_pool_raises_instead_of_looping():
    with pytest.raises(ValueError, match="too few"):
        list(ccc_build.label_candidates_for(small_split(num_conversations=3)))


@pytest.mark.slow
def test_eval_examples_carry_20_candidates_with_the_label_once(processed):
    for split in ccc_build.EVAL_SPLITS:
        label_positions = Counter()
        for record in processed[split]:
            turns, per_turn = record["turns"], record["label_candidates"]
            assert len(per_turn) == len(turns) - 1
            for label, candidates in zip(turns[1:], per_turn):
                assert len(candidates) == 20 and len(set(candidates)) == 20
                assert candidates.count(label) == 1
                label_positions[candidates.index(label)] += 1
        assert sorted(label_positions) == list(range(20))  # shuffled, not always in one place
        assert max(label_positions.values()) < 2 * min(label_positions.values())
    assert all("label_candidates" not in record for record in processed["train"])


@pytest.mark.slow
def test_fixed_candidates_file_holds_each_test_response_once(datapath, processed, stats, capsys):
    path = ccc_build.fixed_candidates_path(datapath)
    with open(path, encoding="utf-8") as f:
        content = f.read()
    assert content.endswith("\n")
    lines = content.split("\n")[:-1]
    assert len(lines) == len(set(lines)) == stats["splits"]["test"]["distinct_responses"]
    assert all(line and line == line.strip() for line in lines)
    responses = {turn for record in processed["test"] for turn in record["turns"][1:]}
    assert set(lines) == responses
    inline = {c for record in processed["test"] for cands in record["label_candidates"] for c in cands}
    assert inline <= set(lines)

    fixed_candidates_cli(["--datapath", datapath])
    assert capsys.readouterr().out.strip() == path
    with pytest.raises(ValueError):
        ccc_build.fixed_candidates_path(datapath, "train")


# --- episodes and the ParlAI teacher --------------------------------------------------------


def test_perspective_episodes_use_every_pair_once():
    turns = ["t0", "t1", "t2", "t3", "t4", "t5"]
    cands = [[f"cands for {t}"] for t in turns[1:]]
    second_speaker, first_speaker = perspective_episodes(turns, cands)
    assert second_speaker == [
        {"text": "t0", "labels": ["t1"], "label_candidates": ["cands for t1"]},
        {"text": "t2", "labels": ["t3"], "label_candidates": ["cands for t3"]},
        {"text": "t4", "labels": ["t5"], "label_candidates": ["cands for t5"]},
    ]
    assert first_speaker == [
        {"text": "t0\nt1", "labels": ["t2"], "label_candidates": ["cands for t2"]},
        {"text": "t3", "labels": ["t4"], "label_candidates": ["cands for t4"]},
    ]
    assert perspective_episodes(["t0", "t1"]) == [[{"text": "t0", "labels": ["t1"]}]]


@pytest.mark.slow
def test_valid_teacher_through_parlai(datapath, processed, stats):
    teacher = create_teacher(datapath, "valid")
    expected_examples = stats["splits"]["valid"]["examples"]
    assert teacher.num_examples() == expected_examples
    two_sided = sum(2 if len(r["turns"]) > 2 else 1 for r in processed["valid"])
    assert teacher.num_episodes() == two_sided

    examples = all_examples(teacher)
    assert len(examples) == expected_examples
    assert sum(bool(e["episode_done"]) for e in examples) == two_sided
    for example in examples:
        assert "labels" not in example  # ParlAI turns labels into eval_labels outside training
        label = example["eval_labels"][0]
        assert len(example["label_candidates"]) == 20
        assert list(example["label_candidates"]).count(label) == 1

    # The history an agent rebuilds from the first two episodes is the first conversation.
    turns = processed["valid"][0]["turns"]
    first_episode_end = next(i for i, e in enumerate(examples) if e["episode_done"])
    assert examples[0]["text"] == turns[0] and examples[0]["eval_labels"][0] == turns[1]
    second_episode_start = examples[first_episode_end + 1]
    assert second_episode_start["text"] == turns[0] + "\n" + turns[1]
    assert second_episode_start["eval_labels"][0] == turns[2]


@pytest.mark.slow
def test_train_teacher_gives_candidates_only_when_asked(datapath, stats):
    plain = create_teacher(datapath, "train:ordered")
    assert plain.num_examples() == stats["splits"]["train"]["examples"]
    first = plain.act()
    assert "labels" in first and "label_candidates" not in first

    with_candidates = create_teacher(datapath, "train:ordered", "--ccc-train-candidates", "true")
    example = with_candidates.act()
    assert example["text"] == first["text"] and example["labels"] == first["labels"]
    assert len(example["label_candidates"]) == 20
    assert list(example["label_candidates"]).count(example["labels"][0]) == 1


def test_training_reads_every_episode_once_per_pass_across_batch_copies(datapath):
    """Copies of the train teacher (one per batch row) share one random order: a pass gives
    each episode once, the next pass another order; ParlAI's own order repeats episodes."""
    teacher = create_teacher(datapath, "train")
    copies = [teacher] + [type(teacher)(teacher.opt, teacher.share()) for _ in range(7)]
    n = teacher.num_episodes()
    passes = [[copies[i % 8].next_episode_idx() for i in range(n)] for _ in range(2)]
    assert sorted(passes[0]) == sorted(passes[1]) == list(range(n))
    assert passes[0] != passes[1]
    parlai = create_teacher(datapath, "train", "--ccc-train-order", "parlai")
    assert len({parlai.next_episode_idx() for _ in range(n)}) < 0.8 * n  # about 63% distinct


@pytest.mark.parametrize("passes_before", [0, 1])
def test_a_resumed_training_reads_on_from_where_it_stopped(datapath, tmp_path, passes_before):
    """Resuming from a checkpoint, ParlAI restores its epochs from the checkpoint's trainstats;
    the train teacher continues its order from there instead of reading the same start again."""
    from parlai.core.teachers import create_task_agent_from_taskname
    from parlai.scripts.train_model import setup_args

    model_file = str(tmp_path / "model")

    def training_teacher(*args):  # as `parlai train_model -mf MODEL --seed 3` creates it
        args = ["-t", "parlai_poly.tasks.ccc", "-dt", "train", "-dp", datapath, "--seed", "3", *args]
        return create_task_agent_from_taskname(setup_args().parse_args(args))[0]

    first = training_teacher("-mf", model_file)
    n = first.num_episodes()
    read = [first.next_episode_idx() for _ in range(passes_before * n + n // 3)]
    examples_read = sum(len(first.data.data[episode]) for episode in read)
    with open(model_file + ".checkpoint.trainstats", "w") as stats:
        json.dump({"total_epochs": examples_read / first.num_examples()}, stats)
    open(model_file + ".checkpoint", "w").close()

    resumed = training_teacher("-mf", model_file)
    rest_of_pass = [resumed.next_episode_idx() for _ in range(n - n // 3)]
    assert sorted(read[passes_before * n:] + rest_of_pass) == list(range(n))
    assert resumed.next_episode_idx() == training_teacher()._pass_order(passes_before + 1)[0]


# --- hard negatives -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained_bi_file(tiny_backbone, tmp_path_factory):
    from helpers import make_agent

    path = str(tmp_path_factory.mktemp("bi") / "model")
    make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "-mf", path).save(path)
    return path


def hard_negative_teacher(datapath, model_file, conversations=10):
    return create_teacher(
        datapath, "train:ordered", "--ccc-hard-negatives-model", model_file,
        "--ccc-hard-negatives-conversations", str(conversations),
    )


@pytest.mark.slow
def test_hard_negatives_are_what_the_bi_encoder_prefers(datapath, untrained_bi_file):
    from helpers import rank, reload_agent

    examples = all_examples(hard_negative_teacher(datapath, untrained_bi_file))
    mined = list(ccc_build.read_jsonl(hard_negatives.mined_path(datapath, untrained_bi_file, 10)))
    assert len(mined) == 10 and len(examples) == sum(len(r["turns"]) - 1 for r in mined)
    bi = reload_agent(untrained_bi_file, datatype="test", return_cand_scores=True, cap_num_predictions=1000)
    percentiles = []  # of each negative, in the bi-encoder's ranking of all other responses
    for record, turn in [(r, t) for r in mined[:3] for t in range(1, len(r["turns"]))][:20]:
        label = record["turns"][turn]
        candidates = record["label_candidates"][turn - 1]
        assert len(set(candidates)) == 1 + hard_negatives.HARD + hard_negatives.RANDOM
        assert candidates.count(label) == 1 and not set(candidates) & set(record["turns"][1:turn])
        others = [t for r in mined if r is not record for t in r["turns"][1:]]
        pool = [t for t in dict.fromkeys(others) if t != label]
        ranked, _ = rank(bi, "\n".join(record["turns"][:turn]), pool)
        position = {text: p for p, text in enumerate(ranked)}
        percentiles += [1 - position[c] / len(pool) for c in candidates if c != label]
    # random negatives average 0.5; 7 bests of 19 (about 0.95 each) and 8 random make 0.71
    assert np.mean(percentiles) > 0.62


@pytest.mark.slow
def test_hard_negatives_are_mined_once_per_model(datapath, untrained_bi_file, monkeypatch):
    path = hard_negatives.mined_path(datapath, untrained_bi_file, 10)
    hard_negative_teacher(datapath, untrained_bi_file)
    monkeypatch.setattr(hard_negatives, "mine", lambda *a: pytest.fail("mined again"))
    first = hard_negative_teacher(datapath, untrained_bi_file).act()
    assert len(first["label_candidates"]) == 16 and os.path.isfile(path)
    assert hard_negatives.mined_path(datapath, untrained_bi_file, 11) != path


@pytest.mark.slow
def test_hard_negatives_refuse_models_without_context_vectors(datapath, tiny_backbone, tmp_path, untrained_bi_file):
    from helpers import make_agent

    poly_file = str(tmp_path / "poly")
    make_agent("-m", "parlai_poly.agents:poly", "--hf-model", tiny_backbone, "-mf", poly_file).save(poly_file)
    with pytest.raises(ValueError, match="--ccc-hard-negatives-model .*bi-encoder"):
        hard_negative_teacher(datapath, poly_file, conversations=2)
    with pytest.raises(ValueError, match="--ccc-hard-negatives-model .*no such model file"):
        hard_negative_teacher(datapath, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="choose one"):
        create_teacher(datapath, "train", "--ccc-train-candidates", "true", "--ccc-hard-negatives-model", untrained_bi_file)


@pytest.mark.slow
def test_test_teacher_and_display_data(datapath, stats, capsys):
    assert create_teacher(datapath, "test").num_examples() == stats["splits"]["test"]["examples"]

    from parlai.scripts.display_data import DisplayData

    DisplayData.main(
        task="parlai_poly.tasks.ccc",
        datatype="valid",
        num_examples=5,
        datapath=datapath,
        display_add_fields="label_candidates",
    )
    shown = capsys.readouterr().out
    assert shown.count("[eval_labels]:") == 5
    assert shown.count("(5 of 20 shown)") == 5


# --- baselines ------------------------------------------------------------------------------


def test_ranking_examples_replay_parlai_history():
    record = {"turns": ["t0", "t1", "t2", "t3", "t4"]}
    contexts = [(e.context, e.label) for e in baselines.ranking_examples([record])]
    assert contexts == [
        ("t0", "t1"),
        ("t0\nt1\nt2", "t3"),
        ("t0\nt1", "t2"),
        ("t0\nt1\nt2\nt3", "t4"),
    ]
    long_history = ["one two", "three four five", "six"]
    assert baselines.recent_history(long_history, 3) == "three four five\nsix"
    assert baselines.recent_history(long_history, 100) == "one two\nthree four five\nsix"


def test_baselines_rank_as_the_agents_do():
    """One tie rule (parlai_poly.ranking): a 3-way tie for first is R@1 1/3, MRR (1 + 1/2 + 1/3) / 3."""
    examples = [RankingExample("c", "b", ["a", "b", "c"]), RankingExample("c", "a", ["a", "b", "c"])]
    scores = [np.array([0.1, 0.9, 0.5]), np.array([0.5, 0.5, 0.5])]
    summary = baselines.evaluate(examples, scores.__getitem__)
    assert summary["R@1"] == pytest.approx((1 + 1 / 3) / 2)
    assert summary["R@5"] == pytest.approx(1.0)
    assert summary["MRR"] == pytest.approx((1 + (1 + 1 / 2 + 1 / 3) / 3) / 2)


def test_tfidf_prefers_the_overlapping_candidate():
    topics = ["pizza with cheese", "the weather today", "a dog in the park", "love and you"] * 5
    train = [baselines.RankingExample(f"do you like {t}", f"i like {t}", None) for t in topics]
    examples = [
        baselines.RankingExample(
            "do you like pizza with cheese", "i love pizza with extra cheese",
            ["the weather is cold", "i love pizza with extra cheese", "my dog runs fast"],
        )
    ]
    result = baselines.evaluate(examples, baselines.tfidf_scores(examples, train))
    assert result["R@1"] == 1.0


@pytest.mark.slow
def test_baselines_command_writes_its_table(datapath, tmp_path, capsys):
    report = baselines.main(
        ["--datapath", datapath, "--split", "valid", "--max-examples", "200",
         "--baselines", "random", "--out", str(tmp_path)]
    )
    written = json.loads((tmp_path / "ccc_baselines_valid.json").read_text())
    assert written == report and written["examples"] == 200
    assert 0.0 <= written["results"]["random"]["R@1"] <= 0.2
    assert "| random |" in capsys.readouterr().out


def test_peer_whole_split_order_is_parlai_batched_eval_order(datapath):
    """The peer's whole-split values pair with ours only in the order our evaluate meets them:
    ParlAI's batched eval, each row reading one episode to its end, then the next unread one."""
    from parlai.core.params import ParlaiParser
    from parlai.core.worlds import create_task

    from benchmarks.st_peer import ccc_examples, eval_loop_order

    args = ["-t", "parlai_poly.tasks.ccc", "-dt", "valid", "-dp", datapath, "-m", "repeat_label", "-bs", "7"]
    world = create_task(ParlaiParser(True, True).parse_args(args), [])
    met = []
    while not world.epoch_done():
        world.parley()
        acts = [row.get_acts()[0] for row in world.worlds]
        met += [(act["conversation_id"], act["eval_labels"][0]) for act in acts if act and "eval_labels" in act]
    whole = ccc_examples(datapath, "valid", ["--ccc-eval-sample", str(10**9)])
    ordered = eval_loop_order(whole, 7)
    assert [(e["conversation_id"], e["eval_labels"][0]) for e in ordered] == met
    assert ordered != whole  # the batched order is not the split's own
