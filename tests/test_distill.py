"""Distillation: the losses by hand, the teacher score cache, students that move toward their
teacher, the unsupervised Trans-Encoder loop end to end, and the report."""
import glob
import json
import math
import os
import shutil

import pytest
import torch
from parlai.core.agents import create_agent
from parlai.core.params import ParlaiParser
from parlai.scripts.eval_model import EvalModel
from parlai.scripts.train_model import TrainModel
from safetensors.torch import load_file

from helpers import CHANCE, make_agent, model_options, train_options
from parlai_poly.agents.base import PAD_SCORE
from benchmarks import distill_report as report
from parlai_poly.distill import transencoder
from parlai_poly.distill.losses import LOSSES, distill_loss, standardize
from parlai_poly.distill.student import chosen_texts, top1_agreement, top_k_with_label
from parlai_poly.distill.teacher import TeacherScorer
from parlai_poly.errors import ParlaiPolyError
from parlai_poly.model_file import is_safetensors, save_weights

LN2, LN3 = math.log(2), math.log(3)


# ---- losses on hand-computed examples ------------------------------------------------------
def test_kl_by_hand():
    # row 0: teacher softmax([0, ln 3]) = [1/4, 3/4], student softmax([0, 0]) = [1/2, 1/2]:
    #   KL = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.1732868 + 0.3040988 = 0.1308120
    # row 1: the student already has the teacher's distribution -> 0
    # third column: padding, whatever its scores
    teacher = torch.tensor([[0.0, LN3, 9.0], [1.0, 2.0, 3.0]])
    student = torch.tensor([[0.0, 0.0, PAD_SCORE], [11.0, 12.0, 13.0]])  # row 1: teacher + 10
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = distill_loss("kl", student, teacher, mask)
    torch.testing.assert_close(loss, torch.tensor([0.1308120, 0.0]), atol=1e-6, rtol=0)
    # T = 2: teacher [0, 2 ln 3] / 2 is row 0's teacher again; x T^2 = 4 x 0.1308120 = 0.5232481
    loss_t2 = distill_loss("kl", student[:1], torch.tensor([[0.0, 2 * LN3, 9.0]]), mask[:1], temperature=2.0)
    torch.testing.assert_close(loss_t2, torch.tensor([0.5232481]), atol=1e-6, rtol=0)


