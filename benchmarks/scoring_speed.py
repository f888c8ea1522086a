"""Scoring time per context, ours against ParlAI 1.7.2's own modules (the paper's Table 5).

    python -m benchmarks.scoring_speed [--include-1m] [--sizes 1000,100000] [--repeats 7] ...

"Per context" is the paper's cached setting: encode one context (32 tokens) and score it
against N candidate vectors that are already cached. The cached vectors are random tensors
of the right shape and dtype for each implementation, so candidate encoding is excluded.
The cross-encoder has nothing to cache: every candidate is a forward pass of the
(context, candidate) pair, so it is measured on a few pairs (--cross-pairs) and
extrapolated linearly to N (marked as such).

More rows, ours only or ours in another setting:
- bf16 and int8 (bi and poly rows): our bi- and poly-encoders over a candidate store kept in
  bfloat16 or int8 (--candidate-store-dtype): one pass over the compact copy (for the
  bi-encoder a fused, compiled pass; for the poly-encoder a bfloat16 product and the fused
  softmax-and-sum per chunk), then each context's top 100 scored again from the float32
  encodings. Their top-100 recall against our float32 ranking is measured on the benchmark's
  random candidates (a hard case: isotropic vectors have tiny score gaps; see
  benchmarks/store_fidelity.py for trained encodings).
- cross-mixed: --cross-mixed-pairs (1,000) pairs whose candidates have chit-chat lengths
  (MIXED_LENGTHS: a log-normal fitted to CCC's test responses, 3 to 64 tokens). ParlAI's
  cross-encoder pads every pair to the longest; ours sorts pairs by length and pads each
  pass of 256 to its own longest (through CrossEncoderAgent.score_pairs itself).
- cascade-exact, cascade-hnsw (at every N, 1M included): the poly agent's retrieve and
  rerank, bi top-100 (every candidate scored, or a faiss HNSW index) -> poly-64 orders
  them -> cross reorders the best 10. Their candidates are clustered unit vectors (an ANN
  index's recall depends on the vectors; isotropic random ones are its worst case, and
  unlike any real encodings). The HNSW index is built once per N, timed, and its recall@100
  against exact retrieval is measured over 50 queries near candidates, at efSearch 64 to 512
  (the row's timing uses 128). Timed only (the memory process would build the index again).

Both implementations are built at the same size (MiniLM: 6 layers, d=384, 12 heads, FFN 1536,
vocabulary 30,522), randomly initialised (timing does not depend on the weights), in eval
mode under torch.no_grad, with the same number of torch threads. Ours: parlai_poly.modules on
a transformers BertModel, called through the modules' public methods as our agents call
them. ParlAI's: parlai.agents.transformer's TransformerMemNetModel (bi), PolyEncoderModule
(poly) and CrossEncoderModule (cross), called as its agents call them.

Timing runs in one fresh worker process with the default allocator: a few throwaway passes
warm the process up, then every cell gets a first call of each of ours (torch.compile
compiles the fused passes there), --warmup untimed rounds and --repeats timed rounds, the
implementations alternating run by run so background load hits all alike; the figure is
the median. Slow cells get fewer rounds (at least 3) to fit --cell-budget-s, and say so.
Each run of a cached model is split into encoding the context and scoring it (both medians
reported beside the total), and our context encoder is also timed in bfloat16 per model
(--precision bf16: without a gradient, a bfloat16 copy of the backbone). The worker runs
with OMP_WAIT_POLICY=PASSIVE unless told otherwise: with the default spinning policy, 2
OpenMP threads on 2 cores shared with any other job wait for each other at every parallel
region, and one MiniLM forward went from 30 ms to 500 ms here.

The machine's limits, measured in the timing process: the bandwidth of a plain copy of
--copy-mib MiB before the cells (bytes read plus written per second, median of 5), and after
each bi/poly cell the time of a plain bfloat16 GEMM of its shape, [N, d] x [d, m]. The report
turns them into each row's limit, the larger of the bytes the scoring reads at that
bandwidth and its FLOPs at that GEMM's rate, and reports scoring time / limit. A sweep times
the fused poly pass of --sweep-model over its bfloat16 store at several chunk sizes
(--chunk-sweep) and at the module's default.

Peak extra memory of the scoring step (cached candidates already resident, context already
encoded; for cross: the whole forward of the measured pairs) is read in a second fresh
worker process from /proc/self/status: the peak resident set (VmHWM) is reset by writing 5
to /proc/self/clear_refs, VmRSS is read, the step runs once, and the figure is VmHWM minus
that VmRSS. That process runs glibc's malloc with a fixed mmap threshold (64 KiB), so every
tensor's memory is its own mapping, returned to the system when freed, and never hidden by
memory a previous step left in the heap (timing runs without it: it adds page faults).
A known 256 MiB allocation is measured the same way as a check (``memory_calibration_mib``).

Writes ``results.json``, ``table.txt`` and ``benchmark.png`` (ms per context against N,
log-log; ours solid, ours bf16 dotted, ours int8 dash-dotted, ParlAI dashed) to --out, each
atomically.
"""
import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.scoring_constants import (
    CASCADE, CHUNK_SWEEP, CHUNK_SWEEP_QUICK, COPY_MIB, COPY_MIB_QUICK, GEMM_MIN_M, IMPL_NAMES, IMPLS, MILLION,
    MINILM, MIXED_LENGTHS, MODELS, RESCORE_TOP_K, SWEEP_MODEL, TINY, context_vectors,
)
from benchmarks.scoring_impls import BUILDERS, clustered_candidates, mixed_token_ids
from benchmarks.scoring_report import (
    add_limits, build_rows, cascade_summary, compute_ratios, render_plot, render_table,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # its workers run from there


MEMORY_METHOD = (
    "Peak extra resident memory of the scoring step, read from /proc/self/status: VmHWM is "
    "reset (write 5 to /proc/self/clear_refs), VmRSS read, the step run once, extra = VmHWM "
    "- VmRSS. The cached candidates and the encoded context are resident before and not "
    "counted; for cross the step is the whole forward of the measured pairs. Measured in its "
    "own fresh process (not the timing one), whose glibc malloc runs with a fixed 64 KiB mmap "
    "threshold so freed tensors go back to the system and every allocation shows in the "
    "resident set. Torch allocations are seen (unlike tracemalloc). Check: a 256 MiB tensor "
    "is measured the same way (memory_calibration_mib)."
)


def _progress(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# memory


def _fixed_mmap_threshold(threshold=64 * 1024):
    """Make glibc mmap every allocation over ``threshold`` (and so unmap it when freed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, threshold) and libc.mallopt(m_trim_threshold, 128 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def _proc_status_kib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


class PeakMemory:
    """Peak extra resident memory of one call, in MiB (None where /proc cannot tell)."""

    def __init__(self):
        self.available = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.available = "VmHWM" in _proc_status_kib()
        except OSError:
            pass

    def __call__(self, fn):
        if not self.available:
            fn()
            return None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _proc_status_kib()["VmRSS"]
        result = fn()
        peak = _proc_status_kib()["VmHWM"]
        del result
        return max(0, peak - before) / 1024.0

    def calibrate(self, mib=256):
        import torch

        return self(lambda: torch.ones(mib * 1024 * 1024 // 4))


# ---------------------------------------------------------------------------------------
# measuring (in the worker process)


def _token_ids(torch, gen, rows, length, vocab):
    ids = torch.randint(5, vocab, (rows, length), generator=gen)
    ids[:, 0], ids[:, -1] = 1, 2  # stand-ins for [CLS] / [SEP]; 0 is padding
    return ids


def _n_runs(seconds_per_run, repeats, budget):
    """Fewer runs for slow cells: fit ``budget`` seconds, but at least 3 (or ``repeats``)."""
    if seconds_per_run * repeats <= budget:
        return repeats
    return max(min(3, repeats), int(budget // max(seconds_per_run, 1e-9)))


def _versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "parlai"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def measure(settings, mode):
    """Every cell of the benchmark, in a fresh process (see ``_worker_main``).

    mode "time": warm-up, then the timed runs, the implementations alternating run by run.
    mode "memory": each cell's scoring step once per implementation, under PeakMemory.
    Timing and memory run in separate processes because the memory reading needs glibc's
    mmap threshold fixed low, which adds page faults the default allocator would not have.
    The cascades are timed only (their HNSW index would be built twice otherwise).
    """
    import torch

    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    cfg = settings["config"]
    out = {"torch_threads": torch.get_num_threads(), "versions": _versions(), "cells": []}
    if mode == "memory":
        out["peak_memory"] = PeakMemory()
        out["memory_available"] = out["peak_memory"].available
        out["memory_calibration_mib"] = {"allocated": 256, "measured": out["peak_memory"].calibrate(256)}
    else:
        _progress(f"time: the machine's copy bandwidth ({settings['copy_mib']} MiB)...")
        out["machine"] = {"copy": copy_bandwidth(settings["copy_mib"]), "gemm": {}}
        out["encode"], out["chunk_sweep"] = {}, None
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "context": _token_ids(torch, gen, 1, settings["context_tokens"], cfg["vocab"]),
        "cross": _token_ids(torch, gen, settings["cross_pairs"], settings["cand_tokens"], cfg["vocab"]),
        "cross-mixed": mixed_token_ids(torch, gen, settings["cross_mixed_pairs"], cfg["vocab"]),
    }
    sizes = sorted(set(settings["sizes"]) | ({MILLION} if settings["include_1m"] else set()))
    models = [m for m in settings["models"] if mode == "time" or not m.startswith("cascade")]
    n_cells = sum(1 if m.startswith("cross") else len(sizes) for m in models)
    t_start = time.perf_counter()
    with torch.no_grad():
        if mode == "time":  # the process's first forward passes are slow (thread pools, kernels)
            _progress("time: warming up the process...")
            warm = [b for b in (BUILDERS[name](cfg, "bi") for name in IMPLS) if b is not None]
            for _ in range(3):
                for impl in warm:
                    impl.score(impl.encode(inputs["context"]), impl.cached(_candidates(cfg, min(sizes), "random")))
            del warm
        for model in models:
            _progress(f"{mode}: building {model}...")
            impls = {name: BUILDERS[name](cfg, model) for name in IMPLS}
            impls = {name: impl for name, impl in impls.items() if impl is not None}
            if mode == "memory" and not model.startswith("cross"):
                _first_calls(impls, inputs["context"], _candidates(cfg, min(sizes), "random"))
            cells = [len(inputs[model])] if model.startswith("cross") else sizes
            cached = model == "bi" or model.startswith("poly-")
            if mode == "time" and cached:
                out["encode"][model] = _time_encodes(impls["ours"], inputs["context"], settings)
            for n in cells:
                cell = _measure_cell(model, n, impls, inputs, settings, mode, out)
                out["cells"].append(cell)
                _progress(f"{mode} [{len(out['cells'])}/{n_cells}] {model:13s} N={n:>9,}: {_cell_text(cell, mode)}, "
                          f"{time.perf_counter() - t_start:.0f}s elapsed")
                if mode == "time" and cached:
                    _gemm_ms(cfg, n, context_vectors(model), out["machine"]["gemm"], settings["repeats"])
                if mode == "time" and model == settings["sweep_model"] and n == _sweep_n(sizes):
                    out["chunk_sweep"] = _chunk_sweep(impls["ours_bf16"], inputs["context"], cfg, n, settings)
            del impls
            _CANDIDATES.pop("clustered", None)
            gc.collect()
    out.pop("peak_memory", None)
    out["seconds"] = time.perf_counter() - t_start
    return out


_CANDIDATES = {}  # kind -> {N: [N, d]}: one set per N and kind, shared by every model


def _candidates(cfg, n, kind):
    """Cached candidate vectors: 'random' (what every ranker row scores; any values time the
    same) or 'clustered' (the cascades, whose HNSW recall depends on the vectors)."""
    import torch

    sets = _CANDIDATES.setdefault(kind, {})
    if n not in sets:
        if kind == "random":
            sets[n] = torch.randn(n, cfg["dim"], generator=torch.Generator().manual_seed(n)) / math.sqrt(cfg["dim"])
        else:
            sets.clear()  # one size at a time: 1M clustered vectors are 1.5 GB
            sets[n] = clustered_candidates(n, cfg["dim"], CASCADE["topics"], seed=n)
    return sets[n]


def _first_calls(impls, context, cands):
    """First calls initialise lazily (thread pools, kernels): keep that out of the reading."""
    for impl in impls.values():
        impl.score(impl.encode(context), impl.cached(cands))


def _median_ms(fn, runs):
    """The median of ``runs`` timed calls of ``fn``, after one untimed call, in ms."""
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def copy_bandwidth(mib, runs=5):
    """A plain copy of ``mib`` MiB: {"mib", "ms", "gb_s"}, gb_s the bytes it moves (read plus
    written) per second: what a pass that only reads can hope to read."""
    import torch

    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), runs)
    return {"mib": mib, "ms": ms, "gb_s": 2 * src.numel() * 4 / (ms / 1000.0) / 1e9}


def _gemm_ms(cfg, n, m, gemm, repeats):
    """A plain GEMM of a row's shape, [N, d] x [d, max(m, GEMM_MIN_M)], in bfloat16, float32
    and int8, timed once per (N, m) into ``gemm`` {"NxM": {"n", "m", "ms", "ms_float32",
    "ms_int8"}} (median of up to ``repeats`` runs). The limit reads ``ms``; ``ms_float32``, the
    same GEMM in float32, says how far a float32 row can come to it (torch's float32 GEMM is
    far slower on some CPUs), ``ms_int8`` (torch's int8 product, which our int8 stores use)
    how far below it an int8 row can go."""
    import torch

    from parlai_poly.modules.stored import int8_product, quantize_int8

    m = max(m, GEMM_MIN_M)
    key = f"{n}x{m}"
    if key in gemm:
        return
    cands = _candidates(cfg, n, "random")  # [N, d]
    context = torch.randn(m, cfg["dim"])  # [m, d]
    runs = max(3, min(repeats, 7))
    ms_float32 = _median_ms(lambda: torch.matmul(cands, context.t()), runs)
    cands_q, context_q = quantize_int8(cands)[0], quantize_int8(context)[0].t()
    ms_int8 = _median_ms(lambda: int8_product(cands_q, context_q), runs)
    cands, context = cands.bfloat16(), context.bfloat16()
    ms = _median_ms(lambda: torch.matmul(cands, context.t()), runs)
    gemm[key] = {"n": n, "m": m, "ms": ms, "ms_float32": ms_float32, "ms_int8": ms_int8}


def _time_encodes(impl, context, settings):
    """Our context encoder's ms per context in float32 and in bfloat16 (--precision bf16:
    without a gradient, its bfloat16 copy of the backbone), alternating run by run: {"float32": ms, "bfloat16": ms}."""
    import torch

    encoder = impl.module.context_encoder
    runs = {"float32": [], "bfloat16": []}
    for _ in range(settings["warmup"] + settings["repeats"]):
        for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
            encoder.compute_dtype = dtype
            t = time.perf_counter()
            impl.encode(context)
            runs[name].append((time.perf_counter() - t) * 1000.0)
    encoder.compute_dtype = None
    return {name: statistics.median(times[settings["warmup"]:]) for name, times in runs.items()}


def _sweep_n(sizes):
    """The N the chunk sweep runs at: 100k if measured, else the largest N."""
    return 100000 if 100000 in sizes else max(sizes)


def _chunk_sweep(impl, context, cfg, n, settings):
    """The fused poly pass over a bfloat16 store of ``n`` candidates (scoring alone) at each
    of settings["chunk_sweep"] candidates per chunk and at the module's default."""
    module = impl.module
    vectors, mask = impl.encode(context)
    store = impl.store(impl.cached(_candidates(cfg, n, "random")))
    default = module.default_chunk_size(vectors, mask, store)
    sizes = sorted(set(settings["chunk_sweep"]) | {default})
    runs = {size: [] for size in sizes}
    for _ in range(settings["warmup"] + settings["repeats"]):
        for size in sizes:  # alternating, as the cells do
            t = time.perf_counter()
            module.score(vectors, mask, store, chunk_size=size)
            runs[size].append((time.perf_counter() - t) * 1000.0)
    ms = {str(size): statistics.median(times[settings["warmup"]:]) for size, times in runs.items()}
    return {"model": settings["sweep_model"], "n": n, "store": "bfloat16", "default_chunk": default,
            "fused": module.fusing(n), "ms": ms}


def _measure_cell(model, n, impls, inputs, settings, mode, out):
    """One (model, N) cell: timed runs, or each implementation's peak extra memory."""
    cfg, context = settings["config"], inputs["context"]
    info = None
    if model.startswith("cross"):
        steps = {name: (None, lambda _, impl=impl: impl.pairs(context, inputs[model])) for name, impl in impls.items()}
        memory_steps = {name: (lambda score=score: score(None)) for name, (_, score) in steps.items()}
    else:
        kind = "clustered" if model.startswith("cascade") else "random"
        steps, memory_steps = {}, {}
        for name, impl in impls.items():
            cached = impl.cached(_candidates(cfg, n, kind))
            info = getattr(cached, "info", None) or info
            # (encode, score): timed apart; the cascades encode inside their scoring
            encode = None if model.startswith("cascade") else impl.encode
            steps[name] = (encode, lambda enc, impl=impl, cached=cached: impl.score(context if enc is None else enc, cached))
            if mode == "memory":
                memory_steps[name] = _scoring_only(impl, context, cached)
    if mode == "memory":
        for step in memory_steps.values():
            step()  # warm-up: first calls (and torch.compile) are not the scoring step's memory
        cell = {"impls": {name: {"extra_mib": out["peak_memory"](step)} for name, step in memory_steps.items()}}
    else:
        cell = _time_cell(steps, settings, n, context)
    cell.update(model=model, n=n)
    if model.startswith("cross"):
        cell["pairs"] = n
    if info:
        cell["info"] = info
    return cell


def _cell_text(cell, mode):
    key, unit = ("extra_mib", "MiB") if mode == "memory" else ("ms", "ms")
    parts = []
    for name, entry in cell["impls"].items():
        value = entry.get(key)
        text = f"{IMPL_NAMES[name]} " + ("n/a" if value is None else f"{value:,.1f} {unit}")
        if entry.get("score_ms") is not None:
            text += f" (score {entry['score_ms']:,.1f})"
        parts.append(text)
    text = ", ".join(parts) + (f" ({cell['runs']} runs)" if mode == "time" else "")
    if cell.get("info"):
        info = cell["info"]
        text += f"; HNSW build {info['hnsw_build_s']:.1f} s, recall@{info['k']} {info['recall_at_k']:.3f}"
    return text


def _scoring_only(impl, context, cached):
    """The scoring step alone: the context is encoded now, outside the memory reading."""
    encoded = impl.encode(context)
    return lambda: impl.score(encoded, cached)


def _top_recall(scores, reference, k=RESCORE_TOP_K):
    """|top-k(scores) & top-k(reference)| / k for [1, N] scores."""
    k = min(k, scores.size(1))
    found, wanted = scores.topk(k, dim=1).indices, reference.topk(k, dim=1).indices
    return len(set(found[0].tolist()) & set(wanted[0].tolist())) / k


def _time_cell(steps, settings, n, context):
    """A first call of ours, warm-up, then the timed runs, the implementations alternating
    run by run; each run timed whole and split into encoding and scoring."""

    def check(name, scores):  # all really score N candidates: [1, N] scores
        if tuple(scores.shape) != (1, n):
            raise RuntimeError(f"{name}: scores of shape {tuple(scores.shape)}, expected (1, {n})")
        return scores

    def run(encode, score):
        t0 = time.perf_counter()
        encoded = encode(context) if encode is not None else None
        t1 = time.perf_counter()
        scores = score(encoded)
        t2 = time.perf_counter()
        return scores, (t2 - t0) * 1000.0, (t1 - t0) * 1000.0, (t2 - t1) * 1000.0

    for name, (encode, score) in steps.items():
        if name.startswith("ours"):
            check(name, run(encode, score)[0])  # the first call compiles the fused passes
    t0 = time.perf_counter()
    last = {}
    for _ in range(settings["warmup"]):
        for name, step in steps.items():
            last[name] = check(name, run(*step)[0])
    round_seconds = (time.perf_counter() - t0) / max(1, settings["warmup"])
    impls = {name: {"runs_ms": [], "encode_runs_ms": [], "score_runs_ms": []} for name in steps}
    runs = None
    while runs is None or len(impls["ours"]["runs_ms"]) < runs:
        t_round = time.perf_counter()
        for name, step in steps.items():
            scores, total, encode_ms, score_ms = run(*step)
            last[name] = check(name, scores)
            for key, value in (("runs_ms", total), ("encode_runs_ms", encode_ms), ("score_runs_ms", score_ms)):
                impls[name][key].append(value)
        if runs is None:  # without a warm-up, the first round sets the pace
            round_seconds = round_seconds if settings["warmup"] else time.perf_counter() - t_round
            runs = _n_runs(round_seconds, settings["repeats"], settings["cell_budget_s"])
    split = all(step[0] is not None for step in steps.values())
    for name, entry in impls.items():
        entry["ms"] = statistics.median(entry["runs_ms"])
        entry["encode_ms"] = statistics.median(entry.pop("encode_runs_ms")) if split else None
        entry["score_ms"] = statistics.median(entry.pop("score_runs_ms")) if split else None
        if split and name.startswith("ours_"):  # the top against our float32 ranking: same weights, same context
            entry["top_recall_vs_float32"] = _top_recall(last[name], last["ours"])
    return {"runs": runs, "reduced_runs": runs < settings["repeats"], "impls": impls}


def _worker_main(mode, settings_path, result_path):
    if mode == "memory":
        _fixed_mmap_threshold()
    with open(settings_path) as f:
        settings = json.load(f)
    result = measure(settings, mode)
    _write_atomic(result_path, json.dumps(result).encode())


def _write_atomic(path, data: bytes):
    from parlai_poly.storage import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scoring_speed",
        description="Reproduce the Poly-encoder paper's Table 5 (ms per context against N cached "
        "candidates) for our modules and ParlAI 1.7.2's, side by side.",
    )
    p.add_argument("--sizes", default=None, help="comma-separated N of cached candidates (default 1000,100000)")
    p.add_argument("--include-1m", action=argparse.BooleanOptionalAction, default=None,
                   help="also 1,000,000 cached candidates for bi and poly (default: yes, but not with --quick)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per cell, median reported (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
                   help="OMP_WAIT_POLICY of the worker (default passive: idle OpenMP threads sleep "
                   "instead of spinning, which keeps timings sane when other jobs share the cores; "
                   "inherit: leave the environment as it is)")
    p.add_argument("--context-tokens", type=int, default=32)
    p.add_argument("--cand-tokens", type=int, default=16, help="candidate length for cross pairs")
    p.add_argument("--cross-pairs", type=int, default=None, help="cross-encoder pairs measured (default 100)")
    p.add_argument("--cross-mixed-pairs", type=int, default=None,
                   help="mixed-length cross-encoder pairs measured (default 1000: several of our passes of 256)")
    p.add_argument("--cell-budget-s", type=float, default=40.0,
                   help="seconds of timed runs per cell (both implementations); slower cells get fewer "
                   "runs, at least 3 (default 40)")
    p.add_argument("--chunk-sweep", default=None,
                   help=f"comma-separated candidates per chunk for the fused poly pass's sweep (default "
                   f"{','.join(map(str, CHUNK_SWEEP))}; the module's default is always added)")
    p.add_argument("--sweep-model", default=SWEEP_MODEL, help=f"the poly model the chunk sweep times (default {SWEEP_MODEL})")
    p.add_argument("--copy-mib", type=int, default=None,
                   help=f"MiB of the plain copy that measures the memory bandwidth (default {COPY_MIB})")
    p.add_argument("--quick", action="store_true",
                   help="tiny model and sizes, for a smoke test (numbers meaningless)")
    p.add_argument("--in-process", action="store_true", help="measure in this process, not a fresh one")
    p.add_argument("--out", default="runs/benchmark", help="output folder (default runs/benchmark)")
    p.add_argument("--worker", nargs=3, metavar=("MODE", "SETTINGS", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"--models {args.models}: choose from {','.join(MODELS)}")
    default_sizes = "100,10000" if args.quick else "1000,100000"  # quick: 10k takes the fused passes
    try:
        sizes = sorted({int(x.replace("_", "")) for x in (args.sizes or default_sizes).split(",") if x.strip()})
    except ValueError:
        p.error(f"--sizes {args.sizes}: comma-separated integers")
    if not sizes or min(sizes) < 1:
        p.error("--sizes: positive integers")
    args.models, args.sizes = [m for m in MODELS if m in models], sizes
    if not args.sweep_model.startswith("poly-"):
        p.error(f"--sweep-model {args.sweep_model}: a poly model (poly-16, poly-64, poly-360)")
    try:
        sweep = args.chunk_sweep or ",".join(map(str, CHUNK_SWEEP_QUICK if args.quick else CHUNK_SWEEP))
        args.chunk_sweep = sorted({int(x) for x in sweep.split(",") if x.strip()})
    except ValueError:
        p.error(f"--chunk-sweep {args.chunk_sweep}: comma-separated integers")
    if not args.chunk_sweep or min(args.chunk_sweep) < 1:
        p.error("--chunk-sweep: positive integers")
    args.copy_mib = args.copy_mib or (COPY_MIB_QUICK if args.quick else COPY_MIB)
    if args.include_1m is None:
        args.include_1m = not args.quick
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.threads = args.threads or (1 if args.quick else 2)
    args.cross_pairs = args.cross_pairs or (8 if args.quick else 100)
    args.cross_mixed_pairs = args.cross_mixed_pairs or (8 if args.quick else 1000)
    if min(args.repeats, args.threads, args.cross_pairs, args.cross_mixed_pairs) < 1 or args.warmup < 0:
        p.error("--repeats, --threads, --cross-pairs and --cross-mixed-pairs must be positive, --warmup non-negative")
    return args


def _run_worker(mode, settings, args):
    """One fresh process per mode: timing with the default allocator, memory with PeakMemory's."""
    with tempfile.TemporaryDirectory() as tmp:
        settings_path, result_path = os.path.join(tmp, "settings.json"), os.path.join(tmp, "result.json")
        with open(settings_path, "w") as f:
            json.dump(settings, f)
        env = dict(os.environ)
        threads = str(args.threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
        if args.omp_wait_policy != "inherit":
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
        if mode == "memory":
            env.update(MALLOC_MMAP_THRESHOLD_=str(64 * 1024), MALLOC_TRIM_THRESHOLD_=str(128 * 1024))
        cmd = [sys.executable, "-m", "benchmarks.scoring_speed", "--worker", mode, settings_path, result_path]
        subprocess.run(cmd, env=env, check=True, cwd=REPO_ROOT)
        with open(result_path) as f:
            return json.load(f)


def run(args):
    config_name, config = ("tiny", TINY) if args.quick else ("MiniLM", MINILM)
    settings = {
        "config": config,
        "config_name": config_name,
        "models": args.models,
        "sizes": args.sizes,
        "include_1m": args.include_1m,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "context_tokens": args.context_tokens,
        "cand_tokens": args.cand_tokens,
        "cross_pairs": args.cross_pairs,
        "cross_mixed_pairs": args.cross_mixed_pairs,
        "cell_budget_s": args.cell_budget_s,
        "chunk_sweep": args.chunk_sweep,
        "sweep_model": args.sweep_model,
        "copy_mib": args.copy_mib,
        "rescore_top_k": RESCORE_TOP_K,
        "omp_wait_policy": (os.environ.get("OMP_WAIT_POLICY") if args.omp_wait_policy == "inherit" or args.in_process
                            else args.omp_wait_policy.upper()),
    }
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    started = time.time()
    _progress(f"benchmark: {config_name} size, models {','.join(args.models)}, N {args.sizes}"
              f"{' + 1M (bi/poly/cascades)' if args.include_1m else ''}, {args.threads} threads; load average "
              f"{loadavg_start}")
    if args.in_process:
        timed = measure(settings, "time")
        _fixed_mmap_threshold()
        memory = measure(settings, "memory")
    else:
        timed, memory = (_run_worker(mode, settings, args) for mode in ("time", "memory"))
    measured = {**timed, **{k: memory[k] for k in ("memory_available", "memory_calibration_mib")}}
    rows = build_rows(timed, memory, args.sizes)
    add_limits(rows, timed["machine"], config, RESCORE_TOP_K)
    result = {
        "setup": {
            **settings,
            "torch_threads": measured["torch_threads"],
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": measured["versions"],
            "loadavg_start": loadavg_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "seconds": round(time.time() - started, 1),
            "seconds_timing": round(timed["seconds"], 1),
            "seconds_memory": round(memory["seconds"], 1),
            "per_context": "encode one context + score it against N cached candidate vectors (random "
            "tensors of each implementation's cached shape: ours [N, d], ParlAI's bi [N, d], poly "
            "[1, N, d]); cross: pair forwards, measured on cross_pairs pairs, extrapolated linearly; "
            "cross-mixed: cross_mixed_pairs pairs of mixed lengths (MIXED_LENGTHS), as measured; "
            "cascade-*: bi top-K (exact or HNSW) -> poly-64 on K -> cross on the best 10, over "
            "clustered unit vectors (recall depends on the vectors, timing hardly)",
            "ours_modules": "parlai_poly.modules (BiEncoderModule, PolyEncoderModule codes/basic/mean, "
            "CrossEncoderModule through CrossEncoderAgent.score_pairs: sorted by length, passes of 256 "
            "pairs) on a randomly initialised transformers BertModel; ours_bf16 / ours_int8: the same bi "
            "and poly over a bfloat16 / int8 candidate store (--candidate-store-dtype), the top "
            f"{RESCORE_TOP_K} rescored from the float32 encodings; the fused passes compiled with "
            "torch.compile from 10,000 candidates, as the agents run them",
            "mixed_lengths": MIXED_LENGTHS,
            "cascade": CASCADE,
            "parlai_modules": "parlai.agents.transformer: TransformerMemNetModel + TransformerRankerAgent._score (bi), "
            "PolyEncoderModule codes/basic (poly), CrossencoderAgent.score_candidates + CrossEncoderModule "
            "(cross); variant xlm, gelu, learned positions, 2 segments; randomly initialised",
        },
        "memory_method": MEMORY_METHOD,
        "memory_available": measured["memory_available"],
        "memory_calibration_mib": measured["memory_calibration_mib"],
        "machine": timed["machine"],
        "encode": timed["encode"],
        "chunk_sweep": timed["chunk_sweep"],
        "rows": rows,
    }
    result["ratios"] = compute_ratios(rows, args.sizes)
    result["cascade"] = cascade_summary(rows)
    table = render_table(result)
    out = args.out
    os.makedirs(out, exist_ok=True)
    _write_atomic(os.path.join(out, "results.json"), (json.dumps(result, indent=1) + "\n").encode())
    _write_atomic(os.path.join(out, "table.txt"), table.encode())
    render_plot(result, os.path.join(out, "benchmark.png"))
    print(table, flush=True)
    print(f"wrote {os.path.join(out, 'results.json')}, table.txt and benchmark.png "
          f"({result['setup']['seconds']:.0f} s)", flush=True)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        _worker_main(*args.worker)
        return None
    return run(args)


if __name__ == "__main__":
    main()
