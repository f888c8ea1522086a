"""The zoo's results table: every installed CCC entry, and the peers, on the same examples.

    python benchmarks/zoo_table.py [--datapath data] [--sample 2000] \\
        [--peer st_bi=runs/peer/eval/st_bi.jsonl ...] [--out docs/zoo]

Two evaluations, each model paired with ``ccc_bi`` on the same examples:
1. the whole CCC test (13,331 examples in 396 conversations): the per-example values each
   bi- or poly-encoder entry's build kept beside the model (``evaluation.jsonl``);
2. --sample test examples drawn over all test conversations (the teacher's
   ``--ccc-eval-sample``, seed 0), on which every installed entry is evaluated (the
   cross-encoder is evaluated only there: it scores every pair), and each ``--peer`` file of
   per-example values on the same sample (``benchmarks/st_peer.py evaluate``).
Per model: R@1/20, R@5/20 and MRR with 95% intervals from a bootstrap over conversations, the
paired R@1/20 and MRR differences from ccc_bi with theirs, and what its training cost (minutes
here, updates, examples seen; ``python -m parlai_poly.zoo build`` records them). Writes
results.json and results.md to --out and prints the tables. The sample's per-example values
are cached under --out/sample/ (delete one to evaluate that entry again).
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from parlai_poly import evaluate  # noqa: E402
from parlai_poly.stats import DEFAULT_RESAMPLES  # noqa: E402
from parlai_poly.storage import atomic_write_text  # noqa: E402
from parlai_poly.zoo import recipe, registry  # noqa: E402

BASE = "ccc_bi"
TASK = "parlai_poly.tasks.ccc"
METRICS = ("R@1/20", "R@5/20", "mrr")
TRAIN_EXAMPLES = 103676  # CCC train: an epoch


def installed_entries(datapath: str):
    """{name: (card, install dir)} of the CCC entries built here, ccc_bi first."""
    found = {}
    for name, card in sorted(registry.entries().items(), key=lambda item: (item[0] != BASE, item[0])):
        target = registry.install_dir(datapath, name)
        if name.startswith("ccc_") and recipe.is_installed(target):
            found[name] = (card, target)
    return found


def read_rows(path: str):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sample_rows(name: str, target: str, args):
    """An entry's per-example values on the sample, evaluated once and cached."""
    path = os.path.join(args.out, "sample", f"{name}.jsonl")
    if not os.path.isfile(path):
        setup = SimpleNamespace(task=TASK, datatype="test", datapath=args.datapath, batchsize=32)
        sample = ["--ccc-eval-sample", str(args.sample), "--ccc-eval-seed", "0"]
        rows = evaluate.evaluate_model(os.path.join(target, "model"), setup, sample)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return read_rows(path)


def training(target: str):
    """(minutes, updates, examples seen) of an installed entry's training, as recorded."""
    with open(os.path.join(target, recipe.MARKER), encoding="utf-8") as f:
        record = json.load(f)
    options = record.get("train_options") or {}
    epochs = record.get("epochs", options.get("num_epochs"))
    examples = round(epochs * TRAIN_EXAMPLES) if epochs else None
    return {"minutes": round(record.get("train_seconds", 0) / 60), "updates": record.get("updates"), "examples": examples}


def table(summary, costs) -> str:
    cell = lambda v: f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"  # noqa: E731
    diff = lambda v: f"{v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"  # noqa: E731
    lines = [
        "| model | R@1/20 | R@5/20 | MRR | R@1/20 - ccc_bi | MRR - ccc_bi | minutes | updates | examples seen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["models"].items():
        cost = costs.get(name, {})
        paired = [diff(entry[f"{m} - {BASE}"]) if name != BASE else "-" for m in ("R@1/20", "mrr")]
        counts = [f"{cost[k]:,}" if cost.get(k) is not None else "-" for k in ("minutes", "updates", "examples")]
        lines.append(f"| {name} | " + " | ".join([cell(entry[m]) for m in METRICS] + paired + counts) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datapath", default="data")
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--peer", action="append", default=[], help="NAME=FILE.jsonl of per-example values on the sample")
    parser.add_argument("--out", default="docs/zoo")
    args = parser.parse_args(argv)
    entries = installed_entries(args.datapath)
    if BASE not in entries:
        raise SystemExit(f"{BASE} is not installed in {args.datapath}: python -m parlai_poly.zoo build {BASE} -dp {args.datapath}")
    costs = {name: training(target) for name, (_, target) in entries.items()}
    whole = {
        name: read_rows(os.path.join(target, recipe.EVALUATION_ROWS))
        for name, (card, target) in entries.items()
        if card.agent != "cross" and "ccc_eval_sample" not in (card.evaluation or {})
    }
    sampled = {name: sample_rows(name, target, args) for name, (_, target) in entries.items()}
    for peer in args.peer:
        name, path = peer.split("=", 1)
        sampled[name] = read_rows(path)
    results = {}
    for title, rows in (("whole CCC test", whole), (f"{args.sample:,} CCC test examples over all conversations", sampled)):
        summary = evaluate.summarize(list(rows), rows, DEFAULT_RESAMPLES, 0)
        results[title] = {"summary": summary, "table": table(summary, costs)}
        print(f"\n{title}: {summary['examples']:,} examples in {summary['conversations']} conversations\n{results[title]['table']}")
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps({"costs": costs, **results}, indent=1) + "\n")
    markdown = "".join(f"### {title}\n\n{r['table']}\n\n" for title, r in results.items())
    atomic_write_text(os.path.join(args.out, "results.md"), markdown)


if __name__ == "__main__":
    main()
