"""The scoring benchmark's results: rows per (model, N), the ratios its targets read, the table
and the figure; pure functions of what the harness (``scoring_speed``) measured."""
from benchmarks.scoring_constants import (
    CASCADE, GEMM_MIN_M, IMPL_NAMES, IMPLS, MILLION, MIXED_LENGTHS, MODELS, PAPER_CPU_MS, RESCORE_TOP_K, STORE_DTYPE,
    context_vectors,
)

# bytes per stored number of each store dtype; int8 adds a float32 scale per vector
STORE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


def build_rows(timed, memory, sizes):
    """One row per (model, N): cached models as measured, cross extrapolated from its pairs,
    cross-mixed as measured (its point is the padding of those very pairs)."""
    rows = []
    extra = {(c["model"], c["n"]): c["impls"] for c in memory["cells"]}
    for cell in timed["cells"]:
        mem = extra.get((cell["model"], cell["n"]), {})
        impls = {
            name: {"ms": e["ms"], "extra_mib": mem.get(name, {}).get("extra_mib"), "runs_ms": e["runs_ms"],
                   **{key: e[key] for key in ("encode_ms", "score_ms", "top_recall_vs_float32") if key in e}}
            for name, e in cell["impls"].items()
        }
        row = {"model": cell["model"], "n": cell["n"], "extrapolated": False, "runs": cell["runs"],
               "reduced_runs": cell["reduced_runs"], "impls": impls}
        if "info" in cell:
            row["info"] = cell["info"]
        if cell["model"] == "cross-mixed":
            row.update(measured_pairs=cell["pairs"], lengths=MIXED_LENGTHS)
        if cell["model"] != "cross":
            rows.append(row)
            continue
        pairs = cell["pairs"]
        for n in sorted(set(sizes) | {pairs}):
            scaled = {
                name: {
                    "ms": e["ms"] * n / pairs,
                    # memory only where measured: ParlAI scores all pairs in one forward (grows
                    # with N), ours in passes of 256 pairs (bounded)
                    "extra_mib": e["extra_mib"] if n == pairs else None,
                    "runs_ms": e["runs_ms"] if n == pairs else [],
                }
                for name, e in impls.items()
            }
            rows.append(dict(row, n=n, extrapolated=n != pairs, measured_pairs=pairs, impls=scaled))
    for row in rows:
        parlai = row["impls"].get("parlai", {}).get("ms")
        for name, entry in row["impls"].items():
            entry["speedup_parlai_over_this"] = parlai / entry["ms"] if parlai and entry["ms"] else None
        row["speedup_parlai_over_ours"] = row["impls"]["ours"]["speedup_parlai_over_this"]
        row["paper_cpu_ms_bert_base"] = PAPER_CPU_MS.get(row["model"], {}).get(row["n"])
    order = {m: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (order[r["model"]], r["n"]))
    return rows


def scoring_bytes(n, dim, store_dtype, rescored=RESCORE_TOP_K):
    """Bytes one scoring pass reads: the N stored vectors (int8: and their float32 scales), and
    for a compact store the float32 rows of the top ``rescored``."""
    read = n * dim * STORE_BYTES[store_dtype]
    if store_dtype == "int8":
        read += n * 4
    if store_dtype != "float32":
        read += min(rescored, n) * dim * 4
    return read


def scoring_flops(model, n, dim):
    """Multiply-adds x 2 of the products: N x d per context vector (bi: 1, poly: m)."""
    return 2 * n * dim * context_vectors(model)


