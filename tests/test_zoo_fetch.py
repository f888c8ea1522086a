"""zoo fetch against a real HTTP server on 127.0.0.1: files install verified and atomically,
downloads resume with Range requests, and corrupt or malicious files install nothing."""
import hashlib
import io
import random
import re
import socket
import stat
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from parlai_poly.errors import ParlaiPolyError
from parlai_poly.zoo import fetch
from parlai_poly.zoo.fetch import MARKER, FetchError, RemoteFile, install

BIG = random.Random(0).randbytes(256 * 1024)  # several download chunks, so a cut leaves a .part
CUT = 100_000  # where the server drops the connection when told to


# ----------------------------------------------------------------------------- the server


@dataclass
class Served:
    """What the server holds and what it was asked; tests change it between installs."""

    port: int = 0
    files: Dict[str, bytes] = field(default_factory=dict)
    cuts: Dict[str, List[int]] = field(default_factory=dict)  # name -> body bytes sent before dropping, per request
    ignore_range: bool = False
    requests: List[tuple] = field(default_factory=list)  # (name, Range header or None)
    sent: int = 0  # body bytes written, all requests together

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def asked(self, name: str) -> List[Optional[str]]:
        return [rng for path, rng in self.requests if path == name]


class RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        served: Served = self.server.served
        name, rng = self.path.lstrip("/"), self.headers.get("Range")
        served.requests.append((name, rng))
        data = served.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not served.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_body(data, start, bool(rng) and not served.ignore_range)

    def send_body(self, data: bytes, start: int, partial: bool) -> None:
        served: Served = self.server.served
        body = data[start:]
        self.send_response(206 if partial else 200)
        self.send_header("Content-Length", str(len(body)))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cuts = served.cuts.get(self.path.lstrip("/"))
        if cuts:
            body = body[: cuts.pop(0)]
            self.close_connection = True  # the promised Content-Length never arrives
        self.wfile.write(body)
        served.sent += len(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.daemon_threads = True
    httpd.served = Served(port=httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.served
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dead_port():
    """A port on 127.0.0.1 where nothing listens: connections are refused, as offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """127.0.0.1 must be reached directly even where the environment sets a proxy."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def paths(tmp_path):
    """(target entry folder inside a datapath, downloads folder)."""
    return tmp_path / "data" / "models" / "entry", tmp_path / "downloads"


# ----------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def offer(server: Served, name: str, data: bytes, served: Optional[bytes] = None, extract: bool = False) -> RemoteFile:
    """Serve ``served`` (default: ``data``) as ``name``; the RemoteFile expects ``data``."""
    server.files[name] = data if served is None else served
    return RemoteFile(server.url(name), name, sha(data), len(data), extract)


def run_install(files, paths, what="entry"):
    target, downloads = paths
    install(files, str(target), what, str(downloads))
    return target


def snapshot(root: Path, skip: Optional[Path] = None) -> dict:
    """Every entry below root (but ``skip``), hidden ones included, with its content hash."""
    entries = {}
    for path in sorted(root.rglob("*")):
        if skip and (path == skip or skip in path.parents):
            continue
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else sha(path.read_bytes())
        entries[path.relative_to(root).as_posix()] = kind
    return entries


def assert_not_installed(target: Path) -> None:
    assert not target.exists()
    leftovers = list(target.parent.iterdir()) if target.parent.exists() else []
    assert leftovers == [], f"staging left behind: {leftovers}"


def tar_bytes(members: Dict[str, bytes], extra=()) -> bytes:
    """A .tar.gz of regular files, then ``extra`` raw members (name, type, linkname): those
    of type REGTYPE carry a few bytes, so that an escaping one would leave a file behind."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, member_type, link in extra:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = member_type, link
            payload = b"escaped" if member_type == tarfile.REGTYPE else b""
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload else None)
    return buffer.getvalue()


def zip_bytes(members: Dict[str, bytes], links: Optional[Dict[str, str]] = None) -> bytes:
    """A .zip of regular files plus Unix symlinks ``links`` (name -> link target)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so the mode below is read
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buffer.getvalue()


MODEL_FILES = {"model": b"weights", "model.opt": b'{"agent": "bi"}', "tokenizer/vocab.txt": b"[PAD]\n"}


# ----------------------------------------------------------------------------- installs


def test_a_plain_file_is_installed_verified_with_its_marker(server, paths):
    files = [offer(server, "model", BIG), offer(server, "model.opt", b'{"x": 1}')]
    target = run_install(files, paths)
    assert (target / "model").read_bytes() == BIG
    assert (target / "model.opt").read_bytes() == b'{"x": 1}'
    marker = (target / MARKER).read_text()
    assert sha(BIG) in marker and sha(b'{"x": 1}') in marker
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]  # no staging left
    downloads = paths[1]
    assert (downloads / "model").read_bytes() == BIG  # kept, so a reinstall needs no network
    assert not list(downloads.glob("*.part"))
    assert server.asked("model") == [None]


@pytest.mark.parametrize("name, pack", [("model.tar.gz", tar_bytes), ("model.zip", zip_bytes)])
def test_an_archive_is_unpacked_into_the_entry(server, paths, name, pack):
    files = [offer(server, name, pack(MODEL_FILES), extract=True), offer(server, "card.md", b"# card\n")]
    target = run_install(files, paths)
    for member, data in MODEL_FILES.items():
        assert (target / member).read_bytes() == data
    assert (target / "card.md").read_bytes() == b"# card\n"
    assert not (target / name).exists()  # unpacked, not copied
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]


