"""The ranking server under concurrent clients: requests per second, p50 and p99 latency.

    python benchmarks/serve_load.py MODEL [--fixed-candidates-path F] [--clients 50]
        [--requests 20] [--max-batch 32] [--out docs/serve] [--screenshot]

Starts ``parlai_poly.serve`` in this process on a free loopback port, then ``--clients``
threads each send ``--requests`` POST /rank requests back to back (a bounded load: clients x
requests in all, loopback only), with contexts taken from CCC valid when the data is there
(else short made-up ones). It reports requests per second over the whole load, latency
percentiles as clients see them, and the batch sizes the server formed; once more with
``--max-batch 1`` (no batching) for comparison. ``--screenshot`` also saves the page, ranked
for one context, as PNG through headless Chromium. Writes results.json and table.md to --out.
Run it on a quiet machine: the figures are the server's, not a shared CPU's.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/scoring_speed.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from parlai_poly.serve import make_server  # noqa: E402
from parlai_poly.storage import atomic_write_text  # noqa: E402

PAGE_CONTEXT = "I just got back from a week of hiking in the mountains"


def contexts(datapath: str, count: int):
    """``count`` contexts: CCC valid's last turns if built, else made-up ones."""
    path = os.path.join(datapath, "ccc", "valid.jsonl")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            turns = [t for line in f for t in json.loads(line)["turns"]]
        return [turns[i % len(turns)] for i in range(count)]
    return [f"message number {i}: how was your day?" for i in range(count)]


def load(server, clients: int, requests: int, texts):
    """(seconds, latencies in ms) of clients x requests POST /rank."""
    host, port = server.server_address[:2]

    def client(index):
        latencies = []
        for r in range(requests):
            body = json.dumps({"context": texts[index * requests + r], "top_k": 5}).encode()
            request = urllib.request.Request(f"http://{host}:{port}/rank", data=body)
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as response:
                response.read()
            latencies.append(1000 * (time.perf_counter() - started))
        return latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [ms for per_client in pool.map(client, range(clients)) for ms in per_client]
    return time.perf_counter() - started, latencies


def measure(ranker, name, max_batch, clients, requests, texts):
    server = make_server(ranker, name, port=0, max_batch=max_batch)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        load(server, clients, 1, texts)  # warm-up: first passes, thread start-up
        server.ranking.batch_sizes.clear()
        seconds, latencies = load(server, clients, requests, texts)
        sizes = server.ranking.batch_sizes
    finally:
        server.shutdown()
        server.server_close()
    latencies.sort()
    return {
        "max_batch": max_batch,
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / seconds, 1),
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "mean_batch": round(sum(sizes) / len(sizes), 1),
    }


def screenshot(ranker, name, out):
    browser = shutil.which("chromium")
    if not browser:
        raise SystemExit("--screenshot needs Debian's chromium (apt-get install chromium)")
    server = make_server(ranker, name, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    query = urllib.parse.urlencode({"context": PAGE_CONTEXT, "top_k": 5})
    path = os.path.abspath(os.path.join(out, "page.png"))
    try:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=900,760",
             "--virtual-time-budget=30000", f"--screenshot={path}", f"http://{host}:{port}/?{query}"],
            check=True, capture_output=True, timeout=180,
        )
    finally:
        server.shutdown()
        server.server_close()
    print(f"screenshot: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--fixed-candidates-path", default=None, help="default: the model's own responses")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--datapath", default="data")
    parser.add_argument("--out", default="docs/serve")
    parser.add_argument("--screenshot", action="store_true")
    args = parser.parse_args(argv)

    from parlai_poly import Ranker

    os.makedirs(args.out, exist_ok=True)
    name = args.model if not os.path.exists(args.model) else os.path.relpath(args.model)
    ranker = Ranker.load(args.model, fixed_candidates=args.fixed_candidates_path or True, datapath=args.datapath)
    texts = contexts(args.datapath, args.clients * args.requests)
    rows = [measure(ranker, name, batch, args.clients, args.requests, texts) for batch in (args.max_batch, 1)]
    result = {"model": name, "candidates": len(ranker.fixed_candidates), "clients": args.clients, "cpus": os.cpu_count(), "rows": rows}
    lines = ["| max batch | requests | requests/s | p50 ms | p99 ms | mean batch |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['max_batch']} | {r['requests']} | {r['requests_per_second']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(os.path.join(args.out, "table.md"), table)
    if args.screenshot:
        screenshot(ranker, name, args.out)


if __name__ == "__main__":
    main()
