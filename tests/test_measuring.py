"""Measuring honestly: conversation bootstrap, CCC samples, each candidate encoded once,
the evaluation command, and the codes' diversity figures."""
import json

import numpy as np
import pytest
import torch
from parlai.scripts.eval_model import EvalModel
from parlai.scripts.train_model import TrainModel

from helpers import model_options, train_options
from parlai_poly import evaluate, ranking
from parlai_poly.encoding_memo import EncodingMemo
from parlai_poly.modules.poly_encoder import attention_entropy, init_codes, mean_pairwise_cosine
from parlai_poly.stats import bootstrap_means, conversation_bootstrap, paired_bootstrap
from parlai_poly.tasks.ccc.agents import full_context_examples, perspective_episodes, sample_examples


# ---- the conversation bootstrap, against cases worked out by hand ------------------------
def test_bootstrap_resamples_whole_conversations():
    # conversation a holds two hits, b one miss. Drawing two conversations with replacement:
    # aa (p 1/4) -> mean 1, ab or ba (p 1/2) -> 2/3, bb (p 1/4) -> 0
    means = bootstrap_means([1, 1, 0], ["a", "a", "b"], resamples=20000, seed=0)
    values, counts = np.unique(means.round(6), return_counts=True)
    assert values.tolist() == [0.0, round(2 / 3, 6), 1.0]
    assert counts / 20000 == pytest.approx([0.25, 0.5, 0.25], abs=0.015)
    result = conversation_bootstrap([1, 1, 0], ["a", "a", "b"], resamples=20000)
    assert result["mean"] == pytest.approx(2 / 3)
    assert (result["low"], result["high"]) == (0.0, 1.0)
    assert (result["examples"], result["conversations"]) == (3, 2)


def test_clustered_examples_give_the_width_of_their_conversations():
    rng = np.random.default_rng(0)
    per_conversation = rng.integers(0, 2, size=20).astype(float)
    # 20 conversations of 10 identical examples: as uncertain as 20 examples, not 200
    clustered = conversation_bootstrap(np.repeat(per_conversation, 10), np.repeat(np.arange(20), 10))
    independent = conversation_bootstrap(np.repeat(per_conversation, 10), np.arange(200))
    alone = conversation_bootstrap(per_conversation, np.arange(20))
    width = lambda r: r["high"] - r["low"]  # noqa: E731
    assert width(clustered) == pytest.approx(width(alone), rel=0.15)
    assert width(clustered) > 2.5 * width(independent)


def test_paired_difference_is_the_bootstrap_of_per_example_differences():
    conversations = ["a", "a", "b", "c", "c", "c"]
    a, b = [1, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]
    paired = paired_bootstrap(a, b, conversations, resamples=500)
    assert paired == conversation_bootstrap([1, 0, 0, 0, 1, 0], conversations, resamples=500)
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(a, b[:-1], conversations)


# ---- CCC evaluation samples ----------------------------------------------------------------
def history_contexts(episode):
    """The contexts an agent's history builds for an episode: every text and label, joined."""
    history, contexts = [], []
    for example in episode:
        history.append(example["text"])
        contexts.append("\n".join(history))
        history.append(example["labels"][0])
    return contexts


def test_full_context_examples_match_what_the_episodes_build():
    turns = [f"t{i}" for i in range(7)]
    cands = [[f"c{i}-{j}" for j in range(3)] for i in range(6)]
    by_label = {}
    for episode in perspective_episodes(turns, cands):
        for example, context in zip(episode, history_contexts(episode)):
            by_label[example["labels"][0]] = (context, example["label_candidates"])
    examples = full_context_examples(turns, cands)
    assert len(examples) == len(by_label) == 6
    for example in examples:
        assert (example["text"], example["label_candidates"]) == by_label[example["labels"][0]]


def test_samples_are_seeded_and_spread_over_all_conversations():
    conversations = [(f"conv{c}", [f"c{c} t{i}" for i in range(12)], None) for c in range(40)]
    sample = list(sample_examples(conversations, 100, seed=3))
    assert sample == list(sample_examples(conversations, 100, seed=3))
    assert sample != list(sample_examples(conversations, 100, seed=4))
    assert len(sample) == 100 and len({json.dumps(e) for e in sample}) == 100
    # 100 of 440 examples drawn at random: nearly every conversation, not the first nine
    assert len({e["conversation_id"] for e in sample}) >= 35
    assert all(e["text"].startswith(e["conversation_id"].replace("conv", "c") + " t0") for e in sample)
    assert len(list(sample_examples(conversations, 10_000, seed=0))) == 440


