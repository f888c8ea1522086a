"""The storage layer every cache and install stands on: folders replaced only when ours, and
cached files believed only while their manifest vouches for every byte."""
import os

import pytest

from parlai_poly.storage import CheckedFile, Rejected, replace_dir


class Refused(Exception):
    pass


def folder(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def ours(path):
    return (path / "OURS").is_file()


def test_replace_dir_replaces_our_folder_and_leaves_no_old_copy(tmp_path):
    target = folder(tmp_path / "entry", model="old", OURS="")
    staged = folder(tmp_path / "staged", model="new", OURS="")
    replace_dir(str(staged), str(target), ours, Refused)
    assert (target / "model").read_text() == "new"
    assert not staged.exists() and not (tmp_path / "entry.old").exists()


@pytest.mark.parametrize("where", ["entry", "entry.old"])
def test_replace_dir_touches_nothing_it_does_not_own(tmp_path, where):
    folder(tmp_path / where, notes="a user's file")
    staged = folder(tmp_path / "staged", model="new")
    with pytest.raises(Refused):
        replace_dir(str(staged), str(tmp_path / "entry"), ours, Refused)
    assert (tmp_path / where / "notes").read_text() == "a user's file"
    assert (staged / "model").read_text() == "new"


def test_replace_dir_puts_the_earlier_folder_back_when_the_move_fails(tmp_path):
    target = folder(tmp_path / "entry", model="old", OURS="")
    with pytest.raises(OSError):
        replace_dir(str(tmp_path / "missing"), str(target), ours, Refused)
    assert (target / "model").read_text() == "old"


def test_replace_dir_refuses_a_link(tmp_path):
    real = folder(tmp_path / "real", OURS="")
    os.symlink(real, tmp_path / "entry")
    with pytest.raises(Refused):
        replace_dir(str(folder(tmp_path / "staged")), str(tmp_path / "entry"), ours, Refused)


def checked(tmp_path, content=b"0123456789"):
    data = tmp_path / "cache.bin"
    data.write_bytes(content)
    cache = CheckedFile(str(data), str(tmp_path / "cache.json"), "test.format", 1)
    cache.record({"weights": "a"}, note="for people")
    return cache, data


def test_checked_file_is_believed_only_for_its_own_key(tmp_path):
    cache, _ = checked(tmp_path)
    assert cache.check({"weights": "a"})["note"] == "for people"
    with pytest.raises(Rejected, match=r"out of date \(changed: weights\)") as e:
        cache.check({"weights": "b"})
    assert not e.value.damaged  # stale, not broken: an info line, not a warning


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data.write_bytes(b"01234"), "5 bytes, the manifest says 10"),
        (lambda data: data.write_bytes(b"0123456780"), "sha256 mismatch"),  # same size, other bytes
        (lambda data: data.unlink(), "data file missing"),
    ],
)
def test_checked_file_says_what_is_damaged(tmp_path, damage, message):
    cache, data = checked(tmp_path)
    damage(data)
    with pytest.raises(Rejected, match=message) as e:
        cache.check({"weights": "a"})
    assert e.value.damaged


def test_checked_file_rejects_another_version_and_a_broken_manifest(tmp_path):
    cache, _ = checked(tmp_path)
    newer = CheckedFile(cache.data_path, cache.manifest_path, "test.format", 2)
    with pytest.raises(Rejected, match="another version"):
        newer.check({"weights": "a"})
    with open(cache.manifest_path, "w") as f:
        f.write("{not json")
    with pytest.raises(Rejected, match="unreadable manifest") as e:
        cache.check({"weights": "a"})
    assert e.value.damaged
