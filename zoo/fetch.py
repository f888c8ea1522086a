"""Fetch a zoo entry's files: resumable download, sha256 check, atomic install.

``install(files, target_dir, what, downloads_dir)`` makes ``target_dir`` hold the files, all or
nothing:

- a download goes to ``<downloads_dir>/<name>.part`` and, when interrupted, is continued with an
  HTTP Range request (the server's 206 answer is appended; a 200 answer starts it over);
- its size and sha256 are checked before anything uses it; a bad one is deleted;
- a file already in ``downloads_dir`` with the right sha256 (placed there by hand, say) is used
  without the network, and offline the error says which file to place where;
- the entry is built in a staging folder next to ``target_dir`` (archives unpacked there by
  ``parlai_poly.archives``, which refuses members that would land outside), its marker
  ``.installed.json`` written last, then renamed into place, so a failure leaves no half entry
  and keeps an earlier complete one.

ParlAI's own ``build_data.download`` (and ``DownloadableFile``) was not enough: it always
rewrites the file from byte 0 (no resume), retries with sleeps of up to 16 s, reports a bad
checksum as an AssertionError after it has written into the target folder, and its ``untar``
checks no member paths. Its HTTP session hook is used, so sites that patch it still work.
"""
import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List, Sequence

import requests
import tqdm

from parlai_poly import archives
from parlai_poly.errors import ZooError
from parlai_poly.storage import replace_dir, sha256_file

MARKER = ".installed.json"
LOCK = ".lock"
CHUNK = 1 << 16
TIMEOUT = (10, 60)  # seconds to connect, and to wait for each piece of the body
MAX_ATTEMPTS = 5  # downloads cut off after making progress are resumed this many times per run
SHA256 = re.compile(r"[0-9a-f]{64}")


class FetchError(ZooError):
    """A zoo file cannot be downloaded, does not verify, or cannot be installed."""


@dataclass(frozen=True)
class RemoteFile:
    url: str  # http(s) URL
    name: str  # file name as downloaded (e.g. "model.tar.gz" or "model")
    sha256: str  # hex digest of the downloaded file
    size: int  # bytes
    extract: bool = False  # a .tar/.tar.gz/.zip archive to unpack into the entry directory

    def __post_init__(self):
        problem = entry_problem(self)
        if problem:
            raise FetchError(f"Bad zoo file entry {self}: {problem}.")


def entry_problem(file: RemoteFile):
    """What is wrong with a registry's file entry, or None."""
    if not file.url.startswith(("http://", "https://")):
        return "the URL is not http(s)"
    if not plain_name(file.name):  # it becomes a path in downloads_dir and in the entry
        return "the name must be a plain file name, not hidden"
    if not isinstance(file.sha256, str) or not SHA256.fullmatch(file.sha256):
        return "sha256 must be 64 lowercase hex digits"
    if not isinstance(file.size, int) or file.size < 0:
        return "size must be a non-negative int"
    if file.extract and not archives.is_archive_name(file.name):
        return f"extract needs an archive name ({', '.join(archives.ARCHIVE_SUFFIXES)})"
    return None


def plain_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and not re.search(r"[/\\\x00]", name)


# ----------------------------------------------------------------------------- install


def install(files: Sequence[RemoteFile], target_dir: str, what: str, downloads_dir: str) -> None:
    """Make target_dir hold the files (archives unpacked), all or nothing."""
    files = list(files)
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise FetchError(f"{what}: two zoo files share a name ({names}).")
    target = Path(target_dir).absolute()
    if is_installed(target, files):
        return
    os.makedirs(downloads_dir, exist_ok=True)
    with locked(Path(downloads_dir) / LOCK):  # another process may be installing the same entry
        if is_installed(target, files):
            return
        refuse_foreign_target(target, what)
        paths = [download(f, downloads_dir, what) for f in files]
        build_and_swap(files, paths, target, what)


