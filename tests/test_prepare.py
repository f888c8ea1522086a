"""prepare: good official-style data goes into place and ParlAI reads it without downloading;
bad data is refused with its file and line, and the datapath is left exactly as it was."""
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from parlai_poly.tasks import fixtures
from parlai_poly.tasks.__main__ import main
from parlai_poly.tasks.fixtures import FixtureSizes, teacher_examples
from parlai_poly.tasks.prepare import FIXTURE_NOTE, LAYOUTS, PrepareError, prepare

SMALL = FixtureSizes(train=12, valid=8, test=8)
EVAL_READS = {  # task -> (teacher, datatype, candidates per example)
    "convai2": ("convai2", "valid", 20),
    "dstc7": ("dstc7", "test", 100),
    "ubuntu": ("ubuntu", "test", 10),
}


pytestmark = pytest.mark.usefixtures("no_downloads")  # nothing here may reach the network


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    """All three fixtures, used only as a read-only source of well-formed files."""
    root = tmp_path_factory.mktemp("fixtures")
    fixtures.write_all_fixtures(root, SMALL)
    return root


@pytest.fixture
def download(tmp_path, fixture_root):
    """A user's folder of downloaded files for one task (data files only, no marker)."""

    def make(task: str) -> Path:
        folder = tmp_path / "download" / task
        folder.mkdir(parents=True)
        for path in (fixture_root / LAYOUTS[task].folder).iterdir():
            if path.name not in (".built", FIXTURE_NOTE):
                shutil.copyfile(path, folder / path.name)
        return folder

    return make


@pytest.fixture
def datapath(tmp_path) -> Path:
    """A datapath already holding some other data, which must come through untouched."""
    path = tmp_path / "data"
    (path / "other_task").mkdir(parents=True)
    (path / "other_task" / "keep.txt").write_text("user data\n")
    return path


def snapshot(root: Path) -> dict:
    """Every entry below root, hidden ones included: kind plus content hash or link target."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                entries[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                entries[key] = "dir"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def make_tar(archive: Path, folder: Path, top: str = "") -> Path:
    """An archive of folder's files, at its root (top='') or under one top folder."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"{top}/{path.name}" if top else path.name)
    return archive


def assert_parlai_reads(task: str, datapath: Path) -> None:
    teacher, datatype, candidates = EVAL_READS[task]
    examples = teacher_examples(teacher, datatype, datapath)
    assert len(examples) == (SMALL.valid if datatype == "valid" else SMALL.test)
    for example in examples:
        assert len(example["label_candidates"]) == candidates
        assert example["eval_labels"][0] in example["label_candidates"]


# ----------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_prepare_lays_out_a_folder_parlai_reads_without_downloading(task, download, datapath):
    source = download(task)
    source_before = snapshot(source)
    target = prepare(task, source, datapath)
    layout = LAYOUTS[task]
    assert target == datapath.absolute() / layout.folder
    marker_lines = (target / ".built").read_text().split("\n")
    assert marker_lines[1:] == ([layout.version] if layout.version else [])
    assert sorted(p.name for p in target.iterdir()) == sorted([".built"] + [p.name for p in source.iterdir()])
    assert snapshot(source) == source_before
    assert sorted(p.name for p in datapath.iterdir()) == sorted(["other_task", layout.folder])
    assert_parlai_reads(task, datapath)


@pytest.mark.parametrize("task, top", [("convai2", ""), ("dstc7", ""), ("ubuntu", ""), ("ubuntu", "ubuntu")])
def test_prepare_accepts_the_official_archive_name(task, top, download, datapath, tmp_path):
    archive = make_tar(tmp_path / LAYOUTS[task].archive, download(task), top)
    prepare(task, archive, datapath)
    assert_parlai_reads(task, datapath)
    assert not any(p.name.startswith(".") for p in datapath.iterdir()), "staging folder left behind"


def test_prepare_finds_the_official_archive_inside_a_folder(download, datapath, tmp_path):
    holder = tmp_path / "downloads"
    holder.mkdir()
    make_tar(holder / "convai2_fix_723.tgz", download("convai2"))
    prepare("convai2", holder, datapath)
    assert_parlai_reads("convai2", datapath)


def test_prepare_creates_a_missing_datapath(download, tmp_path):
    datapath = tmp_path / "new" / "data"
    prepare("ubuntu", download("ubuntu"), datapath)
    assert_parlai_reads("ubuntu", datapath)


def test_prepare_fills_an_empty_target_folder(download, datapath):
    (datapath / "dstc7").mkdir()
    prepare("dstc7", download("dstc7"), datapath)
    assert_parlai_reads("dstc7", datapath)


def test_prepare_again_with_the_same_data_changes_nothing(download, datapath):
    source = download("dstc7")
    prepare("dstc7", source, datapath)
    before = snapshot(datapath)
    prepare("dstc7", source, datapath)
    assert snapshot(datapath) == before


