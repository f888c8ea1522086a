"""Unpack tar and zip archives without letting any member land outside the destination.

Shared by ``parlai_poly.tasks.prepare`` (data archives a user fetched) and
``parlai_poly.zoo.fetch`` (model archives we download). Every member is checked before
anything is written: absolute names, ``..`` components, devices and fifos are refused, and so
are links that point out of the archive (or, with ``allow_links=False``, any link at all).
Tar extraction then runs with tarfile's ``data`` filter as a second guard.
"""
import os
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Optional

from .errors import ParlaiPolyError

TAR_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)
ARCHIVE_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES
DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(ParlaiPolyError):
    """An archive that is unsafe or unreadable; ``problem`` is the message without the path."""

    def __init__(self, archive, problem: str):
        self.archive, self.problem = str(archive), problem
        super().__init__(f"{self.archive}: {problem}")


def is_archive_name(path) -> bool:
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def is_tar_name(path) -> bool:
    return Path(path).name.lower().endswith(TAR_SUFFIXES)


def is_zip_name(path) -> bool:
    return Path(path).name.lower().endswith(ZIP_SUFFIXES)


def unsafe_reason(name: str, kind: str, link: str = "", allow_links: bool = True) -> Optional[str]:
    """Why a member may not be extracted, or None. ``kind``: file, dir, symlink, hardlink or
    special. tarfile's ``data`` filter would strip a leading '/' and extract anyway, and zipfile
    silently drops '..'; no archive we accept needs either, so such an archive is refused."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or DRIVE.match(name):
        return f"member {name!r} has an absolute path"
    if ".." in parts:
        return f"member {name!r} climbs out with '..'"
    if kind in ("symlink", "hardlink"):
        if not allow_links:
            return f"member {name!r} is a {kind} (to {link!r}); links are not accepted here"
        # a symlink resolves from its own folder, a hard link from the archive's root
        base = PurePosixPath(name).parent if kind == "symlink" else PurePosixPath()
        resolved = os.path.normpath(str(base / link))
        if link.startswith("/") or DRIVE.match(link) or resolved == ".." or resolved.startswith("../"):
            return f"link {name!r} points outside it ({link!r})"
    elif kind not in ("file", "dir"):
        return f"member {name!r} is a device or fifo"
    return None


def tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    return "file" if member.isfile() else "dir" if member.isdir() else "special"


def zip_kind(info: zipfile.ZipInfo) -> str:
    """Unix tools store the file mode in the top 16 bits of external_attr; 0 means none given."""
    mode = info.external_attr >> 16
    if info.is_dir():
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        return "special"
    return "file"


def refuse_unsafe(archive, name: str, kind: str, link: str, allow_links: bool) -> None:
    reason = unsafe_reason(name, kind, link, allow_links)
    if reason:
        raise ArchiveError(archive, f"refusing archive: {reason}")


def extract_tar(archive: Path, destination: Path, allow_links: bool) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                refuse_unsafe(archive, member.name, tar_kind(member), member.linkname, allow_links)
            tar.extractall(destination, filter="data")
    except tarfile.FilterError as e:
        raise ArchiveError(archive, f"refusing archive: {e}") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ArchiveError(archive, f"cannot read the archive, truncated or not a tar file ({e})") from None


def extract_zip(archive: Path, destination: Path, allow_links: bool) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                # zipfile never creates links: it would write the link's target as a file's text
                link = zf.read(info).decode("utf-8", "replace") if zip_kind(info) == "symlink" else ""
                refuse_unsafe(archive, info.filename, zip_kind(info), link, allow_links)
            zf.extractall(destination)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise ArchiveError(archive, f"cannot read the archive, truncated or not a zip file ({e})") from None


def extract_archive(archive, destination, allow_links: bool = True) -> None:
    """Unpack a tar (any compression) or, by its name, a .zip into ``destination``; raise
    ArchiveError naming the first unsafe member before writing anything."""
    archive, destination = Path(archive), Path(destination)
    if is_zip_name(archive):
        extract_zip(archive, destination, allow_links)
    else:
        extract_tar(archive, destination, allow_links)
