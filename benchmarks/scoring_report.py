"""The scoring benchmark's results: rows per (model, N), the ratios its targets read, the table
and the figure; pure functions of what the harness (``scoring_speed``) measured."""
from benchmarks.scoring_constants import (
    BF16_RESCORE_TOP_K, CASCADE, IMPL_NAMES, IMPLS, MILLION, MIXED_LENGTHS, MODELS, PAPER_CPU_MS,
)


def build_rows(timed, memory, sizes):
    """One row per (model, N): cached models as measured, cross extrapolated from its pairs,
    cross-mixed as measured (its point is the padding of those very pairs)."""
    rows = []
    extra = {(c["model"], c["n"]): c["impls"] for c in memory["cells"]}
    for cell in timed["cells"]:
        mem = extra.get((cell["model"], cell["n"]), {})
        impls = {
            name: {"ms": e["ms"], "extra_mib": mem.get(name, {}).get("extra_mib"), "runs_ms": e["runs_ms"]}
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
        ours, parlai = row["impls"]["ours"]["ms"], row["impls"].get("parlai", {}).get("ms")
        row["speedup_parlai_over_ours"] = parlai / ours if parlai else None
        bf16 = row["impls"].get("ours_bf16", {}).get("ms")
        row["speedup_parlai_over_ours_bf16"] = parlai / bf16 if parlai and bf16 else None
        row["paper_cpu_ms_bert_base"] = PAPER_CPU_MS.get(row["model"], {}).get(row["n"])
    order = {m: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (order[r["model"]], r["n"]))
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
    """The figures the issue sets targets for (reported, never asserted)."""
    ref_n = 100000 if 100000 in sizes else max(sizes)
    ratios = {}
    poly64, bi = _find(rows, "poly-64", ref_n), _find(rows, "bi", ref_n)

    def ms(row, impl):
        return row and row["impls"].get(impl, {}).get("ms")

    for impl, suffix, label in (("ours", "", "ours"), ("ours_bf16", "_bf16", "ours with --score-dtype bfloat16")):
        ratios[f"poly64_speed_parlai_over_ours{suffix}"] = _ratio(
            ms(poly64, "parlai") and ms(poly64, impl) and ms(poly64, "parlai") / ms(poly64, impl), 3, ">=", n=ref_n,
            what=f"ParlAI's ms per context / {label}, poly-64",
        )
        ratios[f"poly64{suffix}_over_bi_ours"] = _ratio(
            ms(poly64, impl) and ms(bi, "ours") and ms(poly64, impl) / ms(bi, "ours"), 2, "<=", n=ref_n,
            what=f"poly-64 ({label}) ms per context / our bi-encoder's",
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
    at_1m = {
        f"{r['model']} {impl}": e["extra_mib"] / 1024
        for r in rows
        if r["n"] == MILLION
        for impl, e in r["impls"].items()
        if impl != "parlai" and e.get("extra_mib") is not None
    }
    ratios["ours_extra_memory_1m_gib"] = _ratio(
        max(at_1m.values()) if at_1m else None, 2, "<=", n=MILLION, per_model=at_1m,
        what="our peak extra memory of scoring 1M cached candidates, GiB (the worst of bi/poly)"
        + ("" if at_1m else "; not measured: run with --include-1m"),
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


def _table_row(r):
    mark = "*" if r["extrapolated"] else " "
    runs = "-" if r["extrapolated"] else f"{r['runs']}{'!' if r['reduced_runs'] else ''}"
    paper = r["paper_cpu_ms_bert_base"]
    impls = r["impls"]
    ms = {name: _fmt_ms(impls[name]["ms"]) + mark if name in impls else "-" for name in IMPLS}
    mib = {name: _fmt_mib(impls[name]["extra_mib"]) if name in impls else "-" for name in IMPLS}
    return (
        f"{r['model']:13s} {r['n']:>10,} {ms['ours']:>10s} {ms['ours_bf16']:>10s} {ms['parlai']:>10s} "
        f"{_fmt_ratio(r['speedup_parlai_over_ours']):>11s} {_fmt_ratio(r['speedup_parlai_over_ours_bf16']):>11s} "
        f"{mib['ours']:>9s} {mib['ours_bf16']:>9s} {mib['parlai']:>10s} {runs:>5s}  "
        f"{_fmt_ms(paper) if paper else '':>12s}"
    )


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
    header = (f"{'model':13s} {'N':>10s} {'ours ms':>10s} {'bf16 ms':>10s} {'ParlAI ms':>10s} {'ParlAI/ours':>11s} "
              f"{'ParlAI/bf16':>11s} {'ours MiB':>9s} {'bf16 MiB':>9s} {'ParlAI MiB':>10s} {'runs':>5s}  "
              f"{'paper CPU ms':>12s}")
    lines += [header, "-" * len(header)] + [_table_row(r) for r in result["rows"]]
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
    notes.append(f"bf16: our poly-encoder with --score-dtype bfloat16 (products in bfloat16, the top "
                 f"{BF16_RESCORE_TOP_K} rescored in float32). MiB: peak extra resident memory of the scoring step "
                 "(see memory_method in results.json). paper: Table 5, BERT-base size on a many-core CPU.")
    cal = result["memory_calibration_mib"]
    if cal["measured"] is not None:
        notes.append(f"Memory check: a {cal['allocated']} MiB tensor measures {cal['measured']:.0f} MiB.")
    return notes


PLOT_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray", "black")


PLOT_STYLES = {"ours": ("-", "o"), "ours_bf16": (":", "^"), "parlai": ("--", "s")}


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
                 f"{s['torch_threads']} threads\nours solid, ours bf16 dotted, ParlAI 1.7.2 dashed; "
                 "open markers: extrapolated", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    from parlai_poly.storage import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
