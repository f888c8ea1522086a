"""The fixtures are read by ParlAI 1.7.2's own teachers exactly as the real data sets would be,
and are learnable: a ranker that matches topic words beats chance by far."""
import hashlib
import re
from pathlib import Path

import pytest

from parlai_poly.tasks import fixtures
from parlai_poly.tasks.__main__ import main
from parlai_poly.tasks.fixtures import FixtureSizes, teacher_examples
from parlai_poly.tasks.prepare import PrepareError

SIZES = FixtureSizes(train=200, valid=40, test=40)
TOPIC_PATTERN = re.compile(r"\b(" + "|".join(map(re.escape, fixtures.ALL_TOPICS)) + r")\b")


pytestmark = pytest.mark.usefixtures("no_downloads")  # nothing here may reach the network


@pytest.fixture(scope="module")
def datapath(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("datapath")
    fixtures.write_all_fixtures(path, SIZES)
    return path


def label_of(example: dict) -> str:
    return (example.get("labels") or example.get("eval_labels"))[0]


def folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["convai2", "convai2:both", "convai2:none", "convai2:self_revised"])
def test_convai2_variants_have_20_candidates_with_the_label_last(datapath, task):
    valid = teacher_examples(task, "valid", datapath)
    assert len(valid) == SIZES.valid
    assert len(teacher_examples(task, "train:ordered", datapath)) == SIZES.train
    for example in valid:
        assert len(example["label_candidates"]) == 20
        assert list(example["label_candidates"])[-1] == label_of(example)
        assert len(set(example["label_candidates"])) == 20


def test_convai2_no_cands_variant_and_test_mapped_to_valid(datapath):
    no_cands = teacher_examples("convai2:self:no_cands", "valid", datapath)
    assert len(no_cands) == SIZES.valid
    assert all(not ex.get("label_candidates") for ex in no_cands)
    test = teacher_examples("convai2", "test", datapath)
    assert [label_of(e) for e in test] == [label_of(e) for e in teacher_examples("convai2", "valid", datapath)]


@pytest.mark.parametrize(
    "task, own, partner",
    [("convai2", True, False), ("convai2:both", True, True), ("convai2:none", False, False)],
)
def test_convai2_personas_open_each_episode(datapath, task, own, partner):
    examples = teacher_examples(task, "valid", datapath)
    firsts = [ex for i, ex in enumerate(examples) if i == 0 or examples[i - 1]["episode_done"]]
    assert len(firsts) == SIZES.valid // fixtures.CONVAI2_TURNS_PER_EPISODE
    for ex in firsts:
        assert ex["text"].startswith("your persona: ") == own
        assert ex["text"].count("your persona: ") == (4 if own else 0)
        assert ex["text"].count("partner's persona: ") == (4 if partner else 0)
    later = [ex for ex in examples if ex not in firsts]
    assert later and all("persona:" not in ex["text"] for ex in later)


@pytest.mark.parametrize(
    "task, datatype, count, label_key",
    [
        ("dstc7", "train:ordered", SIZES.train, "labels"),
        ("dstc7", "valid", SIZES.valid, "eval_labels"),
        ("dstc7", "test", SIZES.test, "eval_labels"),
    ],
)
def test_dstc7_splits_have_100_candidates_with_the_label(datapath, task, datatype, count, label_key):
    examples = teacher_examples(task, datatype, datapath)
    assert len(examples) == count
    for example in examples:
        assert len(example["label_candidates"]) == 100
        assert example[label_key][0] in example["label_candidates"]
    positions = {list(e["label_candidates"]).index(label_of(e)) for e in examples}
    assert len(positions) > 10, "the label should not sit at one fixed place"


def test_dstc7_test_labels_come_from_the_responses_tsv(datapath):
    folder = datapath / "dstc7"
    assert "options-for-correct-answers" not in (folder / "ubuntu_test_subtask_1.json").read_text()
    tsv_replies = [line.split("\t")[2] for line in (folder / "ubuntu_responses_subtask_1.tsv").read_text().splitlines()]
    assert [label_of(e) for e in teacher_examples("dstc7", "test", datapath)] == tsv_replies


@pytest.mark.slow
def test_dstc7_augmented_and_sampled_train_teachers(datapath):
    augmented = teacher_examples("dstc7:DSTC7TeacherAugmented", "train:ordered", datapath)
    sampled = teacher_examples("dstc7:DSTC7TeacherAugmentedSampled", "train:ordered", datapath)
    assert len(augmented) == len(sampled) > SIZES.train
    assert {len(e["label_candidates"]) for e in augmented} == {100}
    assert {len(e["label_candidates"]) for e in sampled} == {16}
    assert all(e["labels"][0] in e["label_candidates"] for e in sampled)