def add_limits(rows, machine, cfg, rescored=RESCORE_TOP_K):
    """Each bi/poly row's limit on this machine, per implementation, in place: the larger of
    the bytes its scoring reads at the copy bandwidth and its FLOPs at the rate of a plain
    bfloat16 GEMM of the row's shape ([N, d] x [d, max(m, GEMM_MIN_M)]); and its scoring time
    as a multiple of that limit (``score_over_limit``: 1 is the machine's best)."""
    bandwidth = machine["copy"]["gb_s"] * 1e9  # bytes per second
    for row in rows:
        if not (row["model"] == "bi" or row["model"].startswith("poly-")):
            continue
        n, dim = row["n"], cfg["dim"]
        flops = scoring_flops(row["model"], n, dim)
        gemm = machine["gemm"].get(f"{n}x{max(context_vectors(row['model']), GEMM_MIN_M)}")
        rate = 2 * n * dim * gemm["m"] / (gemm["ms"] / 1000.0) if gemm else None  # FLOP per second
        row["flops"], row["gemm_gflop_s"] = flops, rate and rate / 1e9
        for name, entry in row["impls"].items():
            read = scoring_bytes(n, dim, STORE_DTYPE[name], rescored)
            limit_ms = 1000.0 * max(read / bandwidth, flops / rate if rate else 0.0)
            score_ms = entry.get("score_ms")
            entry.update(bytes_read=read, limit_ms=limit_ms,
                         score_over_limit=score_ms / limit_ms if score_ms is not None else None)
    return rows


def _find(rows, model, n):
    for row in rows:
        if row["model"] == model and row["n"] == n:
            return row
    return None


def _ratio(value, target, op, **info):
    meets = None if value is None else (value >= target if op == ">=" else value <= target)
    return {"value": value, "target": f"{op} {target:.3g}", "meets_target": meets, **info}


def compute_ratios(rows, sizes):
    """The figures the issues set targets for (reported, never asserted)."""
    ref_n = 100000 if 100000 in sizes else max(sizes)
    big_n = MILLION if any(r["n"] == MILLION for r in rows) else max(sizes)
    ratios = {}

    def ms(model, n, impl, key="ms"):
        row = _find(rows, model, n)
        return row and row["impls"].get(impl, {}).get(key)

    def ratio(a, b):
        return a / b if a and b else None

    poly_parlai = ms("poly-64", ref_n, "parlai")
    for impl, suffix, label in (("ours", "", "ours"), ("ours_bf16", "_bf16", "ours with a bfloat16 store")):
        ratios[f"poly64_speed_parlai_over_ours{suffix}"] = _ratio(
            ratio(poly_parlai, ms("poly-64", ref_n, impl)), 3, ">=", n=ref_n,
            what=f"ParlAI's ms per context / {label}, poly-64",
        )
    ratios["poly64_over_bi_ours"] = _ratio(
        ratio(ms("poly-64", ref_n, "ours"), ms("bi", ref_n, "ours")), 2, "<=", n=ref_n,
        what="poly-64 ms per context / our bi-encoder's, both float32",
    )
    for n, target, suffix in ((ref_n, 1.5, ""), (big_n, 2, "_largest")):
        ratios[f"poly64_bf16_over_bi_bf16{suffix}"] = _ratio(
            ratio(ms("poly-64", n, "ours_bf16"), ms("bi", n, "ours_bf16")), target, "<=", n=n,
            what="poly-64 / bi-encoder ms per context, both over a bfloat16 store",
        )
    for impl, target in (("ours_bf16", 1.8), ("ours_int8", 3)):
        dtype = STORE_DTYPE[impl]
        ratios[f"bi_speed_parlai_over_ours_{dtype}"] = _ratio(
            ratio(ms("bi", big_n, "parlai"), ms("bi", big_n, impl)), target, ">=", n=big_n,
            what=f"ParlAI's bi-encoder ms per context / ours over its {dtype} store",
        )
        ratios[f"bi_top{RESCORE_TOP_K}_recall_{dtype}"] = _ratio(
            ms("bi", big_n, impl, "top_recall_vs_float32"), 0.99, ">=", n=big_n,
            what=f"top-{RESCORE_TOP_K} of our bi-encoder over its {dtype} store against float32's, on the "
            "benchmark's random candidates (trained encodings: benchmarks/store_fidelity.py)",
        )
    per_m = {}
    for model in ("poly-16", "poly-64", "poly-360"):
        row = _find(rows, model, ref_n)
        if row and row["impls"]["ours"]["extra_mib"] is not None and row["impls"]["parlai"]["extra_mib"]:
            per_m[model] = row["impls"]["ours"]["extra_mib"] / row["impls"]["parlai"]["extra_mib"]
    ratios["poly_extra_memory_ours_over_parlai"] = _ratio(
        max(per_m.values()) if per_m else None, 1 / 3, "<=", n=ref_n, per_model=per_m,
        what="peak extra memory of scoring, ours / ParlAI's (the worst poly size)",
    )
    at_big = {
        f"{r['model']} {impl}": e["extra_mib"]
        for r in rows
        if r["n"] == big_n and (r["model"] == "bi" or r["model"].startswith("poly-"))
        for impl, e in r["impls"].items()
        if impl != "parlai" and e.get("extra_mib") is not None
    }
    ratios["ours_extra_memory_largest_mib"] = _ratio(
        max(at_big.values()) if at_big else None, 32, "<=", n=big_n, per_model=at_big,
        what="our peak extra memory of scoring, MiB (the worst of bi/poly, every store)",
    )
    limits = {
        f"{r['model']} {impl}": e["score_over_limit"]
        for r in rows
        if r["n"] == big_n
        for impl, e in r["impls"].items()
        if impl != "parlai" and e.get("score_over_limit") is not None
    }
    ratios["ours_score_over_limit_largest"] = _ratio(
        max(limits.values()) if limits else None, 3, "<=", n=big_n, per_model=limits,
        what="our scoring time / the machine's limit for it (the worst bi/poly row and store)",
    )
    for model, what in (("cross", "same-length pairs"), ("cross-mixed", "mixed-length pairs")):
        cross = next((r for r in rows if r["model"] == model and not r["extrapolated"]), None)
        name = "cross_throughput_ours_over_parlai" + ("_mixed" if model == "cross-mixed" else "")
        ratios[name] = _ratio(
            cross and cross["speedup_parlai_over_ours"], 1.5, ">=", n=cross and cross["n"],
            what=f"cross-encoder pairs per second, ours / ParlAI's ({what}, measured)",
        )
    return ratios