# ---- each distinct candidate encoded once --------------------------------------------------
def test_memo_encodes_each_distinct_candidate_once_with_the_same_result():
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 8, padding_idx=0)
    calls = []

    def encode(ids):  # [n, l] -> [n, d]: masked mean, as a pooled encoder is
        calls.append(ids.shape)
        mask = (ids != 0).unsqueeze(-1).float()
        return (table(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)

    rows = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [5, 6, 7, 0], [0, 0, 0, 0], [8, 9, 0, 0], [3, 0, 0, 0]])
    memo = EncodingMemo()
    with torch.no_grad():
        expected = encode(rows)
        got = memo.encode(rows, 0, encode, batch_size=2, version=0)
    assert torch.allclose(got[[0, 1, 2, 4, 5]], expected[[0, 1, 2, 4, 5]], atol=1e-6)
    assert torch.equal(got[3], torch.zeros(8))  # an all-padding filler row
    assert memo.encoded == 3
    memo.encode(rows[:2], 0, encode, batch_size=2, version=0)
    assert memo.encoded == 3  # seen under these weights: nothing encoded
    memo.encode(rows[:2], 0, encode, batch_size=2, version=1)
    assert memo.encoded == 5  # the weights changed: encoded again


@pytest.fixture(scope="module")
def trained_bi(tmp_path_factory, tiny_backbone, synthetic_task):
    model_file = str(tmp_path_factory.mktemp("bi") / "model")
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, model_file, num_epochs=1))
    return model_file


@pytest.mark.slow
def test_evaluation_with_the_memo_ranks_as_encoding_every_candidate(trained_bi, synthetic_task, monkeypatch):
    options = dict(synthetic_task, model_file=trained_bi, datatype="valid", batchsize=8, eval_candidates="inline")
    with_memo = EvalModel.main(**options)
    encoded = []
    real = EncodingMemo.encode

    def every_candidate(self, ids, pad_idx, encode, batch_size, version):
        self.table = {}  # forget every earlier candidate: each is encoded again
        encoded.append(len(ids))
        return real(self, ids, pad_idx, encode, batch_size, version)

    monkeypatch.setattr(EncodingMemo, "encode", every_candidate)
    without = EvalModel.main(**options)
    assert sum(encoded) == 40 * 8
    for key in ("R@1/8", "R@5/8", "mrr", "rank"):
        assert float(with_memo[key]) == pytest.approx(float(without[key]), abs=1e-6)


# ---- the evaluation command ----------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_reports_intervals_and_paired_differences(trained_bi, tiny_backbone, synthetic_task, tmp_path, capsys):
    task = ["--fromfile-datapath", synthetic_task["fromfile_datapath"], "--fromfile-datatype-extension", "true"]
    zero_shot = "agent:parlai_poly.agents:bi"
    argv = [trained_bi, zero_shot, "-t", "fromfile:parlaiformat", "-dt", "valid", "-bs", "8", "--out", str(tmp_path)]
    summary = evaluate.main(argv + ["--", "--hf-model", tiny_backbone] + task)
    trained_name, zero_name = list(summary["models"])
    report = EvalModel.main(**dict(synthetic_task, model_file=trained_bi, datatype="valid", batchsize=8))
    trained = summary["models"][trained_name]
    assert trained["R@1/8"]["mean"] == pytest.approx(float(report["R@1/8"]), abs=1e-6)
    assert trained["R@1/8"]["low"] <= trained["R@1/8"]["mean"] <= trained["R@1/8"]["high"]
    untrained = EvalModel.main(**model_options("bi", tiny_backbone, synthetic_task, batchsize=8), datatype="valid")
    difference = summary["models"][zero_name][f"R@1/8 - {trained_name}"]
    assert difference["mean"] == pytest.approx(float(untrained["R@1/8"]) - float(report["R@1/8"]), abs=1e-6)
    assert difference["high"] < 0  # the trained model is better, and the interval says so
    assert "no conversation_id" in capsys.readouterr().err
    # per-example values written, and read back instead of evaluated again
    again = evaluate.main([str(tmp_path / f"{trained_name.replace('/', '__')}.jsonl"), "-t", "fromfile:parlaiformat"])
    assert list(again["models"].values())[0]["mrr"] == trained["mrr"]