def test_already_installed_does_not_touch_the_network(server, paths):
    files = [offer(server, "model", BIG)]
    target = run_install(files, paths)
    before = len(server.requests)
    server.files.clear()  # any request would now fail
    run_install(files, paths)
    assert len(server.requests) == before == 1
    assert (target / "model").read_bytes() == BIG


def test_a_file_placed_by_hand_in_downloads_is_used_offline(paths, dead_port):
    archive = tar_bytes(MODEL_FILES)
    files = [RemoteFile(f"http://127.0.0.1:{dead_port}/model.tar.gz", "model.tar.gz", sha(archive), len(archive), True)]
    paths[1].mkdir()
    (paths[1] / "model.tar.gz").write_bytes(archive)
    target = run_install(files, paths)
    assert (target / "model").read_bytes() == b"weights"


# ----------------------------------------------------------------------------- resume


def test_a_dropped_connection_is_resumed_with_a_range_request(server, paths):
    files = [offer(server, "model", BIG)]
    server.cuts["model"] = [CUT]
    target = run_install(files, paths)
    assert (target / "model").read_bytes() == BIG
    first, second = server.asked("model")
    assert first is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second).group(1))
    assert 0 < resumed_at <= CUT  # never more than it received; the sha256 proves it was exact
    assert server.sent == CUT + len(BIG) - resumed_at < 2 * len(BIG)


def test_a_run_cut_off_leaves_a_part_that_the_next_run_resumes(server, paths, monkeypatch):
    monkeypatch.setattr(fetch, "MAX_ATTEMPTS", 1)
    files = [offer(server, "model", BIG)]
    server.cuts["model"] = [CUT]
    with pytest.raises(FetchError, match=r"cut off \(1 tries\); the \d+ bytes received are kept in .*model\.part, and running this again resumes"):
        run_install(files, paths)
    part = paths[1] / "model.part"
    kept = part.read_bytes()
    assert 0 < len(kept) <= CUT and kept == BIG[: len(kept)]
    assert_not_installed(paths[0])

    sent_before = server.sent
    target = run_install(files, paths)
    assert server.asked("model")[1] == f"bytes={len(kept)}-"  # exactly where the .part stopped
    assert server.sent - sent_before == len(BIG) - len(kept)
    assert (target / "model").read_bytes() == BIG and not part.exists()