def cascade_summary(rows):
    """Per N: the cascades' ms per context, the HNSW build time and its recall@K."""
    out = {}
    for row in rows:
        if row["model"].startswith("cascade"):
            entry = out.setdefault(str(row["n"]), {})
            entry[row["model"].split("-")[1] + "_ms"] = row["impls"]["ours"]["ms"]
            entry.update(row.get("info", {}))
    return out


def _fmt_ms(ms):
    if ms is None:
        return "-"
    if ms >= 100000:
        return f"{ms / 1000:,.0f}s"
    if ms >= 100:
        return f"{ms:,.0f}"
    return f"{ms:.1f}"


def _fmt_mib(mib):
    return "-" if mib is None else f"{mib:,.0f}"


def _fmt_ratio(value):
    return f"{value:.2f}x" if value else "-"


def _fmt_recall(value):
    return "-" if value is None else f"{value:.3f}"


TABLE_COLUMNS = (
    ("model", 13), ("N", 10), ("impl", 12), ("ms", 9), ("encode", 7), ("score", 8), ("limit", 8),
    ("xlimit", 7), ("ParlAI/this", 11), ("top100", 6), ("MiB", 6), ("runs", 5), ("paper CPU ms", 12),
)


def _table_lines(r):
    """One line per implementation of row ``r``: total, encode and score ms, the machine's
    limit for the scoring and the score's multiple of it, ParlAI's time over this one, the
    top-100 overlap with our float32 ranking, peak extra MiB."""
    mark = "*" if r["extrapolated"] else " "
    runs = "-" if r["extrapolated"] else f"{r['runs']}{'!' if r['reduced_runs'] else ''}"
    paper = r["paper_cpu_ms_bert_base"]
    lines = []
    for i, name in enumerate(impl for impl in IMPLS if impl in r["impls"]):
        e = r["impls"][name]
        over = e.get("score_over_limit")
        cells = (
            r["model"] if i == 0 else "", f"{r['n']:,}" if i == 0 else "", IMPL_NAMES[name],
            _fmt_ms(e["ms"]) + mark, _fmt_ms(e.get("encode_ms")), _fmt_ms(e.get("score_ms")),
            _fmt_ms(e.get("limit_ms")), "-" if over is None else f"{over:.2f}",
            _fmt_ratio(e["speedup_parlai_over_this"]) if name != "parlai" else "",
            _fmt_recall(e.get("top_recall_vs_float32")), _fmt_mib(e["extra_mib"]), runs if i == 0 else "",
            (_fmt_ms(paper) if paper and i == 0 else ""),
        )
        lines.append(" ".join(f"{c:{'<' if j < 3 else '>'}{w}s}" for j, (c, (_, w)) in enumerate(zip(cells, TABLE_COLUMNS))))
    return lines


