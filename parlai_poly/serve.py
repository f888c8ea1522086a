"""A local ranking server: ``python -m parlai_poly.serve -mf MODEL --fixed-candidates-path F``.

    POST /rank    {"context": "hi!\\nhow are you?", "top_k": 5}
                  -> {"results": [{"text": ..., "score": ...}, ...], "ms": 12.3}
    GET  /health  -> {"model": ..., "kind": "bi", "candidates": 98901}
    GET  /        a page where a person types a context and sees the top candidates

It stands on the Python API (``parlai_poly.Ranker``), so its scores are ``eval_model``'s. The
standard library's threading HTTP server takes requests; one worker thread ranks them, in
batches of whatever arrived while the previous batch was scored (up to ``--max-batch``): the
model scores a batch of contexts for little more than one, so concurrent clients share passes
instead of queueing behind each other. The page is one self-contained file (no CDN): it works
offline. The server listens on the loopback address unless told otherwise.
"""
import argparse
import json
import queue
import sys
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlparse

from .errors import ParlaiPolyError

MAX_BODY_BYTES = 64 * 1024  # a context is a few turns; anything larger is a mistake or abuse
MAX_TOP_K = 100


class RequestError(ValueError):
    """A request the client must change: answered 400 with this message."""


class BatchingRanker:
    """Ranks contexts against the ranker's fixed candidates, batching concurrent calls.

    ``rank`` may be called from many threads; one worker thread takes whatever requests are
    waiting (up to ``max_batch``) and scores them with one ``rank_batch``."""

    def __init__(self, ranker, max_batch: int = 32):
        self.ranker = ranker
        self.max_batch = max_batch
        self.batch_sizes: List[int] = []  # of every batch scored, for the statistics and tests
        self.scoring = threading.Lock()  # held while a batch is scored
        self._waiting: "queue.Queue[Tuple[str, int, Future]]" = queue.Queue()
        self._worker = threading.Thread(target=self._serve_forever, name="ranker", daemon=True)
        self._worker.start()

    def rank(self, context: str, top_k: int) -> List[Tuple[str, float]]:
        """The ``top_k`` best fixed candidates for ``context`` with their scores (blocks)."""
        done: Future = Future()
        self._waiting.put((context, top_k, done))
        return done.result()

    def waiting(self) -> int:
        """How many requests wait for the worker."""
        return self._waiting.qsize()

    def _serve_forever(self) -> None:
        while True:
            first = self._waiting.get()  # blocks until a request comes
            with self.scoring:
                batch = [first]  # and whatever else has come meanwhile
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._waiting.get_nowait())
                    except queue.Empty:
                        break
                self._score(batch)

    def _score(self, batch) -> None:
        try:
            top_k = max(k for _, k, _ in batch)
            ranked = self.ranker.rank_batch([context for context, _, _ in batch], None, top_k=top_k)
        except Exception as e:  # every waiting client hears of it; the worker goes on
            for _, _, done in batch:
                done.set_exception(e)
            return
        self.batch_sizes.append(len(batch))
        for (_, k, done), results in zip(batch, ranked):
            done.set_result(results[:k])


def parse_rank_request(body: bytes) -> Tuple[str, int]:
    """(context, top_k) of a POST /rank body, or a RequestError saying what is wrong."""
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not JSON ({e}); send {{\"context\": \"...\", \"top_k\": 5}}")
    if not isinstance(request, dict):
        raise RequestError('the body must be a JSON object: {"context": "...", "top_k": 5}')
    context = request.get("context")
    if not isinstance(context, str) or not context.strip():
        raise RequestError('"context" must be a non-empty string (turns separated by newlines)')
    top_k = request.get("top_k", 5)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise RequestError(f'"top_k" must be an integer from 1 to {MAX_TOP_K}, not {top_k!r}')
    return context, top_k


def page_html() -> bytes:
    """The self-contained page (HTML, CSS and script in one file, shipped with the package)."""
    return resources.files("parlai_poly").joinpath("serve_page.html").read_bytes()


class RankingHandler(BaseHTTPRequestHandler):
    """The endpoints; ``server.ranking`` is the BatchingRanker, ``server.info`` /health's."""

    server_version = "parlai-poly"

    def do_GET(self):
        path = urlparse(self.path).path
        if path == "/":
            self._send(200, page_html(), "text/html; charset=utf-8")
        elif path == "/health":
            self._send_json(200, self.server.info)
        else:
            self._send_json(404, {"error": f"no such page: {path}; try POST /rank or GET /"})

    def do_POST(self):
        if urlparse(self.path).path != "/rank":
            return self._send_json(404, {"error": f"no such endpoint: {self.path}; POST /rank"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            return self._send_json(413, {"error": f"the body has {length} bytes; at most {MAX_BODY_BYTES}"})
        started = time.perf_counter()
        try:
            context, top_k = parse_rank_request(self.rfile.read(length))
            ranked = self.server.ranking.rank(context, top_k)
        except RequestError as e:
            return self._send_json(400, {"error": str(e)})
        except Exception as e:  # the model failed: say so, keep serving
            return self._send_json(500, {"error": f"ranking failed: {e}"})
        results = [{"text": text, "score": round(score, 6)} for text, score in ranked]
        self._send_json(200, {"results": results, "ms": round(1000 * (time.perf_counter() - started), 2)})

    def _send_json(self, status: int, payload: Dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # one quiet line per request only with --verbose
        if self.server.verbose:
            super().log_message(format, *args)


class RankingServer(ThreadingHTTPServer):
    """A thread per connection; a listen backlog for bursts of concurrent clients (the
    standard library's 5 makes the kernel reset the rest of a burst of 50)."""

    daemon_threads = True
    request_queue_size = 256


def make_server(ranker, name: str, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 32, verbose: bool = False):
    """An HTTP server (not yet serving: call ``serve_forever``) ranking against ``ranker``'s
    fixed candidates; ``name``: the model, as /health reports it; port 0 picks a free port
    (``server.server_address``)."""
    if not ranker.has_fixed:
        raise ParlaiPolyError("the server ranks fixed candidates: load the Ranker with fixed_candidates=FILE")
    server = RankingServer((host, port), RankingHandler)
    server.ranking = BatchingRanker(ranker, max_batch)
    server.verbose = verbose
    server.info = {"model": name, "kind": ranker.kind, "candidates": len(ranker.fixed_candidates), "max_batch": max_batch}
    return server


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m parlai_poly.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("-mf", "--model-file", required=True, help="a model file of ours, or zoo:parlai_poly/<entry>/model")
    parser.add_argument(
        "--fixed-candidates-path", "-fcp", default=None,
        help="the candidates to rank, one per line; default: the model's own (a zoo entry's responses.txt)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only; 0.0.0.0 opens it to the network")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-batch", type=int, default=32, help="most requests scored in one pass")
    parser.add_argument("--datapath", "-dp", default=None, help="where zoo entries are installed (ParlAI's datapath)")
    parser.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--verbose", action="store_true", help="log every request")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    from .api import Ranker

    args = parse_args(argv)
    options = {k: v for k, v in (("datapath", args.datapath), ("precision", args.precision)) if v is not None}
    try:
        ranker = Ranker.load(args.model_file, fixed_candidates=args.fixed_candidates_path or True, **options)
        server = make_server(ranker, args.model_file, args.host, args.port, args.max_batch, args.verbose)
    except (ParlaiPolyError, OSError) as e:
        print(f"parlai-poly: error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"ranking {len(ranker.fixed_candidates):,} candidates with {args.model_file} ({ranker.kind})")
    print(f"serving on http://{host}:{port}/  (POST /rank, GET /health; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