def test_a_server_ignoring_range_restarts_the_download_cleanly(server, paths):
    files = [offer(server, "model", BIG)]
    paths[1].mkdir()
    (paths[1] / "model.part").write_bytes(b"stale bytes from another version")
    server.ignore_range = True  # answers 200 with the whole file
    target = run_install(files, paths)
    assert server.asked("model") == ["bytes=32-"]
    assert (target / "model").read_bytes() == BIG


def test_a_stale_part_of_another_version_is_dropped_and_downloaded_afresh(server, paths):
    files = [offer(server, "model", BIG)]
    paths[1].mkdir()
    (paths[1] / "model.part").write_bytes(b"x" * 1000)  # resumable, but not the start of BIG
    target = run_install(files, paths)
    assert server.asked("model") == ["bytes=1000-", None]
    assert (target / "model").read_bytes() == BIG


# ----------------------------------------------------------------------------- refusals


def test_a_corrupted_file_is_refused_deleted_and_downloaded_again_next_time(server, paths):
    corrupt = bytes([BIG[0] ^ 1]) + BIG[1:]
    good = offer(server, "card.md", b"# card\n")
    files = [good, offer(server, "model", BIG, served=corrupt)]
    with pytest.raises(FetchError) as error:
        run_install(files, paths)
    message = str(error.value)
    for part in (server.url("model"), sha(BIG), sha(corrupt), "running this again downloads it again"):
        assert part in message
    assert_not_installed(paths[0])  # the good file alone is not installed either
    assert not (paths[1] / "model").exists() and not (paths[1] / "model.part").exists()

    server.files["model"] = BIG  # fixed on the server: the retry starts from scratch
    target = run_install(files, paths)
    assert server.asked("model") == [None, None]
    assert (target / "model").read_bytes() == BIG


def test_a_file_of_the_wrong_size_is_refused_before_it_is_read(server, paths):
    files = [offer(server, "model", BIG, served=BIG + b"extra")]
    with pytest.raises(FetchError, match=rf"is {len(BIG) + 5} bytes but {len(BIG)} were expected"):
        run_install(files, paths)
    assert_not_installed(paths[0])
    assert not list(paths[1].glob("model*"))


def absolute_name(tmp_path: Path) -> str:
    return str(tmp_path / "absolute-escape.txt")


MALICIOUS_TARS = {  # kind -> extra (name, type, linkname) members, given the test's tmp_path
    "dotdot": lambda tmp: [("../../../../../escaped.txt", tarfile.REGTYPE, "")],
    "absolute": lambda tmp: [(absolute_name(tmp), tarfile.REGTYPE, "")],
    "symlink-out": lambda tmp: [("tokenizer/evil", tarfile.SYMTYPE, "../../../../../../etc/passwd")],
    "symlink-absolute": lambda tmp: [("evil", tarfile.SYMTYPE, str(tmp / "escaped.txt"))],
    "symlink-inside": lambda tmp: [("alias", tarfile.SYMTYPE, "model")],
    "hardlink": lambda tmp: [("hard", tarfile.LNKTYPE, "model")],
    "device": lambda tmp: [("dev", tarfile.CHRTYPE, "")],
}


def malicious_tar(kind: str, tmp: Path) -> bytes:
    return tar_bytes(MODEL_FILES, MALICIOUS_TARS[kind](tmp))


def malicious_zip(kind: str, tmp: Path) -> bytes:
    if kind == "dotdot":
        return zip_bytes({**MODEL_FILES, "../../../../../escaped.txt": b"escaped"})
    if kind == "absolute":
        return zip_bytes({**MODEL_FILES, absolute_name(tmp): b"escaped"})
    return zip_bytes(MODEL_FILES, links={"evil": "../../../../../etc/passwd"})