def render_table(result):
    s = result["setup"]
    lines = [
        f"Scoring time per context (ms), one {s['context_tokens']}-token context against N cached "
        f"candidates; {s['config_name']} size ({s['config']['layers']} layers, d={s['config']['dim']}, "
        f"{s['config']['heads']} heads, FFN {s['config']['ffn']}), {s['torch_threads']} torch threads, "
        f"median of {s['repeats']} runs after {s['warmup']} warm-up.",
        f"Load average at start {s['loadavg_start']}, at end {s['loadavg_end']}, {s['cpu_count']} CPUs.",
        "",
    ]
    header = " ".join(f"{name:{'<' if j < 3 else '>'}{w}s}" for j, (name, w) in enumerate(TABLE_COLUMNS))
    lines += [header, "-" * len(header)] + [line for r in result["rows"] for line in _table_lines(r)]
    lines += [""] + _table_notes(result)
    lines += ["", "Targets (reported, not enforced):"]
    for name, r in result["ratios"].items():
        value = "-" if r["value"] is None else f"{r['value']:.3g}"
        verdict = {True: "meets", False: "misses", None: "n/a"}[r["meets_target"]]
        n = f" at N={r['n']:,}" if r.get("n") else ""
        lines.append(f"  {name:40s} {value:>8s}  target {r['target']:8s} {verdict:6s} {r['what']}{n}")
    return "\n".join(lines) + "\n"


def _table_notes(result):
    s, rows = result["setup"], result["rows"]
    notes = []
    cross = next((r for r in rows if r["model"] == "cross"), None)
    if cross:
        notes.append(f"* extrapolated linearly from {cross['measured_pairs']} measured pairs "
                     f"({s['context_tokens']}-token context + {s['cand_tokens']}-token candidate each).")
    mixed = next((r for r in rows if r["model"] == "cross-mixed"), None)
    if mixed:
        m = MIXED_LENGTHS
        notes.append(f"cross-mixed: {mixed['measured_pairs']} pairs of the {s['context_tokens']}-token context and a "
                     f"candidate of {m['low']}-{m['high']} tokens, log-normal like CCC test responses (median 18); "
                     "ParlAI pads every pair to the longest, ours sorts them by length (passes of 256).")
    for n, c in result.get("cascade", {}).items():
        hnsw = (f"; HNSW (M {c['hnsw_m']}, efConstruction {c['hnsw_ef_construction']}, efSearch "
                f"{c['hnsw_ef_search']}) built in {c['hnsw_build_s']:.1f} s, recall@{c['k']} {c['recall_at_k']:.3f} "
                f"against exact over {c['recall_queries']} queries") if "hnsw_build_s" in c else ""
        notes.append(f"cascade N={int(n):,}: bi top-{CASCADE['retrieve_top_k']} -> {CASCADE['poly']} -> cross top-"
                     f"{CASCADE['rerank_top_k']}, exact {_fmt_ms(c.get('exact_ms'))} ms, hnsw "
                     f"{_fmt_ms(c.get('hnsw_ms'))} ms per context{hnsw} (clustered candidates).")
        if "by_ef_search" in c:
            trade = ", ".join(f"{ef}: {v['recall']:.3f} in {v['search_ms']:.2f} ms" for ef, v in c["by_ef_search"].items())
            notes.append(f"  recall@{c['k']} by efSearch: {trade}")
    if any(r["reduced_runs"] and not r["extrapolated"] for r in rows):
        notes.append(f"! fewer runs than the {s['repeats']} asked: the cell's runs were cut to fit "
                     f"--cell-budget-s {s['cell_budget_s']:g} (at least 3).")
    notes.append(f"ours bf16 / int8: our bi and poly over a bfloat16 / int8 candidate store (--candidate-store-dtype), "
                 f"the top {RESCORE_TOP_K} rescored from the float32 encodings; every one of ours encodes the context "
                 "in float32 (bfloat16 encoding: below). encode / score: the run split in two (medians). MiB: peak "
                 "extra resident memory of the scoring step (see memory_method in results.json). paper: Table 5, "
                 "BERT-base size on a many-core CPU.")
    notes += _limit_notes(result)
    cal = result["memory_calibration_mib"]
    if cal["measured"] is not None:
        notes.append(f"Memory check: a {cal['allocated']} MiB tensor measures {cal['measured']:.0f} MiB.")
    return notes