def test_cli_prepare_reports_each_file_and_exits_0(download, datapath, capsys):
    assert main(["prepare", "convai2", "--from", str(download("convai2")), "--datapath", str(datapath)]) == 0
    out = capsys.readouterr().out
    assert f"valid_self_original.txt: {SMALL.valid} examples, 20 candidates each" in out
    assert f"ready: {datapath.absolute() / 'ConvAI2'}" in out


# ----------------------------------------------------------------------------- existing targets


def test_prepare_never_overwrites_a_prepared_folder_with_other_content(download, datapath):
    source = download("ubuntu")
    prepare("ubuntu", source, datapath)
    before = snapshot(datapath)
    with open(source / "valid.csv", "a", encoding="utf-8") as f:
        f.write("extra context,extra reply" + ",distractor" * 9 + "\r\n")
    with pytest.raises(PrepareError, match=r"Ubuntu is already prepared .*first difference: valid.csv.*refusing to overwrite"):
        prepare("ubuntu", source, datapath)
    assert snapshot(datapath) == before


def test_prepare_refuses_a_folder_of_another_version_that_parlai_would_delete(download, datapath):
    old = datapath / "ConvAI2"
    old.mkdir()
    (old / ".built").write_text("2019-01-01 00:00:00\nv4.0")
    (old / "train_self_original.txt").write_text("1 my own old data\tlabel\n")
    before = snapshot(datapath)
    with pytest.raises(PrepareError, match=r"version 'v4.0'.*wants 'v5.0'.*DELETE"):
        prepare("convai2", download("convai2"), datapath)
    assert snapshot(datapath) == before


def test_prepare_refuses_a_non_empty_folder_without_marker(download, datapath):
    (datapath / "dstc7").mkdir()
    (datapath / "dstc7" / "notes.txt").write_text("mine\n")
    before = snapshot(datapath)
    with pytest.raises(PrepareError, match="no .built marker; refusing to touch it"):
        prepare("dstc7", download("dstc7"), datapath)
    assert snapshot(datapath) == before


# ----------------------------------------------------------------------------- bad files


def rewrite_line(path: Path, lineno: int, edit) -> None:
    """Replace line ``lineno`` (1-based) with edit(line) where line has no line end."""
    lines = path.read_bytes().decode("utf-8").split("\n")
    lines[lineno - 1] = edit(lines[lineno - 1])
    path.write_bytes("\n".join(lines).encode("utf-8"))


def truncate_in_line(path: Path, lineno: int, keep: float) -> None:
    """Cut the file inside line ``lineno``, keeping that fraction of it: a partial download."""
    lines = path.read_bytes().split(b"\n")
    cut = lines[lineno - 1][: int(len(lines[lineno - 1]) * keep)]
    path.write_bytes(b"\n".join(lines[: lineno - 1] + [cut]))


def drop_last_candidate(line: str) -> str:
    return line.rsplit("|", 1)[0]


def replace_label_among_candidates(line: str) -> str:
    return drop_last_candidate(line) + "|a reply that is not the label ."


def drop_one_dstc7_option(line: str) -> str:
    start = line.index('{"candidate-id"', line.index('"options-for-next"'))
    end = line.index("}, ", start) + 3
    return line[:start] + line[end:]


def change_dstc7_answer(line: str) -> str:
    marker = '"options-for-correct-answers": [{"candidate-id": '
    start = line.index('"utterance": "', line.index(marker)) + len('"utterance": "')
    return line[:start] + "no such option " + line[start:]


def ends_on_a_persona_line(path: Path) -> int:
    """Keep the file up to the second line of its last episode (a persona line)."""
    lines = path.read_text().split("\n")
    last_start = max(i for i, line in enumerate(lines) if line.startswith("1 "))
    path.write_text("\n".join(lines[: last_start + 2]) + "\n")
    return last_start + 2


BAD_FILES = [
    # task, file, corruption(path) -> line it should be reported at, message
    ("convai2", "valid_self_original.txt", lambda p: truncate_in_line(p, 7, 0.6) or 7, "candidates, expected 20"),
    ("convai2", "train_self_original.txt", lambda p: rewrite_line(p, 6, replace_label_among_candidates) or 6, "is not among its candidates"),
    ("convai2", "valid_both_original.txt", lambda p: rewrite_line(p, 10, drop_last_candidate) or 10, "has 19 candidates, expected 20"),
    ("convai2", "valid_self_original.txt", lambda p: rewrite_line(p, 9, lambda line: "2" + line[1:]) or 9, "starts an episode without its line 1"),
    ("convai2", "train_self_original.txt", ends_on_a_persona_line, "episode ends without a labelled line"),
    ("dstc7", "ubuntu_dev_subtask_1.json", lambda p: truncate_in_line(p, 3, 0.5) or 3, "bad JSON"),
    ("dstc7", "ubuntu_train_subtask_1.json", lambda p: rewrite_line(p, 4, drop_one_dstc7_option) or 4, "has 99 options-for-next, expected 100"),
    ("dstc7", "ubuntu_train_subtask_1.json", lambda p: rewrite_line(p, 2, change_dstc7_answer) or 2, "is not among options-for-next"),
    ("dstc7", "ubuntu_responses_subtask_1.tsv", lambda p: p.write_bytes(p.read_bytes()[:-1]) and SMALL.test, "last line has no newline"),
    ("ubuntu", "valid.csv", lambda p: rewrite_line(p, 5, lambda line: line.rsplit(",", 1)[0] + "\r") or 5, "has 10 fields, expected 11"),
    ("ubuntu", "test.csv", lambda p: truncate_in_line(p, 6, 0.5) or 6, "fields, expected 11"),
    ("ubuntu", "train.csv", lambda p: rewrite_line(p, 3, lambda line: line[: line.rindex(",")] + ",yes\r") or 3, "Label 'yes' is not 0 or 1"),
]


