"""The table of benchmarks/codes_variants.sh: codes' diversity over training, and valid
R@1/20 and MRR of each variant paired against the bi-encoder trained alike.

    python benchmarks/codes_report.py [OUT] [--docs docs/codes_variants]

Diversity (codes_cos: mean cosine between the m context vectors, 1 = a bi-encoder;
codes_entropy: the codes' attention entropy over the context, 1 = uniform) is read at:
0, before training, on 256 valid examples; 100 and 350, the mean over the train batches of
updates 51-100 and 301-350 (ParlAI's train log); end (400), on the valid sample of the table.
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from parlai_poly.storage import atomic_write_text  # noqa: E402
from parlai_poly.stats import format_interval, paired_bootstrap  # noqa: E402

BASELINE = "bi"
WINDOWS = (100, 350)  # ParlAI logs every 50 updates; the run ends at 400 without a log


def train_log_stats(folder):
    """{updates: {codes_cos, codes_entropy, exps, tps}} from the JSON reports of train*.log."""
    stats = {}
    for path in sorted(glob.glob(os.path.join(folder, "train*.log"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("{") and "total_train_updates" in line and "mean_loss" in line:
                    report = json.loads(line)
                    stats[int(report["total_train_updates"])] = report
    return stats


def per_example(folder):
    """The per-example values parlai_poly.evaluate --out wrote for the variant's model."""
    (path,) = glob.glob(os.path.join(folder, "*__model.jsonl"))
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def variant_row(out, name, base_rows):
    folder = os.path.join(out, name)
    summary = json.load(open(os.path.join(folder, "summary.json")))
    entry = next(iter(summary["models"].values()))
    rows = per_example(folder)
    conversations = [r["conversation"] for r in rows]
    row = {"variant": name, "examples": summary["examples"], "conversations": summary["conversations"]}
    for metric in ("R@1/20", "mrr"):
        row[metric] = entry[metric]
        if name != BASELINE:
            row[f"{metric} - bi"] = paired_bootstrap(
                [r[metric] for r in rows], [r[metric] for r in base_rows], conversations
            )
    logs = train_log_stats(folder)
    init_path = os.path.join(folder, "init", "summary.json")
    if os.path.exists(init_path):
        init = next(iter(json.load(open(init_path))["models"].values()))
        row["diversity"] = {"0": {k: init[k]["mean"] for k in ("codes_cos", "codes_entropy") if k in init}}
        for updates in WINDOWS:
            report = logs.get(updates, {})
            row["diversity"][str(updates)] = {k: report[k] for k in ("codes_cos", "codes_entropy") if k in report}
        row["diversity"]["end"] = {k: entry[k]["mean"] for k in ("codes_cos", "codes_entropy") if k in entry}
    return row


def cell(stats, key):
    value = stats.get(key)
    return "-" if value is None else f"{value:.3f}"


def render(rows):
    lines = [
        "| variant | codes_cos 0 / 100 / 350 / end (400) | codes_entropy 0 / 100 / 350 / end (400) | R@1/20 | MRR | R@1/20 - bi (paired) | MRR - bi (paired) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        diversity = row.get("diversity", {})
        points = ("0",) + tuple(str(w) for w in WINDOWS) + ("end",)
        cos = " / ".join(cell(diversity.get(p, {}), "codes_cos") for p in points) if diversity else "-"
        entropy = " / ".join(cell(diversity.get(p, {}), "codes_entropy") for p in points) if diversity else "-"
        diffs = [format_interval(row[k], signed=True) if k in row else "-" for k in ("R@1/20 - bi", "mrr - bi")]
        lines.append(
            f"| {row['variant']} | {cos} | {entropy} | {format_interval(row['R@1/20'])} | "
            f"{format_interval(row['mrr'])} | {diffs[0]} | {diffs[1]} |"
        )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    poly = [r for r in rows if "R@1/20 - bi" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, row in enumerate(poly):
        d = row["R@1/20 - bi"]
        left.errorbar(d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", capsize=3)
    left.axvline(0, color="gray", lw=1)
    left.set_yticks(range(len(poly)), [r["variant"] for r in poly])
    left.set_xlabel("valid R@1/20 minus bi-encoder (paired, 95% CI)")
    for row in poly:
        diversity = row.get("diversity", {})
        points = ["0"] + [str(w) for w in WINDOWS] + ["end"]
        values = [diversity.get(p, {}).get("codes_cos") for p in points]
        right.plot(range(len(points)), [float("nan") if v is None else v for v in values], marker="o", label=row["variant"])
    right.set_xticks(range(len(WINDOWS) + 2), ["0"] + [str(w) for w in WINDOWS] + ["end (valid)"])
    right.set_xlabel("updates")
    right.set_ylabel("mean cosine between context vectors (1 = bi-encoder)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="runs/codes_variants")
    parser.add_argument("--docs", default="docs/codes_variants", help="where table.md, results.json and the PNG go")
    args = parser.parse_args(argv)
    names = sorted(
        (os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(args.out, "*", "summary.json"))),
        key=lambda n: (n != BASELINE, n),
    )
    if BASELINE not in names:
        raise SystemExit(f"{args.out}/{BASELINE}/summary.json is missing: the variants are paired against it")
    base_rows = per_example(os.path.join(args.out, BASELINE))
    rows = [variant_row(args.out, name, base_rows) for name in names]
    table = render(rows)
    os.makedirs(args.docs, exist_ok=True)
    atomic_write_text(os.path.join(args.docs, "table.md"), table + "\n")
    atomic_write_text(os.path.join(args.docs, "results.json"), json.dumps(rows, indent=1) + "\n")
    plot(rows, os.path.join(args.docs, "codes_variants.png"))
    print(table)


if __name__ == "__main__":
    main()