def _limit_notes(result):
    """What the limit columns mean, the context encodings in float32 and bfloat16, the chunk sweep."""
    notes = []
    machine = result.get("machine")
    if machine:
        copy = machine["copy"]
        notes.append(
            f"limit: the larger of the bytes the scoring reads (stored vectors, int8 scales, the {RESCORE_TOP_K} "
            f"rescored float32 rows) at {copy['gb_s']:.1f} GB/s (a plain copy of {copy['mib']} MiB: bytes read plus "
            "written per second) and its FLOPs (2 N d m; bi m = 1) at the rate of a plain bfloat16 GEMM "
            f"[N, d] x [d, max(m, {GEMM_MIN_M})] timed here; xlimit: score ms / limit ms (1 is this machine's best)."
        )
        dim = result["setup"]["config"]["dim"]
        for dtype, key in (("bfloat16", "ms"), ("float32", "ms_float32"), ("int8", "ms_int8")):
            rates = ", ".join(f"{g['n']:,}x{g['m']}: {2 * g['n'] * dim * g['m'] / g[key] / 1e6:,.0f}"
                              for g in machine["gemm"].values() if key in g)
            if rates:
                notes.append(f"  {dtype} GEMM GFLOP/s by N x m: {rates}")
    encode = result.get("encode") or {}
    if encode:
        parts = ", ".join(f"{model} {e['float32']:.1f} / {e['bfloat16']:.1f}" for model, e in encode.items())
        notes.append(f"our context encoding, ms in float32 / bfloat16 (--precision bf16): {parts}.")
    sweep = result.get("chunk_sweep")
    if sweep:
        best = min(sweep["ms"], key=sweep["ms"].get)
        parts = ", ".join(f"{int(size):,}: {ms:.1f}" for size, ms in sorted(sweep["ms"].items(), key=lambda kv: int(kv[0])))
        notes.append(
            f"chunk sweep ({sweep['model']}, N={sweep['n']:,}, {sweep['store']} store, scoring ms by candidates per "
            f"chunk{'' if sweep['fused'] else ', unfused'}): {parts}; best {int(best):,}, the module's default "
            f"{sweep['default_chunk']:,}."
        )
    return notes


PLOT_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray", "black")


PLOT_STYLES = {"ours": ("-", "o"), "ours_bf16": (":", "^"), "ours_int8": ("-.", "v"), "parlai": ("--", "s")}


def render_plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colors = dict(zip(MODELS, PLOT_COLORS))
    for model in MODELS:
        rows = [r for r in result["rows"] if r["model"] == model]
        for impl, (style, marker) in PLOT_STYLES.items():
            points = [(r["n"], r["impls"][impl]["ms"], r["extrapolated"]) for r in rows if impl in r["impls"]]
            if not points:
                continue
            xs, ys, _ = zip(*points)
            ax.plot(xs, ys, style, color=colors[model], label=f"{model} ({IMPL_NAMES[impl]})")
            measured = [(x, y) for x, y, extrapolated in points if not extrapolated]
            extra = [(x, y) for x, y, extrapolated in points if extrapolated]
            if measured:
                ax.plot(*zip(*measured), marker, color=colors[model])
            if extra:
                ax.plot(*zip(*extra), marker, color=colors[model], markerfacecolor="none")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cached candidates N (cross: pairs scored)")
    ax.set_ylabel("ms per context")
    s = result["setup"]
    ax.set_title(f"Scoring one context against N candidates, {s['config_name']} size, "
                 f"{s['torch_threads']} threads\nours solid, ours bf16 dotted, ours int8 dash-dotted, ParlAI 1.7.2 dashed; "
                 "open markers: extrapolated", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    from parlai_poly.storage import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
