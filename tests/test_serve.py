"""The ranking server: answers under concurrent clients, batched; clear 4xx; the page in a real browser."""
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from parlai.scripts.train_model import TrainModel

from helpers import train_options
from parlai_poly import Ranker
from parlai_poly.errors import ParlaiPolyError
from parlai_poly.serve import make_server

COLOURS = [f"it is {c}" for c in "red blue green yellow orange purple pink brown".split()]
ANIMALS = "cat dog horse cow sheep goat duck mouse".split()
CLIENTS = 50


@pytest.fixture(scope="module")
def ranker(tmp_path_factory, tiny_backbone, synthetic_task):
    folder = tmp_path_factory.mktemp("serve")
    model_file = str(folder / "model")
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, model_file, num_epochs=2))
    responses = folder / "responses.txt"
    responses.write_text("".join(c + "\n" for c in COLOURS))
    return Ranker.load(model_file, fixed_candidates=str(responses))


@pytest.fixture(scope="module")
def server(ranker):
    server = make_server(ranker, "tiny-bi", port=0, max_batch=32)  # loopback, a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url(server, path=""):
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{path}"


def post(server, body: bytes, path="/rank"):
    """(status, JSON answer) of a POST."""
    request = urllib.request.Request(url(server, path), data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_fifty_concurrent_clients_get_their_own_correct_answers_in_shared_batches(server, ranker):
    contexts = [f"{filler} the {ANIMALS[i % 8]}" for i, filler in enumerate(["today", "now", "please", "again", "here"] * 10)]
    top_ks = [1 + i % 5 for i in range(CLIENTS)]
    expected = [ranker.rank(c, top_k=k) for c, k in zip(contexts, top_ks)]
    ranking = server.ranking
    ranking.batch_sizes.clear()
    with ranking.scoring:  # the worker waits, so every request is queued before any is scored
        with ThreadPoolExecutor(CLIENTS) as clients:
            answers = [clients.submit(post, server, json.dumps({"context": c, "top_k": k}).encode()) for c, k in zip(contexts, top_ks)]
            deadline = time.time() + 60
            while ranking.waiting() < CLIENTS - 1 and time.time() < deadline:  # the worker holds one
                time.sleep(0.01)
            ranking.scoring.release()
            try:
                results = [a.result(timeout=120) for a in answers]
            finally:
                ranking.scoring.acquire()
    assert sorted(ranking.batch_sizes) == [CLIENTS - 32, 32]  # two passes for fifty clients
    for (status, answer), want in zip(results, expected):
        assert status == 200
        assert [r["text"] for r in answer["results"]] == [t for t, _ in want]
        assert [r["score"] for r in answer["results"]] == pytest.approx([s for _, s in want], abs=1e-4)
    assert results[0][1]["results"][0]["text"] == "it is red"  # the cat's colour in the synthetic task


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"not json", 400, "not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"top_k": 3}', 400, '"context" must be a non-empty string'),
        (b'{"context": "hi", "top_k": 0}', 400, '"top_k" must be an integer from 1 to 100'),
        (b'{"context": "hi", "top_k": "5"}', 400, '"top_k" must be an integer'),
        (b"x" * 70000, 413, "at most 65536"),
    ],
)
def test_bad_requests_are_answered_with_what_to_change(server, body, status, message):
    got, answer = post(server, body)
    assert got == status and message in answer["error"]


@pytest.mark.slow
def test_health_and_unknown_paths(server):
    with urllib.request.urlopen(url(server, "/health"), timeout=30) as response:
        assert json.loads(response.read()) == {"model": "tiny-bi", "kind": "bi", "candidates": 8, "max_batch": 32}
    assert post(server, b"{}", path="/nowhere")[0] == 404


def test_a_server_needs_fixed_candidates():
    class InlineOnly:
        has_fixed = False

    with pytest.raises(ParlaiPolyError, match="fixed_candidates=FILE"):
        make_server(InlineOnly(), "m", port=0)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is needed for the page test: `make test` installs it (apt-get install chromium)"
    return path


@pytest.mark.slow
def test_the_page_ranks_in_a_real_browser(server):
    """Headless Chromium loads the page, which fills in ?context= and ranks through /rank."""
    page = url(server, "/?" + urllib.parse.urlencode({"context": "now the cat", "top_k": 3}))
    dom = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--dump-dom", page],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert 'data-ranked="true"' in dom, dom[-2000:]
    rows = dom.split("<tbody>")[1].split("</tbody>")[0]
    assert rows.count("<tr>") == 3
    assert rows.index("it is red") < rows.index("</tr>")  # the first row: the cat's colour
    assert "tiny-bi (bi-encoder), 8 candidates" in dom