def test_per_example_files_that_are_missing_or_broken_are_named(tmp_path):
    from parlai_poly.errors import ParlaiPolyError

    missing = str(tmp_path / "gone.jsonl")
    with pytest.raises(ParlaiPolyError, match="gone.jsonl: no such file"):
        evaluate.main([missing])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"conversation": "a", "mrr": 1.0}\n{"conversation": "b", "mrr"\n')
    with pytest.raises(ParlaiPolyError, match="broken.jsonl, line 2"):
        evaluate.main([str(broken)])


# ---- the codes' diversity figures ------------------------------------------------------------
def test_diversity_of_codes_made_equal_and_made_orthogonal():
    equal = torch.ones(2, 4, 6)
    orthogonal = torch.eye(6)[:4].expand(2, 4, 6)
    everything = torch.ones(2, 4, dtype=torch.bool)
    assert mean_pairwise_cosine(equal, everything).tolist() == pytest.approx([1.0, 1.0])
    assert mean_pairwise_cosine(orthogonal, everything).tolist() == pytest.approx([0.0, 0.0])
    # a masked (padding) vector does not count: 3 equal real vectors and one opposite filler
    mixed = torch.cat([torch.ones(1, 3, 6), -torch.ones(1, 1, 6)], 1)
    assert mean_pairwise_cosine(mixed, torch.tensor([[True, True, True, False]])).item() == pytest.approx(1.0)


def test_attention_entropy_is_one_for_uniform_and_zero_for_peaked():
    mask = torch.tensor([[True, True, True, True, False, False]])
    uniform = torch.tensor([[[0.25] * 4 + [0, 0]] * 3])  # [1, 3 queries, 6 positions]
    peaked = torch.zeros(1, 3, 6)
    peaked[0, torch.arange(3), torch.arange(3)] = 1
    assert attention_entropy(uniform, mask).item() == pytest.approx(1.0)
    assert attention_entropy(peaked, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_codes_start_as_asked():
    torch.manual_seed(0)
    orthogonal = init_codes(16, 64, "orthogonal", 10.0)
    assert torch.allclose(orthogonal @ orthogonal.t(), 100 * torch.eye(16), atol=1e-3)
    uniform = init_codes(16, 64, "uniform")
    assert 0 <= uniform.min() and uniform.max() < 1
    assert init_codes(16, 64).std().item() == pytest.approx(0.02, rel=0.15)
    with pytest.raises(ValueError, match="--codes-init sideways"):
        init_codes(16, 64, "sideways")


# ---- rank metrics under ties, one rule -----------------------------------------------------
def test_ties_count_as_a_random_order_among_them():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.9, 0.2, 0.2, 0.3], [0.1, 0.9, 0.2, 0.3]])
    metrics = ranking.rank_metrics(scores, torch.tensor([0, 1, 1]), ks=(1, 2))
    # example 1: tied with 2 others at the top; 2: one above, tied with one; 3: alone on top
    assert metrics["rank"].tolist() == pytest.approx([2.0, 3.5, 1.0])
    assert metrics["mrr"].tolist() == pytest.approx([(1 + 1 / 2 + 1 / 3) / 3, (1 / 3 + 1 / 4) / 2, 1.0])
    assert metrics["R@1"].tolist() == pytest.approx([1 / 3, 0.0, 1.0])
    assert metrics["R@2"].tolist() == pytest.approx([2 / 3, 0.0, 1.0])


def test_retrieve_and_rerank_reorders_only_the_head():
    top = torch.tensor([[4, 2, 7, 1]])  # retrieved, best first
    by_value = lambda picked: picked.float()  # noqa: E731 a stage preferring higher indices
    assert ranking.rerank_head(top, by_value).tolist() == [[7, 4, 2, 1]]
    assert ranking.rerank_head(top, by_value, k=2).tolist() == [[4, 2, 7, 1]]
    assert ranking.rerank_head(top, lambda picked: -picked.float(), k=2).tolist() == [[2, 4, 7, 1]]
    below = torch.full((1, 8), -0.5)
    scores = ranking.cascade_scores(top, below)
    assert scores.argsort(1, descending=True)[0, :4].tolist() == [4, 2, 7, 1]
    assert scores[0, 0].item() == -0.5  # not retrieved: keeps its score below every ranked one


def test_batch_duplicates_counts_repeated_labels_and_batches_like_parlai():
    """benchmarks/batch_duplicates.py: a label repeated in its batch counts each copy; batchsort
    batches hold every example once, within the token budget, similar lengths together."""
    import random

    from benchmarks.batch_duplicates import TRUNCATE, batchsort_batches, share_with_own_label

    labels = ["yes", "no", "yes", "ok", "ok", "ok"]
    assert share_with_own_label([[0, 1, 2], [3, 4, 5]], labels) == 5 / 6
    assert share_with_own_label([[0, 1, 3], [2, 4, 5]], labels) == 2 / 6
    rng = random.Random(0)
    lengths = [(64, 8 * (1 + i % 8)) for i in range(500)]
    batches = batchsort_batches(list(range(500)), lengths, 16, rng)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    for batch in batches:
        widths = [sum(lengths[i]) for i in batch]
        assert len(batch) <= 16 and max(widths) * len(batch) <= 2 * TRUNCATE * 16
    spread = sum(max(lengths[i][1] for i in b) - min(lengths[i][1] for i in b) for b in batches) / len(batches)
    assert spread < 16  # shuffled batches of these lengths would spread about 56
