"""Files that never hold half a write, fingerprints, and caches that are believed only when
checked.

- ``atomic_write`` / ``atomic_write_text``: write a temporary beside the target, rename it in.
- ``replace_dir``: put a staged folder at a target, the earlier one moved aside first and
  restored if the move fails; ``owned`` decides which earlier folders may be replaced.
- ``sha256_file``, ``tensors_sha256``, ``key_sha256``: fingerprints of files, tensors and
  JSON keys.
- ``CheckedFile``: a data file with a JSON manifest beside it (format, version, the key it
  is valid for, the file's size and sha256). ``check`` says why it is not to be believed
  (out of date, or damaged), ``record`` writes the manifest once the data file is in place.
  The candidate store, the HNSW index store and the teacher score cache are built on it.
"""
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Optional, Tuple

if TYPE_CHECKING:  # torch is imported where tensors are hashed, not by every user of files
    import torch

STALE_TMP_SECONDS = 3600  # a temporary of ours this old belongs to a write that was killed


# ---- atomic files and folders ------------------------------------------------------------
def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` then rename into place, so readers never see half a file.

    Temporaries that a killed write of the same path left behind (``PATH.XXXXXXXX.tmp``, as
    mkstemp names ours, older than an hour) are removed once this write is in place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _remove_stale_temporaries(directory, os.path.basename(path))


def _remove_stale_temporaries(directory: str, name: str) -> None:
    ours = re.compile(re.escape(name) + r"\.[A-Za-z0-9_]{8}\.tmp")
    now = time.time()
    for entry in os.scandir(directory):
        if ours.fullmatch(entry.name) and entry.is_file() and now - entry.stat().st_mtime > STALE_TMP_SECONDS:
            os.remove(entry.path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def replace_dir(staged: str, target: str, owned: Callable[[Path], bool], refused: Callable[[Path], Exception]) -> None:
    """Put the folder ``staged`` at ``target``; an earlier ``target`` is moved aside to
    ``target.old`` first, put back if the move fails, and removed once ``staged`` is in place.

    Only an absent or empty folder, or one that ``owned(path)`` says we made, is ever moved
    or removed (``target`` and a leftover ``target.old`` alike); for anything else
    ``refused(path)`` is raised and nothing is touched."""
    target_path, old = Path(target), Path(target + ".old")
    for path in (target_path, old):
        if path.is_symlink() or (path.exists() and not (path.is_dir() and (not any(path.iterdir()) or owned(path)))):
            raise refused(path)
    target_path.parent.mkdir(parents=True, exist_ok=True)
    if old.exists():
        shutil.rmtree(old)
    moved_aside = target_path.exists()
    if moved_aside:
        os.replace(target_path, old)
    try:
        os.replace(staged, target_path)
    except OSError:
        if moved_aside:
            os.replace(old, target_path)
        raise
    if old.exists():
        shutil.rmtree(old)


# ---- fingerprints ------------------------------------------------------------------------
def sha256_file(path: str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(named_tensors: Iterable[Tuple[str, "torch.Tensor"]]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in the given order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.contiguous().reshape(-1).cpu()
        if flat.numel():
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def key_sha256(key: Dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()


# ---- checked caches ----------------------------------------------------------------------
class Rejected(Exception):
    """Why a cached file is not believed; ``damaged`` when it looks broken rather than old."""

    def __init__(self, reason: str, damaged: bool):
        super().__init__(reason)
        self.reason, self.damaged = reason, damaged


class CheckedFile:
    """A data file and its JSON manifest: believed only while both say the same thing.

    The manifest records ``format`` and ``version`` (of the layout), the ``key`` the data is
    valid for and its sha256, and the data file's size and sha256; ``check`` compares all of
    them (re-hashing the data file: one rewritten in place at the same size is not believed)
    and returns the manifest. Subclasses check the data file's content themselves."""

    def __init__(self, data_path: str, manifest_path: str, fmt: str, version: int):
        self.data_path, self.manifest_path = data_path, manifest_path
        self.format, self.version = fmt, version

    def check(self, key: Optional[Dict]) -> Dict:
        """The manifest, if the data file is this key's and intact; else raises Rejected."""
        if not os.path.exists(self.manifest_path) and not os.path.exists(self.data_path):
            raise Rejected("nothing cached yet", False)
        try:
            with open(self.manifest_path, "r", encoding="utf-8") as f:
                manifest = json.load(f)
            manifest["key"], manifest["file_size"], manifest["file_sha256"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Rejected(f"unreadable manifest {self.manifest_path} ({e.__class__.__name__}: {e})", True) from None
        if manifest.get("format") != self.format or manifest.get("version") != self.version:
            raise Rejected(f"written by another version ({manifest.get('format')} {manifest.get('version')})", False)
        if key is not None and manifest["key"] != key:
            old = manifest["key"] if isinstance(manifest["key"], dict) else {}
            changed = sorted(k for k in set(key) | set(old) if key.get(k) != old.get(k))
            raise Rejected(f"out of date (changed: {', '.join(changed)})", False)
        try:
            size = os.path.getsize(self.data_path)
        except OSError as e:
            raise Rejected(f"data file missing ({e.__class__.__name__})", True) from None
        if size != manifest["file_size"]:
            raise Rejected(f"data file has {size} bytes, the manifest says {manifest['file_size']} (truncated?)", True)
        if sha256_file(self.data_path) != manifest["file_sha256"]:
            raise Rejected("data file's bytes differ from what was written (sha256 mismatch)", True)
        return manifest

    def record(self, key: Dict, **facts) -> Dict:
        """Write the manifest of the data file now in place (after it, never before)."""
        manifest = {
            "format": self.format,
            "version": self.version,
            "key": key,
            "key_sha256": key_sha256(key),
            "file_size": os.path.getsize(self.data_path),
            "file_sha256": sha256_file(self.data_path),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **facts,
        }
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return manifest