@pytest.mark.parametrize(
    "name, kind",
    [("model.tar.gz", kind) for kind in MALICIOUS_TARS] + [("model.zip", k) for k in ("dotdot", "absolute", "symlink")],
)
def test_a_malicious_archive_installs_nothing_and_writes_nothing_outside(server, paths, tmp_path, name, kind):
    archive = (malicious_tar if name.endswith(".tar.gz") else malicious_zip)(kind, tmp_path)
    files = [offer(server, name, archive, extract=True)]
    before = snapshot(tmp_path, skip=paths[1])
    with pytest.raises(FetchError, match=r"has the expected sha256 but refusing archive: .*; nothing was installed"):
        run_install(files, paths)
    assert_not_installed(paths[0])
    after = snapshot(tmp_path, skip=paths[1])
    assert after == {**before, "data": "dir", "data/models": "dir"}  # only the empty parents
    assert not Path(absolute_name(tmp_path)).exists()


def test_offline_the_error_says_which_file_to_place_where(paths, dead_port):
    data = b"weights"
    url = f"http://127.0.0.1:{dead_port}/model"
    with pytest.raises(FetchError) as error:
        run_install([RemoteFile(url, "model", sha(data), len(data))], paths, what="zoo:parlai_poly/x")
    message = str(error.value)
    assert isinstance(error.value, ParlaiPolyError)
    assert re.match(rf"Cannot download {re.escape(url)} for zoo:parlai_poly/x: \[Errno \d+\] Connection refused\. ", message)
    expected = f"place the file model ({len(data)} bytes, sha256 {sha(data)}) at {paths[1] / 'model'} and run this again"
    assert expected in message
    assert_not_installed(paths[0])


def test_a_wrong_file_placed_by_hand_is_named_in_the_offline_error(paths, dead_port):
    paths[1].mkdir()
    (paths[1] / "model").write_bytes(b"something else")
    files = [RemoteFile(f"http://127.0.0.1:{dead_port}/model", "model", sha(b"weights"), 7)]
    with pytest.raises(FetchError, match=f"the file there now has sha256 {sha(b'something else')}: not it"):
        run_install(files, paths)
    assert (paths[1] / "model").read_bytes() == b"something else"


def test_an_http_error_names_the_url_and_the_status(server, paths):
    files = [RemoteFile(server.url("missing"), "model", sha(b"weights"), 7)]
    with pytest.raises(FetchError, match=rf"Cannot download {re.escape(server.url('missing'))} for entry: HTTP 404"):
        run_install(files, paths)
    assert_not_installed(paths[0])


# ----------------------------------------------------------------------------- earlier installs


def test_a_failure_keeps_the_earlier_complete_install(server, paths):
    target = run_install([offer(server, "model", b"version 1")], paths)
    installed = snapshot(target)
    corrupt = [offer(server, "model", b"version 2", served=b"version X")]
    with pytest.raises(FetchError, match="sha256"):
        run_install(corrupt, paths)
    malicious = [offer(server, "model.tar.gz", malicious_tar("dotdot", paths[0]), extract=True)]
    with pytest.raises(FetchError, match="refusing archive"):
        run_install(malicious, paths)
    assert snapshot(target) == installed
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]

    run_install([offer(server, "model", b"version 2")], paths)  # a good new version replaces it
    assert (target / "model").read_bytes() == b"version 2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]


def test_a_folder_not_installed_by_us_is_left_alone(server, paths):
    target = paths[0]
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FetchError, match="did not install .* Move that folder away"):
        run_install([offer(server, "model", b"weights")], paths)
    assert server.requests == []
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("change, problem", [
    (dict(name="../model"), "plain file name"),
    (dict(name=".hidden"), "plain file name"),
    (dict(url="file:///etc/passwd"), "not http"),
    (dict(sha256="ABC"), "64 lowercase hex"),
    (dict(extract=True), "extract needs an archive name"),
])
def test_a_bad_file_entry_is_refused(change, problem):
    fields = dict(url="https://example.com/model", name="model", sha256=sha(b""), size=0, extract=False)
    with pytest.raises(FetchError, match=problem):
        RemoteFile(**{**fields, **change})