def test_margin_mse_by_hand():
    student = torch.tensor([[3.0, 1.0, 2.0, PAD_SCORE]])
    teacher = torch.tensor([[5.0, 4.0, 1.0, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    # label 0: student margins 3-1 = 2, 3-2 = 1; teacher 5-4 = 1, 5-1 = 4
    #   ((2-1)^2 + (1-4)^2) / 2 = (1 + 9) / 2 = 5   (the padding column is no negative)
    assert distill_loss("margin-mse", student, teacher, mask, torch.tensor([0])).item() == pytest.approx(5.0)
    # label 2: student 2-3 = -1, 2-1 = 1; teacher 1-5 = -4, 1-4 = -3 -> (3^2 + 4^2) / 2 = 12.5
    assert distill_loss("margin-mse", student, teacher, mask, torch.tensor([2])).item() == pytest.approx(12.5)


def test_bce_by_hand():
    # teacher [0, 2]: z = [-1, 1], pseudo-labels y = sigmoid(z) = [0.2689414, 0.7310586]
    # student logits [ln 3, ln 3]: sigmoid = 3/4, so BCE_i = -(y_i ln 3/4 + (1 - y_i) ln 1/4)
    #   y_0 + y_1 = 1, so the mean is -(1/2 ln 3/4 + 1/2 ln 1/4) = (0.2876821 + 1.3862944) / 2 = 0.8369882
    student = torch.tensor([[LN3, LN3, PAD_SCORE]])
    mask = torch.tensor([[True, True, False]])
    loss = distill_loss("bce", student, torch.tensor([[0.0, 2.0, 5.0]]), mask)
    torch.testing.assert_close(loss, torch.tensor([0.8369882]), atol=1e-6, rtol=0)
    # z() makes pseudo-labels independent of the teacher's shift and scale
    torch.testing.assert_close(distill_loss("bce", student, torch.tensor([[10.0, 30.0, -4.0]]), mask), loss)
    # student logits [0, 0]: sigmoid 1/2, BCE = ln 2 whatever the labels
    assert distill_loss("bce", torch.zeros(1, 3), torch.tensor([[0.0, 2.0, 5.0]]), mask).item() == pytest.approx(LN2)


def test_mse_by_hand():
    # z([1, 2, 3]) = [-1.2247449, 0, 1.2247449] (population std sqrt(2/3)); z([30, 20, 10]) is
    # its negative: squared differences [6, 0, 6], mean 4 (= 2 x (1 - correlation -1))
    student = torch.tensor([[1.0, 2.0, 3.0, PAD_SCORE], [1.0, 2.0, 3.0, 0.0]])
    teacher = torch.tensor([[30.0, 20.0, 10.0, 0.0], [2.0, 4.0, 6.0, 0.0]])  # row 1: 2 x student
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    loss = distill_loss("mse", student, teacher, mask)
    torch.testing.assert_close(loss, torch.tensor([4.0, 0.0]), atol=1e-5, rtol=0)
    z = standardize(student, mask)
    torch.testing.assert_close(z[0], torch.tensor([-1.2247449, 0.0, 1.2247449, 0.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padding_takes_no_part(name):
    """Padding scores (-1e20 from the agents) give no NaN, no inf and no gradient."""
    student = torch.tensor([[1.0, 2.0, 0.5, PAD_SCORE]], requires_grad=True)
    teacher = torch.tensor([[0.3, 2.5, 1.0, 1e20]])
    mask = torch.tensor([[True, True, True, False]])
    loss = distill_loss(name, student, teacher, mask, torch.tensor([1]), 2.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and loss.item() > 0
    assert torch.isfinite(student.grad).all() and student.grad[0, 3] == 0
    unpadded = distill_loss(name, student[:, :3].detach(), teacher[:, :3], mask[:, :3], torch.tensor([1]), 2.0)
    torch.testing.assert_close(loss.detach(), unpadded)


def test_top1_agreement_ignores_padding():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    student = torch.tensor([[0.0, 1.0, 9.0], [3.0, 2.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0], [0.0, 5.0, 1.0]])
    assert top1_agreement(student, teacher, mask).tolist() == [1.0, 0.0]


def test_top_k_with_label_and_their_texts_by_hand():
    student = torch.tensor([[1.0, 5.0, 3.0, 2.0], [9.0, 0.0, 4.0, PAD_SCORE]])
    chosen = top_k_with_label(student, torch.tensor([0, 1]), 2)
    assert chosen.tolist() == [[0, 1, 2], [1, 0, 2]]  # the label first, then the best others
    assert chosen_texts(["a", "b", "c", "d"], chosen) == [["a", "b", "c"], ["b", "a", "c"]]
    # per-example lists: a padding column (the second row has 3 candidates) gives no text
    chosen = top_k_with_label(student, torch.tensor([0, 1]), 3)
    assert chosen.tolist() == [[0, 1, 2, 3], [1, 0, 2, 3]]
    assert chosen_texts([["a", "b", "c", "d"], ["e", "f", "g"]], chosen) == [["a", "b", "c", "d"], ["f", "e", "g"]]


# ---- a teacher, and the synthetic task's examples as texts ---------------------------------
@pytest.fixture(scope="module")
def cross_teacher(tmp_path_factory, tiny_backbone, synthetic_task):
    """A tiny cross-encoder trained on the synthetic task's labels (a few seconds). 8 epochs: at 5
    it once ended at R@1/8 0.575 in a full `make test` run (0.6 or more alone)."""
    model_file = str(tmp_path_factory.mktemp("teacher") / "model")
    valid, _ = TrainModel.main(**train_options("cross", tiny_backbone, synthetic_task, model_file, num_epochs=8))
    assert float(valid["R@1/8"]) >= 0.6  # a teacher worth learning from
    return model_file


def read_examples(synthetic_task, split="valid"):
    """(contexts, candidate lists, label indices) of one split of the synthetic task."""
    contexts, candidates, labels = [], [], []
    with open(f"{synthetic_task['fromfile_datapath']}_{split}.txt") as f:
        for line in f:
            fields = dict(field.split(":", 1) for field in line.rstrip("\n").split("\t"))
            contexts.append(fields["text"])
            candidates.append(fields["label_candidates"].split("|"))
            labels.append(candidates[-1].index(fields["labels"]))
    return contexts, candidates, labels


def agreement(teacher_file, student_file, examples):
    """How close the student's scores are to the teacher's on the examples' candidates:
    KL(teacher || student), mse of standardized scores, top-1 agreement."""
    contexts, candidates, _ = examples
    teacher, mask = TeacherScorer([teacher_file]).scores(contexts, candidates)
    student, _ = TeacherScorer([student_file]).scores(contexts, candidates)
    return {
        "kl": distill_loss("kl", student, teacher, mask).mean().item(),
        "mse": distill_loss("mse", student, teacher, mask).mean().item(),
        "top1": top1_agreement(student, teacher, mask).mean().item(),
    }


def save_untrained(agent, path, backbone, **extra):
    torch.manual_seed(0)  # a cross-encoder's classifier starts random: the same one every run
    opt = ParlaiParser(True, True).parse_kwargs(
        **model_options(agent, backbone, {}, model_file=path, datatype="valid", **extra)
    )
    create_agent(opt).save(path)
    return path


# ---- the teacher score cache ---------------------------------------------------------------
def copy_model(model_file, folder):
    os.makedirs(folder, exist_ok=True)
    for suffix in ("", ".opt", ".dict"):
        shutil.copy(model_file + suffix, os.path.join(folder, "model" + suffix))
    return os.path.join(folder, "model")


@pytest.mark.slow
def test_teacher_scores_round_trip_through_the_cache(cross_teacher, synthetic_task, tmp_path):
    contexts, candidates, _ = read_examples(synthetic_task)
    contexts, candidates = contexts[:12], candidates[:12]
    cache = str(tmp_path / "cache")
    pairs = sum(len(c) for c in candidates)

    direct, mask = TeacherScorer([cross_teacher]).scores(contexts, candidates)
    first = TeacherScorer([cross_teacher], cache)
    scores, _ = first.scores(contexts, candidates)
    assert (first.computed, first.reused) == (pairs, 0)
    torch.testing.assert_close(scores, direct)
    first.flush()
    shards = glob.glob(os.path.join(cache, "teacher-*", "scores-*"))
    assert sorted(os.path.splitext(s)[1] for s in shards) == [".json", ".safetensors"]  # no pickle
    tensor_file = next(s for s in shards if s.endswith(".safetensors"))
    assert is_safetensors(tensor_file)
    manifest = json.load(open(tensor_file[: -len(".safetensors")] + ".json"))
    assert manifest["count"] == pairs and manifest["key"]["agent"] == "cross"

    # a second scorer (a second run or student) reads them back and scores nothing
    second = TeacherScorer([cross_teacher], cache)
    again, _ = second.scores(contexts, candidates)
    assert (second.computed, second.reused) == (0, pairs)
    assert torch.equal(again, scores)
    # keyed by texts: the same pairs as candidates shared by the batch (--candidates batch)
    # are found too (every example's inline list holds all 8 replies), with the same scores
    shared = sorted(set(candidates[0]))
    batch_scores, batch_mask = second.scores(contexts, shared)
    assert batch_scores.shape == (12, 8) and batch_mask.all() and second.computed == 0
    torch.testing.assert_close(batch_scores, TeacherScorer([cross_teacher]).scores(contexts, shared)[0])

    # one weight of the teacher changed: its cached scores are not used
    changed = copy_model(cross_teacher, str(tmp_path / "changed"))
    weights = load_file(changed)
    name = "classifier.bias"
    weights[name] = weights[name] + 1.0
    save_weights(changed, weights, "cross")
    third = TeacherScorer([changed], cache)
    moved, _ = third.scores(contexts, candidates)
    assert (third.computed, third.reused) == (pairs, 0)
    torch.testing.assert_close(moved[mask], scores[mask] + 1.0)  # the bias moved every score
    assert third.caches[0].fingerprint != first.caches[0].fingerprint


@pytest.mark.slow
def test_a_damaged_cache_shard_is_skipped(cross_teacher, synthetic_task, tmp_path, parlai_warnings):
    contexts, candidates, _ = read_examples(synthetic_task)
    cache = str(tmp_path / "cache")
    first = TeacherScorer([cross_teacher], cache)
    scores, _ = first.scores(contexts[:4], candidates[:4])
    first.flush()
    tensor_file = glob.glob(os.path.join(cache, "teacher-*", "scores-*.safetensors"))[0]
    with open(tensor_file, "r+b") as f:
        f.truncate(os.path.getsize(tensor_file) - 8)
    second = TeacherScorer([cross_teacher], cache)
    again, _ = second.scores(contexts[:4], candidates[:4])
    assert any("skipping shard" in message for message in parlai_warnings)
    assert second.computed == 32
    torch.testing.assert_close(again, scores)


# ---- students --------------------------------------------------------------------------------
def one_step(backbone, teacher, examples, label_shift, weight):
    """The weights of a bi-encoder after one training step on 8 examples whose labels are
    moved ``label_shift`` places along their (unchanged) inline candidates."""
    contexts, candidates, labels = examples
    agent = make_agent(
        "-m", "parlai_poly.agents:bi", "--hf-model", backbone, "--candidates", "inline",
        "--distill-teacher", teacher, "--distill-weight", str(weight), "--distill-loss", "kl",
        "--learningrate", "1e-3", "--warmup-updates", "-1", "--freeze-embeddings", "false",
    )
    observations = []
    for text, cands, label in list(zip(contexts, candidates, labels))[:8]:
        agent.reset()
        label_text = cands[(label + label_shift) % len(cands)]
        observations.append(agent.observe({"text": text, "labels": [label_text], "label_candidates": cands, "episode_done": True}))
    agent.reset()
    replies = agent.batch_act(observations)  # batchify, train_step, each example's metrics
    return agent.model.state_dict(), [{k: float(v) for k, v in r["metrics"].items()} for r in replies]


@pytest.mark.slow
def test_distill_weight_one_ignores_the_labels(cross_teacher, tiny_backbone, synthetic_task):
    examples = read_examples(synthetic_task, "train")
    right, metrics = one_step(tiny_backbone, cross_teacher, examples, 0, 1.0)
    wrong, _ = one_step(tiny_backbone, cross_teacher, examples, 3, 1.0)
    assert all(torch.equal(right[k], wrong[k]) for k in right)  # labels changed nothing
    for example in metrics:
        assert example["mean_loss"] == example["distill_loss"] and "label_loss" not in example
        assert example["teacher_top1"] in (0.0, 1.0)
    mixed_right, mixed_metrics = one_step(tiny_backbone, cross_teacher, examples, 0, 0.5)
    mixed_wrong, _ = one_step(tiny_backbone, cross_teacher, examples, 3, 0.5)
    assert not all(torch.equal(mixed_right[k], mixed_wrong[k]) for k in mixed_right)
    for example in mixed_metrics:  # (1 - w) * label loss + w * distill loss, per example
        expected = 0.5 * example["label_loss"] + 0.5 * example["distill_loss"]
        assert example["mean_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("distinct", [False, True])
def test_distill_top_k_asks_the_teacher_for_the_label_and_k_others(distinct, cross_teacher, tiny_backbone, synthetic_task, monkeypatch):
    """Batch negatives (8 candidates each): with --distill-top-k 2 the teacher scores 3 pairs
    per example (64 without): the label, then the student's 2 best others, and the distill
    loss sees the student's and the teacher's scores of those same texts, column by column.
    With --distinct-batch-candidates and two examples sharing a label (7 candidates), each
    still gets its own label first, and the copy is never one of its negatives."""
    from parlai_poly.distill import student as student_module

    seen = {}
    real_chosen_texts, real_loss = student_module.chosen_texts, student_module.distill_loss
    monkeypatch.setattr(student_module, "chosen_texts", lambda *a: seen.setdefault("texts", real_chosen_texts(*a)))
    monkeypatch.setattr(student_module, "distill_loss", lambda *a: seen.setdefault("loss_args", a) and real_loss(*a))
    contexts, candidates, labels = read_examples(synthetic_task, "train")
    agent = make_agent(
        "-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--candidates", "batch",
        "--distill-teacher", cross_teacher, "--distill-weight", "1.0", "--distill-top-k", "2",
        "--learningrate", "1e-3", "--warmup-updates", "-1", "--distinct-batch-candidates", str(distinct),
    )
    examples = {}  # the first 8 examples whose labels differ
    for text, cands, label in zip(contexts, candidates, labels):
        if len(examples) < 8 and cands[label] not in examples.values():
            examples[text] = cands[label]
    texts_labels = list(examples.items())
    if distinct:
        texts_labels[5] = (texts_labels[5][0], texts_labels[1][1])  # one label twice in the batch
    observations = []
    for text, label in texts_labels:
        agent.reset()
        observations.append(agent.observe({"text": text, "labels": [label], "episode_done": True}))
    agent.reset()
    replies = agent.batch_act(observations)
    assert agent.distillation.scorer.computed == 8 * 3
    texts, (_, student, teacher, mask, distill_labels, _) = seen["texts"], seen["loss_args"]
    batch_contexts = [o["text"] for o in observations]  # batch candidates: the batch's labels
    assert [row[0] for row in texts] == [o["labels"][0] for o in observations]  # the label first
    assert len(agent._last_candidates[0]) == (7 if distinct else 8)
    assert all(row[0] not in row[1:] for row in texts)  # no copy of its own label among its negatives
    assert student.shape == teacher.shape == (8, 3) and mask.all() and not distill_labels.any()
    assert (student[:, 1].detach() >= student[:, 2].detach()).all()  # the student's best others, best first
    expected, _ = TeacherScorer([cross_teacher]).scores(batch_contexts, texts)
    torch.testing.assert_close(teacher, expected)  # the teacher's scores of the same texts
    assert all(math.isfinite(float(r["metrics"]["distill_loss"])) and float(r["metrics"]["distill_loss"]) >= 0 for r in replies)
    with pytest.raises(ParlaiPolyError, match="--distill-top-k -1"):
        make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--distill-top-k", "-1")


@pytest.mark.slow
@pytest.mark.parametrize(
    "batching",
    [dict(distinct_batch_candidates=True, length_groups=2), dict(dynamic_batching="batchsort")],
    ids=["distinct_grouped", "batchsort"],
)
def test_a_distilled_recipe_trains_with_its_batches(batching, cross_teacher, tiny_backbone, synthetic_task, tmp_path):
    """The zoo's distilled recipe: random batches of distinct candidates in 2 length groups
    (and batchsort's, where ParlAI reorders each batch's examples), the teacher on the label
    and the student's 2 best others."""
    student = str(tmp_path / "student" / "model")
    valid, _ = TrainModel.main(
        **train_options(
            "poly", tiny_backbone, synthetic_task, student, num_epochs=1, **batching,
            distill_teacher=cross_teacher, distill_top_k=2, distill_weight=0.5, log_every_n_steps=5,
        )
    )
    assert float(valid["R@1/8"]) > CHANCE
    reports = json.load(open(student + ".trainstats"))["train_reports"]
    assert reports and all("distill_loss" in r and "teacher_top1" in r for r in reports)  # the teacher took part


@pytest.mark.slow
def test_a_student_trained_on_the_teacher_alone_moves_toward_it(cross_teacher, tiny_backbone, synthetic_task, tmp_path):
    examples = read_examples(synthetic_task)
    start = save_untrained("bi", str(tmp_path / "start" / "model"), tiny_backbone)
    before = agreement(cross_teacher, start, examples)
    student = str(tmp_path / "student" / "model")
    valid, _ = TrainModel.main(
        **train_options(
            "bi", tiny_backbone, synthetic_task, student, num_epochs=2, distill_teacher=cross_teacher,
            distill_weight=1.0, distill_loss="kl",
        )
    )
    after = agreement(cross_teacher, student, examples)
    assert after["kl"] < before["kl"] / 2
    assert after["top1"] >= 0.6 > before["top1"]
    assert float(valid["R@1/8"]) >= 0.5 > CHANCE  # learned the task from the teacher, no labels


@pytest.mark.slow
def test_a_second_student_reuses_the_cached_teacher_scores(cross_teacher, tiny_backbone, synthetic_task, tmp_path):
    """A bi-encoder run fills the cache; a poly-encoder student with the same data order
    (seed) finds every pair there and writes nothing new."""
    cache = str(tmp_path / "cache")
    common = dict(num_epochs=0.5, distill_teacher=cross_teacher, distill_cache_dir=cache, seed=3)
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, str(tmp_path / "bi" / "model"), **common))
    shards = sorted(glob.glob(os.path.join(cache, "teacher-*", "scores-*.json")))
    assert shards
    TrainModel.main(
        **train_options(
            "poly", tiny_backbone, synthetic_task, str(tmp_path / "poly" / "model"), distill_loss="margin-mse", **common
        )
    )
    assert sorted(glob.glob(os.path.join(cache, "teacher-*", "scores-*.json"))) == shards


@pytest.mark.slow
def test_bad_distill_options_are_refused(cross_teacher, tiny_backbone, tmp_path):
    with pytest.raises(ParlaiPolyError, match="--distill-weight"):
        make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--distill-weight", "1.5")
    with pytest.raises(ParlaiPolyError, match="own model file"):
        make_agent("-m", "parlai_poly.agents:cross", "--hf-model", tiny_backbone, "-mf", cross_teacher, "--distill-teacher", cross_teacher)
    stray = tmp_path / "not_a_model"
    stray.write_text("hello")
    with pytest.raises(ParlaiPolyError, match="not a parlai-poly model file"):
        TeacherScorer([str(stray)])


# ---- the unsupervised loop -----------------------------------------------------------------
def loop_args(backbone, synthetic_task, out, cycles, *extra):
    return [
        "--task", "fromfile:parlaiformat", "--eval-task", "fromfile:parlaiformat",
        "--set", f"fromfile_datapath={synthetic_task['fromfile_datapath']}",
        "--set", "fromfile_datatype_extension=true", "--set", "freeze_embeddings=false",
        "--hf-model", backbone, "--cycles", str(cycles), "--out", str(out),
        "--bi-steps", "30", "--cross-steps", "30", "--bi-batchsize", "16", "--cross-batchsize", "8",
        "--lr", "1e-3", "--warmup-updates", "5", "--eval-datatype", "valid", "--eval-max-examples", "40",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_transencoder_loop_runs_two_cycles_and_resumes(tiny_backbone, synthetic_task, tmp_path, monkeypatch):
    out = tmp_path / "loop"
    results = transencoder.main(loop_args(tiny_backbone, synthetic_task, out, 2))
    assert [c["cycle"] for c in results["cycles"]] == [0, 1, 2]
    assert set(results["cycles"][0]["models"]) == {"bi"}
    for k in (1, 2):
        entry = results["cycles"][k]
        assert set(entry["models"]) == {"cross", "bi"}
        assert entry["teachers"] == {"cross": [str(out / f"cycle{k - 1}_bi" / "model")], "bi": [str(out / f"cycle{k}_cross" / "model")]}
        for kind in ("cross", "bi"):
            assert os.path.isfile(out / f"cycle{k}_{kind}" / "model")
            assert entry["models"][kind]["metrics"]["exs"] == 40 and "R@1/8" in entry["models"][kind]["metrics"]
    assert json.load(open(out / "results.json")) == results

    # each student moved toward its teacher (labels never used: the teacher's scores are all it saw)
    examples = read_examples(synthetic_task)
    bi0, cross1, bi1 = (str(out / name / "model") for name in ("cycle0_bi", "cycle1_cross", "cycle1_bi"))
    assert "log_scale" in load_file(cross1)  # the loop's cross-encoders default to --cross-head segment-cosine
    fresh = save_untrained("cross", str(tmp_path / "fresh_cross" / "model"), tiny_backbone, cross_head="segment-cosine")
    assert agreement(bi0, cross1, examples)["mse"] < agreement(bi0, fresh, examples)["mse"] / 2
    assert agreement(cross1, bi1, examples)["mse"] < agreement(cross1, bi0, examples)["mse"] / 2

    # run again: every cycle is done, nothing is trained or evaluated
    def refuse(**kwargs):
        raise AssertionError("a finished cycle ran again")

    with monkeypatch.context() as m:
        m.setattr(TrainModel, "main", refuse)
        m.setattr(EvalModel, "main", refuse)
        assert transencoder.main(loop_args(tiny_backbone, synthetic_task, out, 2))["cycles"] == results["cycles"]
    # a third cycle extends the run; other settings are refused rather than mixed in
    extended = transencoder.main(loop_args(tiny_backbone, synthetic_task, out, 3))
    assert [c["cycle"] for c in extended["cycles"]] == [0, 1, 2, 3] and extended["cycles"][:3] == results["cycles"]
    other = loop_args(tiny_backbone, synthetic_task, out, 3)
    other[other.index("--bi-steps") + 1] = "31"
    with pytest.raises(ParlaiPolyError, match="changed: bi_steps"):
        transencoder.main(other)

    # the report reads what the loop and eval_model wrote
    teacher_report = tmp_path / "cross.json"
    EvalModel.main(model_file=cross1, report_filename=str(teacher_report), datatype="valid", **synthetic_task)
    made = report.main(
        ["--out", str(tmp_path / "report"), "--metric", "R@1/8", "--loop", str(out / "results.json"),
         "--teacher", str(teacher_report), "--labels-only", f"bi={write_metrics(tmp_path, 'bi', 0.25)}",
         "--distilled", f"bi:kl={write_metrics(tmp_path, 'bi_kl', 0.5)}"]
    )  # fmt: skip
    for suffix in ("json", "md", "png"):
        assert os.path.isfile(tmp_path / "report" / f"distill_report.{suffix}")
    assert open(tmp_path / "report" / "distill_report.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    series = made["loops"][0]["series"]
    assert series["bi"] == {str(c["cycle"]): c["models"]["bi"]["metrics"]["R@1/8"] for c in extended["cycles"]}
    assert made["loops"][0]["zero_shot"] == extended["cycles"][0]["models"]["bi"]["metrics"]["R@1/8"]
    assert made["supervised"]["teacher"] == pytest.approx(json.load(open(teacher_report))["report"]["R@1/8"])


@pytest.mark.slow
def test_loop_cross_encoders_can_start_as_the_zero_shot_bi_encoder(tiny_backbone, synthetic_task, tmp_path):
    """--cross-segment-attention-bias: cycle 1's cross-encoder starts from cycle 0's bi-encoder
    file (its context encoder) with the attention across nearly closed, not from the backbone."""
    out = tmp_path / "loop"
    transencoder.main(loop_args(tiny_backbone, synthetic_task, out, 1, "--cross-segment-attention-bias", "-8"))
    bi0, cross1 = str(out / "cycle0_bi" / "model"), str(out / "cycle1_cross" / "model")
    opt = json.load(open(cross1 + ".opt"))
    assert opt["init_model"] == bi0 and opt["cross_segment_attention_bias"] == -8.0
    cross_weights = load_file(cross1)
    assert "segment_bias" in cross_weights
    examples = read_examples(synthetic_task)
    fresh = save_untrained("cross", str(tmp_path / "fresh_cross" / "model"), tiny_backbone, cross_head="segment-cosine")
    assert agreement(bi0, cross1, examples)["mse"] < agreement(bi0, fresh, examples)["mse"] / 2
    with pytest.raises(SystemExit):
        transencoder.parse_args(loop_args(tiny_backbone, synthetic_task, out, 1, "--cross-head", "linear", "--cross-segment-attention-bias", "-8"))


def test_seed_per_cycle_draws_other_pairs_each_cycle(tmp_path):
    base = ["--task", "t", "--eval-task", "t", "--out", str(tmp_path), "--seed", "5"]
    plain = transencoder.TransEncoderLoop(transencoder.parse_args(base))
    per_cycle = transencoder.TransEncoderLoop(transencoder.parse_args(base + ["--seed-per-cycle"]))
    mutual = transencoder.TransEncoderLoop(transencoder.parse_args(base + ["--seed-per-cycle", "--mutual"]))
    assert [plain.seed(k, "a") for k in (1, 2, 3)] == [5, 5, 5]
    assert [per_cycle.seed(k, "a") for k in (1, 2, 3)] == [5, 6, 7]
    # no two trainings of one kind share a seed: model B never repeats model A's pairs
    assert [(mutual.seed(k, "a"), mutual.seed(k, "b")) for k in (1, 2)] == [(5, 6), (7, 8)]
    assert per_cycle.train_options("bi", 3, "a", None, ["x"])["seed"] == 7

    # a run made before the option existed resumes as a run without it, not with it
    old_config = {k: v for k, v in plain.config.items() if k != "seed_per_cycle"}
    (tmp_path / "results.json").write_text(json.dumps({"format": transencoder.FORMAT, "config": old_config, "cycles": []}))
    assert plain.load_results()["cycles"] == []
    with pytest.raises(ParlaiPolyError, match="changed: seed_per_cycle"):
        per_cycle.load_results()


def write_metrics(folder, name, value):
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"report": {"R@1/8": value, "exs": 40}}))
    return str(path)


def test_report_gap_closed_by_hand(tmp_path):
    # labels only 0.50, distilled 0.62, teacher 0.70: (0.62 - 0.50) / (0.70 - 0.50) = 0.6 >= 0.5
    made = report.main(
        ["--out", str(tmp_path / "r"), "--teacher", write_metrics20(tmp_path, "t", 0.70),
         "--labels-only", f"poly={write_metrics20(tmp_path, 'p', 0.50)}",
         "--distilled", f"poly:kl={write_metrics20(tmp_path, 'pk', 0.62)}", f"poly:margin-mse={write_metrics20(tmp_path, 'pm', 0.55)}"]
    )  # fmt: skip
    rows = {r["model"]: r for r in made["supervised"]["rows"]}
    assert rows["poly:kl"]["gap_closed"] == pytest.approx(0.6) and rows["poly:kl"]["meets_target"] is True
    assert rows["poly:margin-mse"]["gap_closed"] == pytest.approx(0.25) and rows["poly:margin-mse"]["meets_target"] is False
    assert "| poly:kl | 0.5000 | 0.6200 | 0.7000 | 0.6000 | yes |" in open(tmp_path / "r" / "distill_report.md").read()


def test_loop_checks_by_hand(tmp_path):
    def write_loop(name, bi, cross):
        cycles = [{"cycle": 0, "models": {"bi": {"metrics": {"R@1/20": bi[0]}}}}]
        for c, (b, x) in enumerate(zip(bi[1:], cross), 1):
            cycles.append({"cycle": c, "models": {"bi": {"metrics": {"R@1/20": b}}, "cross": {"metrics": {"R@1/20": x}}}})
        (tmp_path / name).write_text(json.dumps({"cycles": cycles}))
        return report.loop_table(str(tmp_path / name), "R@1/20")["checks"]

    worse = write_loop("worse.json", [0.50, 0.45], [0.48])
    assert worse["bi"] == {"beats_zero_shot_after_cycle_1": False, "last_cycle": 1, "holds_by_last_cycle": None, "best_cycle": 0}
    better = write_loop("better.json", [0.50, 0.55, 0.60, 0.58], [0.52, 0.50, 0.51])
    assert better["bi"] == {"beats_zero_shot_after_cycle_1": True, "last_cycle": 3, "holds_by_last_cycle": True, "best_cycle": 2}
    assert better["cross"]["holds_by_last_cycle"] is False and better["cross"]["best_cycle"] == 1


def write_metrics20(folder, name, value):
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"opt": {}, "report": {"R@1/20": value}}))
    return str(path)


@pytest.mark.slow
def test_mutual_loop_averages_two_seeds(tiny_backbone, synthetic_task, tmp_path):
    out = tmp_path / "mutual"
    results = transencoder.main(loop_args(tiny_backbone, synthetic_task, out, 1, "--mutual"))
    entry = results["cycles"][1]
    assert set(entry["models"]) == {"cross", "cross_b", "bi", "bi_b"}
    assert entry["teachers"]["cross"] == [str(out / "cycle0_bi" / "model"), str(out / "cycle0_bi_b" / "model")]
    assert entry["teachers"]["bi"] == [str(out / "cycle1_cross" / "model"), str(out / "cycle1_cross_b" / "model")]
    # the two cross-encoders differ (seeds), both learned from the mean of both bi-encoders
    a, b = (load_file(str(out / name / "model")) for name in ("cycle1_cross", "cycle1_cross_b"))
    assert any(not torch.equal(a[name], b[name]) for name in a)
