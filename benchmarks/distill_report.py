"""Distillation report: tables (JSON, markdown) and a PNG from the files the runs wrote.

    python -m benchmarks.distill_report --out DIR \\
        --teacher cross.json --labels-only poly=poly.json bi=bi.json \\
        --distilled poly:kl=poly_kl.json bi:kl=bi_kl.json \\
        --loop runs/transencoder/results.json

Supervised: each FILE is what `parlai eval_model ... --report-filename FILE` writes (or any
JSON with the metrics at the top, under "report" or under "metrics"). A distilled model's
NAME is ARCH or ARCH:VARIANT; it is compared with --labels-only ARCH (the same model trained
on labels only, at the same budget) and with the --teacher, and "gap closed" is
(distilled - labels only) / (teacher - labels only): 1 reaches the teacher, 0 gains nothing.

Unsupervised: --loop takes the results.json of `python -m parlai_poly.distill.transencoder`,
cycle by cycle, against cycle 0 (the zero-shot backbone).

Writes DIR/distill_report.{json,md,png}; --metric picks the metric (default R@1/20).
"""
import argparse
import json
import os
from typing import Dict, List, Optional, Tuple

from parlai_poly.errors import ParlaiPolyError
from parlai_poly.storage import atomic_write, atomic_write_text

GAP_TARGET = 0.5  # the target: distillation closes at least half of the gap