def test_ubuntu_train_has_no_candidates_and_eval_splits_have_10(datapath):
    train = teacher_examples("ubuntu", "train:ordered", datapath)
    assert len(train) == SIZES.train and all(not e.get("label_candidates") for e in train)
    for split, count in (("valid", SIZES.valid), ("test", SIZES.test)):
        examples = teacher_examples("ubuntu", split, datapath)
        assert len(examples) == count
        for example in examples:
            assert len(set(example["label_candidates"])) == 10
            assert label_of(example) in example["label_candidates"]
            assert "__eou__" not in example["text"] and "\n" in example["text"]


def test_ubuntu_multiturn_teacher_reads_the_fixture(datapath):
    examples = teacher_examples("ubuntu:multiturn", "valid", datapath)
    assert len(examples) >= 2 * SIZES.valid
    assert all(label_of(e) for e in examples)


def topic_overlap_r_at_1(examples) -> float:
    """R@1 of the simplest ranker that could exploit the fixtures' rule: the candidate sharing
    the most topic words with the context wins (ties go to the first candidate)."""
    hits = 0
    for example in examples:
        context = set(TOPIC_PATTERN.findall(example["text"]))
        scores = [len(context & set(TOPIC_PATTERN.findall(c))) for c in example["label_candidates"]]
        best = list(example["label_candidates"])[scores.index(max(scores))]
        hits += best == label_of(example)
    return hits / len(examples)


@pytest.mark.parametrize("task", ["convai2", "dstc7", "ubuntu"])
def test_fixtures_are_learnable_far_above_chance(datapath, task):
    """Chance is 1/20, 1/100 and 1/10; matching topic words is enough for every example."""
    assert topic_overlap_r_at_1(teacher_examples(task, "valid", datapath)) == 1.0


def test_convai2_none_variant_hides_the_persona_answer(datapath):
    """Without personas the first turn of each episode cannot be answered from the text,
    as in the real none_original setting: R@1 drops below the self variant's."""
    assert topic_overlap_r_at_1(teacher_examples("convai2:none", "valid", datapath)) < 1.0


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    small = FixtureSizes(train=8, valid=4, test=4)
    first = fixtures.write_ubuntu_fixture(tmp_path / "a", small, seed=1)
    second = fixtures.write_ubuntu_fixture(tmp_path / "b", small, seed=1)
    other = fixtures.write_ubuntu_fixture(tmp_path / "c", small, seed=2)
    del_built = lambda d: {k: v for k, v in folder_digest(d).items() if k != ".built"}  # noqa: E731
    assert del_built(first) == del_built(second)
    assert del_built(first)["valid.csv"] != del_built(other)["valid.csv"]


def test_writing_the_same_fixture_again_changes_nothing(tmp_path):
    small = FixtureSizes(train=8, valid=4, test=4)
    folder = fixtures.write_convai2_fixture(tmp_path, small)
    before = folder_digest(folder)
    assert fixtures.write_convai2_fixture(tmp_path, small) == folder
    assert folder_digest(folder) == before


def test_other_fixture_sizes_never_overwrite_an_existing_folder(tmp_path):
    folder = fixtures.write_dstc7_fixture(tmp_path, FixtureSizes(train=8, valid=4, test=4))
    before = folder_digest(folder)
    with pytest.raises(PrepareError, match="refusing to overwrite"):
        fixtures.write_dstc7_fixture(tmp_path, FixtureSizes(train=9, valid=4, test=4))
    assert folder_digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dstc7"]


def test_cli_writes_all_fixtures(tmp_path, capsys):
    code = main(["fixtures", "all", "--datapath", str(tmp_path), "--train", "8", "--valid", "4", "--test", "4"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ConvAI2", "Ubuntu", "dstc7"]
    assert (tmp_path / "ConvAI2" / ".built").read_text().split("\n")[1] == "v5.0"
    assert (tmp_path / "dstc7" / ".built").read_text().split("\n")[1] == "2.0"
    assert (tmp_path / "Ubuntu" / ".built").is_file()
    assert f"ready: {tmp_path / 'Ubuntu'}" in capsys.readouterr().out
    assert len(teacher_examples("ubuntu", "valid", tmp_path)) == 4


def test_cli_rejects_a_bad_size_with_exit_2_and_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fixtures", "convai2", "--datapath", str(tmp_path), "--train", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--train" in err
    assert not any(tmp_path.iterdir())