@pytest.mark.parametrize("task, name, corrupt, message", BAD_FILES, ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(BAD_FILES)])
def test_prepare_names_the_bad_file_and_line_and_leaves_the_datapath_alone(task, name, corrupt, message, download, datapath):
    source = download(task)
    line = corrupt(source / name)
    before, source_before = snapshot(datapath), snapshot(source)
    with pytest.raises(PrepareError) as error:
        prepare(task, source, datapath)
    assert str(error.value).startswith(f"{source / name}:{line}: ")
    assert message in str(error.value)
    assert snapshot(datapath) == before
    assert snapshot(source) == source_before


def test_a_bad_file_inside_an_archive_is_named_by_its_path_in_the_archive(download, datapath, tmp_path):
    source = download("ubuntu")
    rewrite_line(source / "valid.csv", 5, lambda line: line.rsplit(",", 1)[0] + "\r")
    archive = make_tar(tmp_path / "ubuntu.tar.gz", source, top="ubuntu")
    before = snapshot(datapath)
    with pytest.raises(PrepareError, match=rf"^{archive}/ubuntu/valid.csv:5: row has 10 fields, expected 11"):
        prepare("ubuntu", archive, datapath)
    assert snapshot(datapath) == before


def test_dstc7_test_answer_missing_from_options_names_the_test_json_line(download, datapath):
    source = download("dstc7")
    rewrite_line(source / "ubuntu_responses_subtask_1.tsv", 3, lambda line: line + " (changed)")
    with pytest.raises(PrepareError, match=r"ubuntu_test_subtask_1.json:4: example-id 300002: correct answer .* is not among"):
        prepare("dstc7", source, datapath)


def test_prepare_names_a_missing_required_file(download, datapath):
    source = download("dstc7")
    (source / "ubuntu_responses_subtask_1.tsv").unlink()
    with pytest.raises(PrepareError, match="missing ubuntu_responses_subtask_1.tsv"):
        prepare("dstc7", source, datapath)


def test_cli_bad_file_exits_2_with_one_line_naming_file_and_line(download, datapath, capsys):
    source = download("ubuntu")
    rewrite_line(source / "valid.csv", 4, lambda line: line.rsplit(",", 2)[0] + "\r")
    before = snapshot(datapath)
    assert main(["prepare", "ubuntu", "--from", str(source), "--datapath", str(datapath)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "valid.csv:4: row has 9 fields, expected 11" in err
    assert snapshot(datapath) == before


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "parlai_poly.tasks", "prepare", "dstc7", "--from", str(tmp_path / "missing"),
         "--datapath", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "missing: no such file or directory" in result.stderr
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- unsafe archives


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"x", kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


UNSAFE_MEMBERS = {
    "dotdot": dict(name="../escaped.txt"),
    "absolute": dict(name="/tmp/parlai-poly-absolute.txt"),
    "symlink-absolute": dict(name="notes.txt", kind=tarfile.SYMTYPE, link="/etc/passwd"),
    "symlink-up": dict(name="sub/notes.txt", kind=tarfile.SYMTYPE, link="../../escaped.txt"),
    "hardlink-out": dict(name="notes.txt", kind=tarfile.LNKTYPE, link="../escaped.txt"),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE_MEMBERS))
def test_prepare_refuses_an_archive_with_a_member_pointing_out(kind, download, datapath, tmp_path):
    archive = tmp_path / "ubuntu.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(download("ubuntu").iterdir()):
            tar.add(path, arcname=path.name)
        add_member(tar, **UNSAFE_MEMBERS[kind])
    before_tmp, before = snapshot(tmp_path), snapshot(datapath)
    with pytest.raises(PrepareError, match=r"ubuntu.tar.gz: refusing archive: .*(absolute|climbs out|points outside)"):
        prepare("ubuntu", archive, datapath)
    assert snapshot(tmp_path) == before_tmp
    assert not Path("/tmp/parlai-poly-absolute.txt").exists()
    assert snapshot(datapath) == before


def test_prepare_refuses_a_truncated_archive(download, datapath, tmp_path):
    archive = make_tar(tmp_path / "dstc7_v2.tgz", download("dstc7"))
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    before = snapshot(datapath)
    with pytest.raises(PrepareError, match=r"dstc7_v2.tgz: cannot read the archive, truncated"):
        prepare("dstc7", archive, datapath)
    assert snapshot(datapath) == before