def read_metrics(path: str) -> Dict[str, float]:
    """The metrics of an eval_model report file, a zoo/loop entry, or a flat JSON dict."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ParlaiPolyError(f"{path}: cannot read a JSON report ({e})") from e
    for key in ("report", "metrics"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise ParlaiPolyError(f"{path}: expected a JSON object of metrics")
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}


def pick(metrics: Dict[str, float], metric: str, source: str) -> float:
    if metric not in metrics:
        have = ", ".join(sorted(k for k in metrics if k.startswith("R@"))) or "none"
        raise ParlaiPolyError(f"{source}: no {metric} (R@ metrics there: {have}); choose another --metric")
    return metrics[metric]


def named_files(items: List[str], option: str) -> List[Tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ParlaiPolyError(f"{option} {item}: expected NAME=FILE")
        pairs.append((name, path))
    return pairs


# ---- the two tables --------------------------------------------------------------------
def supervised_table(args) -> Optional[Dict]:
    if not args.distilled and not args.labels_only:
        return None
    metric = args.metric
    teacher = pick(read_metrics(args.teacher), metric, args.teacher) if args.teacher else None
    labels = {arch: pick(read_metrics(p), metric, p) for arch, p in named_files(args.labels_only, "--labels-only")}
    rows = []
    for name, path in named_files(args.distilled, "--distilled"):
        arch = name.split(":")[0]
        value = pick(read_metrics(path), metric, path)
        base = labels.get(arch)
        gap = None
        if base is not None and teacher is not None and teacher != base:
            gap = (value - base) / (teacher - base)
        rows.append(
            {
                "model": name,
                "arch": arch,
                "labels_only": base,
                "distilled": value,
                "teacher": teacher,
                "gap_closed": gap,
                "meets_target": None if gap is None else gap >= GAP_TARGET,
            }
        )
    return {"metric": metric, "teacher": teacher, "labels_only": labels, "rows": rows, "gap_target": GAP_TARGET}


def loop_table(path: str, metric: str) -> Dict:
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    cycles = results.get("cycles") or []
    if not cycles or cycles[0].get("cycle") != 0:
        raise ParlaiPolyError(f"{path}: no cycle 0 (the zero-shot backbone) recorded yet")
    series: Dict[str, Dict[int, float]] = {}
    for entry in cycles:
        for name, model in entry["models"].items():
            series.setdefault(name, {})[entry["cycle"]] = pick(model["metrics"], metric, f"{path} cycle {entry['cycle']} {name}")
    zero_shot = series["bi"][0]
    checks = {}
    for name, values in series.items():
        trained = {c: v for c, v in values.items() if c > 0}
        if not trained:
            continue
        first, last = min(trained), max(trained)
        checks[name] = {
            "beats_zero_shot_after_cycle_1": trained[1] > zero_shot if 1 in trained else None,
            "last_cycle": last,
            # after one trained cycle there is nothing yet to fall back from
            "holds_by_last_cycle": trained[last] >= trained[first] if last > first else None,
            "best_cycle": max(values, key=values.get),  # the bi-encoder's cycle 0 competes
        }
    return {
        "file": path,
        "metric": metric,
        "zero_shot": zero_shot,
        "series": {name: {str(c): v for c, v in sorted(vals.items())} for name, vals in series.items()},
        "checks": checks,
        "config": results.get("config", {}),
    }


# ---- rendering ------------------------------------------------------------------------
def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(report: Dict) -> str:
    lines = ["# Distillation report", ""]
    sup = report.get("supervised")
    if sup:
        m = sup["metric"]
        lines += [
            f"## Supervised distillation ({m})",
            "",
            f"Teacher: {fmt(sup['teacher'])}. Gap closed = (distilled - labels only) / (teacher - labels only); target >= {GAP_TARGET}.",
            "",
            "| model | labels only | distilled | teacher | gap closed | target met |",
            "|---|---|---|---|---|---|",
        ]
        for r in sup["rows"]:
            lines.append(
                f"| {r['model']} | {fmt(r['labels_only'])} | {fmt(r['distilled'])} | {fmt(r['teacher'])} "
                f"| {fmt(r['gap_closed'])} | {fmt(r['meets_target'])} |"
            )
        lines.append("")
    for loop in report.get("loops", []):
        m = loop["metric"]
        names = list(loop["series"])
        cycles = sorted({int(c) for vals in loop["series"].values() for c in vals})
        lines += [
            f"## Unsupervised Trans-Encoder loop ({m}): {loop['file']}",
            "",
            f"Zero-shot backbone (cycle 0 bi): {fmt(loop['zero_shot'])}.",
            "",
            "| cycle | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for c in cycles:
            cells = [fmt(loop["series"][n].get(str(c))) for n in names]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines += ["", "| model | beats zero-shot after cycle 1 | holds by last cycle | best cycle |", "|---|---|---|---|"]
        for name, c in loop["checks"].items():
            lines.append(
                f"| {name} | {fmt(c['beats_zero_shot_after_cycle_1'])} | {fmt(c['holds_by_last_cycle'])} "
                f"(cycle {c['last_cycle']}) | {c['best_cycle']} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(report: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (["supervised"] if report.get("supervised") else []) + ["loop"] * len(report.get("loops", []))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    loops = iter(report.get("loops", []))
    for ax, panel in zip(axes[0], panels):
        if panel == "supervised":
            plot_supervised(ax, report["supervised"])
        else:
            plot_loop(ax, next(loops))
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_supervised(ax, sup: Dict) -> None:
    archs = list(dict.fromkeys([*sup["labels_only"], *(r["arch"] for r in sup["rows"])]))
    bars = []  # (x, height, label, colour)
    x = 0
    ticks = []
    for arch in archs:
        start = x
        if arch in sup["labels_only"]:
            bars.append((x, sup["labels_only"][arch], "labels only", "tab:gray"))
            x += 1
        for r in (r for r in sup["rows"] if r["arch"] == arch):
            bars.append((x, r["distilled"], r["model"].partition(":")[2] or "distilled", "tab:blue"))
            x += 1
        ticks.append(((start + x - 1) / 2, arch))
        x += 0.6
    for bx, height, label, colour in bars:
        ax.bar(bx, height, color=colour, width=0.8)
        ax.text(bx, height, f"{height:.3f}\n{label}", ha="center", va="bottom", fontsize=7)
    if sup["teacher"] is not None:
        ax.axhline(sup["teacher"], color="tab:red", linestyle="--", label=f"cross teacher {sup['teacher']:.3f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks([t for t, _ in ticks], [a for _, a in ticks])
    ax.set_ylabel(sup["metric"])
    ax.set_title("Supervised distillation: labels only vs distilled", fontsize=10)
    ax.margins(y=0.2)


def plot_loop(ax, loop: Dict) -> None:
    for name, values in loop["series"].items():
        cycles = sorted(int(c) for c in values)
        ax.plot(cycles, [values[str(c)] for c in cycles], marker="o", label=name)
    ax.axhline(loop["zero_shot"], color="tab:gray", linestyle="--", label=f"zero-shot {loop['zero_shot']:.3f}")
    ax.set_xlabel("cycle (0: zero-shot backbone)")
    ax.set_ylabel(loop["metric"])
    # several runs side by side: each panel names its run's folder
    run = os.path.basename(os.path.dirname(os.path.abspath(loop["file"])))
    ax.set_title(f"Unsupervised Trans-Encoder loop: {run}", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


# ---- command line ------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.distill_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder for distill_report.{json,md,png}")
    p.add_argument("--metric", default="R@1/20")
    p.add_argument("--teacher", help="eval report of the cross-encoder teacher")
    p.add_argument("--labels-only", nargs="*", default=[], metavar="ARCH=FILE", help="eval reports of models trained on labels only")
    p.add_argument("--distilled", nargs="*", default=[], metavar="ARCH[:VARIANT]=FILE", help="eval reports of distilled models")
    p.add_argument("--loop", nargs="*", default=[], metavar="RESULTS", help="results.json of Trans-Encoder runs")
    args = p.parse_args(argv)
    if not (args.distilled or args.labels_only or args.loop):
        p.error("nothing to report: give --distilled/--labels-only and/or --loop")
    return args


def build_report(args) -> Dict:
    report = {"metric": args.metric}
    sup = supervised_table(args)
    if sup:
        report["supervised"] = sup
    report["loops"] = [loop_table(path, args.metric) for path in args.loop]
    return report


def main(argv=None) -> Dict:
    from parlai_poly.errors import report_bad_input_on_exit

    report_bad_input_on_exit()
    args = parse_args(argv)
    report = build_report(args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "distill_report")
    atomic_write_text(stem + ".json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    atomic_write_text(stem + ".md", text)
    plot(report, stem + ".png")
    print(text)
    print(f"Wrote {stem}.json, {stem}.md and {stem}.png")
    return report


if __name__ == "__main__":
    main()