def is_installed(target: Path, files: List[RemoteFile]) -> bool:
    """The marker is written last, so its presence with these files' digests means complete."""
    try:
        recorded = json.loads((target / MARKER).read_text(encoding="utf-8"))["files"]
        return [identity(r) for r in recorded] == [identity(asdict(f)) for f in files]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def identity(record: dict) -> tuple:
    # the URL is left out on purpose: the same bytes from a mirror are the same install
    return record["name"], record["sha256"], bool(record.get("extract"))


def installed_by_us(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def foreign_target_error(target: Path, what: str) -> FetchError:
    """What to say of a folder we may not replace: a link, a file, or someone else's files."""
    if target.is_symlink() or not target.is_dir():
        return FetchError(f"{target} is a link or a file, not a folder; move it away to install {what}.")
    return FetchError(
        f"{target} holds files parlai-poly did not install (no {MARKER}); refusing to touch "
        f"them. Move that folder away and run this again to install {what}.")


def refuse_foreign_target(target: Path, what: str) -> None:
    """Replace only a folder we installed (it has our marker) or an empty one."""
    occupied = target.is_symlink() or (target.exists() and not (target.is_dir() and not any(target.iterdir())))
    if occupied and not (target.is_dir() and not target.is_symlink() and installed_by_us(target)):
        raise foreign_target_error(target, what)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, concurrent installs are then the caller's problem
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_and_swap(files: List[RemoteFile], paths: List[str], target: Path, what: str) -> None:
    """Stage the whole entry beside the target (same filesystem, so renames are atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        entry = staging / "entry"
        entry.mkdir()
        for file, path in zip(files, paths):
            place(file, path, entry, what)
        record = {"what": what, "files": [asdict(f) for f in files]}
        (entry / MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        try:
            replace_dir(str(entry), str(target), installed_by_us, lambda path: foreign_target_error(path, what))
        except OSError as e:
            raise FetchError(f"Cannot move {what} into {target} ({e.strerror}); left it as it was.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # also removes the previous install, if any


def place(file: RemoteFile, path: str, entry: Path, what: str) -> None:
    if not file.extract:
        shutil.copyfile(path, entry / file.name)  # the verified download stays for reinstalls
        return
    try:
        archives.extract_archive(path, entry, allow_links=False)  # a model never needs links
    except archives.ArchiveError as e:
        raise FetchError(
            f"{what}: {file.name} from {file.url} has the expected sha256 but {e.problem}; "
            "nothing was installed. The zoo entry itself is bad: please report it.") from None


# ----------------------------------------------------------------------------- download


def download(file: RemoteFile, downloads_dir: str, what: str) -> str:
    """The path of a verified copy of ``file`` in downloads_dir, fetched only if needed."""
    final = os.path.join(downloads_dir, file.name)
    if verifies(final, file):
        return final
    part = final + ".part"
    resumed = os.path.isfile(part)
    fetch_part(file, part, final, what)
    if resumed and sha256_file(part) != file.sha256:
        os.remove(part)  # a .part left by an earlier run may be of another version: start over once
        fetch_part(file, part, final, what)
    check_download(file, part)
    os.replace(part, final)
    return final


def verifies(path: str, file: RemoteFile) -> bool:
    return (os.path.isfile(path) and os.path.getsize(path) == file.size
            and sha256_file(path) == file.sha256)


class Interrupted(Exception):
    """The connection broke after some bytes arrived: worth resuming at once."""


def fetch_part(file: RemoteFile, part: str, final: str, what: str) -> None:
    """Fill ``part`` up to file.size bytes, resuming what earlier attempts (or runs) left."""
    for _ in range(MAX_ATTEMPTS):
        if resume_offset(part, file) == file.size:
            return
        try:
            stream_into(file, part)
        except Interrupted:
            continue
        except requests.RequestException as e:
            raise offline_error(file, final, what, describe(e)) from None
    if resume_offset(part, file) == file.size:
        return
    raise FetchError(
        f"Downloading {file.url} for {what} kept being cut off ({MAX_ATTEMPTS} tries); the "
        f"{os.path.getsize(part) if os.path.exists(part) else 0} bytes received are kept in "
        f"{part}, and running this again resumes from there.")


def resume_offset(part: str, file: RemoteFile) -> int:
    """Bytes already in ``part``; a part longer than the file cannot be right and is dropped."""
    size = os.path.getsize(part) if os.path.isfile(part) else 0
    if size > file.size:
        os.remove(part)
        return 0
    return size


def stream_into(file: RemoteFile, part: str) -> None:
    """One request: append to ``part`` from where it stops (or restart it on a 200 answer)."""
    from parlai.core.build_data import get_http_session

    start = resume_offset(part, file)
    # identity: a compressed transfer would make sizes and byte offsets those of other bytes
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={start}-"} if start else {})}
    with get_http_session() as session, session.get(file.url, headers=headers, stream=True, timeout=TIMEOUT) as response:
        if response.status_code == 416:  # the server's file is shorter than our part
            os.remove(part)
            raise Interrupted()
        response.raise_for_status()
        offset = start if response.status_code == 206 else 0
        check_announced_size(file, response, offset, part)
        write_body(file, response, part, offset)


def check_announced_size(file: RemoteFile, response, offset: int, part: str) -> None:
    """Refuse at once a body whose announced length cannot give file.size bytes."""
    if response.status_code == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            os.remove(part)  # the server resumed from elsewhere: start over
            raise Interrupted()
        total = None if match.group(2) == "*" else int(match.group(2))
    else:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    if total is not None and total != file.size:
        remove_quietly(part)
        raise FetchError(
            f"{file.url} is {total} bytes but {file.size} were expected, so it is not the zoo's "
            f"{file.name}; nothing was installed. Place the right file ({file.size} bytes, sha256 "
            f"{file.sha256}) in {os.path.dirname(part)} and run this again.")


def write_body(file: RemoteFile, response, part: str, offset: int) -> None:
    received = 0
    bar = tqdm.tqdm(total=file.size, initial=offset, unit="B", unit_scale=True,
                    unit_divisor=1024, desc=f"Downloading {file.name}")
    try:
        with open(part, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            for chunk in response.iter_content(CHUNK):
                if offset + received + len(chunk) > file.size:
                    raise FetchError(
                        f"{file.url} sent more than the expected {file.size} bytes, so it is not "
                        f"the zoo's {file.name}; deleted it and nothing was installed.")
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError, requests.Timeout) as e:
        if received:
            raise Interrupted() from e
        raise
    except FetchError:
        remove_quietly(part)
        raise
    finally:
        bar.close()
    if offset + received < file.size and received:
        raise Interrupted()  # the body ended early without an error: ask for the rest


def check_download(file: RemoteFile, part: str) -> None:
    """Size and sha256, before anything uses the file; a bad download is deleted."""
    actual = sha256_file(part)
    if actual == file.sha256:
        return
    os.remove(part)
    raise FetchError(
        f"{file.url} downloaded with sha256 {actual}, but {file.sha256} was expected: the file "
        "is corrupt or has changed on the server. It was deleted and nothing was installed; "
        "running this again downloads it again.")


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# ----------------------------------------------------------------------------- errors


def describe(error: requests.RequestException) -> str:
    """A short cause ('[Errno 111] Connection refused', 'HTTP 404') out of requests' long text."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code} {error.response.reason}"
    match = re.search(r"\[Errno -?\d+\] [^'\")]+", str(error))
    if match:
        return match.group(0)
    return "timed out" if isinstance(error, requests.Timeout) else type(error).__name__


def offline_error(file: RemoteFile, final: str, what: str, cause: str) -> FetchError:
    there = ""
    if os.path.isfile(final):
        there = f" (the file there now has sha256 {sha256_file(final)}: not it)"
    return FetchError(
        f"Cannot download {file.url} for {what}: {cause}. To install it without network, place "
        f"the file {file.name} ({file.size} bytes, sha256 {file.sha256}) at {final}{there} and "
        "run this again.")
