"""The zoo's results table: every installed CCC entry, and the peers, on the same examples.

    python benchmarks/zoo_table.py [--datapath data] [--sample 2000] \\
        [--peer st_bi=runs/peer/eval/st_bi.jsonl ...] [--seed-datapath 2=data_seed2 ...] \\
        [--seed-values ccc_bi:2=docs/zoo/seeds/ccc_bi_seed2.jsonl ...] [--seeds-only] [--seeds-note TEXT] \\
        [--archived ccc_poly16=docs/zoo/ccc_poly16/evaluation_2026-12-05_bf16_full.jsonl ...] [--out docs/zoo]

Two evaluations, each model paired with ``ccc_bi`` on the same examples:
1. the whole CCC test (13,331 examples in 396 conversations): the per-example values each
   bi- or poly-encoder entry's build kept beside the model (``evaluation.jsonl``);
2. --sample test examples drawn over all test conversations (the teacher's
   ``--ccc-eval-sample``, seed 0), on which every installed entry is evaluated (the
   cross-encoder is evaluated only there: it scores every pair), and each ``--peer`` file of
   per-example values on the same sample (``benchmarks/st_peer.py evaluate``).
Per model: R@1/20, R@5/20 and MRR with 95% intervals from a bootstrap over conversations, the
paired R@1/20 and MRR differences from ccc_bi with theirs, the paired R@1/20 difference from the
zero-shot backbone (``minilm``, when installed), and what its training cost (minutes here,
updates, examples seen; ``python -m parlai_poly.zoo build`` records them; a peer's from the
``.trained.json`` that ``st_peer.py evaluate`` writes beside its values). Each --seed-datapath
S=PATH holds the same entries built with ``--seed S``: their whole-test R@1/20 by seed, mean
and spread, beside the main datapath's (seed 1); each --seed-values ENTRY:S=FILE adds a seed
build's archived per-example values (``docs/zoo/seeds/``), whose install is gone. An entry
built with the same seeds as ccc_bi is also paired with it on the seeds' mean: each example's
R@1/20 averaged over the seeds, then the conversation bootstrap of the difference. Writes
results.json and results.md to --out and prints the tables. --seeds-only rewrites just the
seeds table there (from --seed-values and --seed-datapath) and keeps the entries' tables as
they are: for a machine where the entries are not installed. Each --archived NAME[=WHOLE.jsonl]
puts in the tables an entry built on another machine, from its kept values (its sample values
cached in --out/sample/, its whole-test values in WHOLE.jsonl) and the costs --out's results
recorded, so that one rebuilt entry can be paired with the others' builds. The sample's per-example values
are cached under --out/sample/ (delete one to evaluate that entry again).
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from parlai_poly import evaluate  # noqa: E402
from parlai_poly.stats import DEFAULT_RESAMPLES, format_interval, paired_bootstrap  # noqa: E402
from parlai_poly.storage import atomic_write_text  # noqa: E402
from parlai_poly.zoo import recipe, registry  # noqa: E402

BASE = "ccc_bi"
MINUTES_NOTE = (
    "minutes: our entries', the build's training wall clock (ParlAI's train time: validations "
    "included, and any other work that shared the cores); a peer's, its CPU time over its threads."
)
ZERO_SHOT = "minilm"  # the backbone untrained on dialogue: the floor every fine-tuned entry must clear
TASK = "parlai_poly.tasks.ccc"
METRICS = ("R@1/20", "R@5/20", "mrr")
TRAIN_EXAMPLES = 103676  # CCC train: an epoch


def table_order(name: str):
    """ccc_bi first, the zero-shot backbone last, the others by name between."""
    return (name != BASE, name == ZERO_SHOT, name)


def installed_entries(datapath: str):
    """{name: (card, install dir)} of the CCC entries built here (ccc_bi first) and the
    zero-shot backbone's, last."""
    found = {}
    for name, card in sorted(registry.entries().items(), key=lambda item: table_order(item[0])):
        target = registry.install_dir(datapath, name)
        if (name.startswith("ccc_") or name == ZERO_SHOT) and recipe.is_installed(target):
            found[name] = (card, target)
    return found


def sample_rows(name: str, card, target: str, args):
    """An entry's per-example values on the sample: its build's own when it was evaluated on
    this sample (the cross-encoder), else evaluated once and cached."""
    evaluation = card.evaluation or {}
    if evaluation.get("ccc_eval_sample") == args.sample and evaluation.get("ccc_eval_seed", 0) == 0:
        return evaluate.read_example_rows(os.path.join(target, recipe.EVALUATION_ROWS))
    path = os.path.join(args.out, "sample", f"{name}.jsonl")
    if not os.path.isfile(path):
        setup = SimpleNamespace(task=TASK, datatype="test", datapath=args.datapath, batchsize=32)
        sample = ["--ccc-eval-sample", str(args.sample), "--ccc-eval-seed", "0"]
        rows = evaluate.evaluate_model(os.path.join(target, "model"), setup, sample)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return evaluate.read_example_rows(path)


def built_seed(card, target: str):
    """The seed an installed entry was trained with: its build's --seed, else its recipe's."""
    with open(os.path.join(target, recipe.MARKER), encoding="utf-8") as f:
        seed = json.load(f).get("seed")
    return seed if seed is not None else (card.recipe.get("train") or {}).get("seed")


def training(target: str):
    """(minutes, updates, examples seen) of an installed entry's training, as recorded."""
    with open(os.path.join(target, recipe.MARKER), encoding="utf-8") as f:
        record = json.load(f)
    options = record.get("train_options") or {}
    epochs = record.get("epochs", options.get("num_epochs"))
    examples = round(epochs * TRAIN_EXAMPLES) if epochs else None
    return {"minutes": round(record.get("train_seconds", 0) / 60), "updates": record.get("updates"), "examples": examples}


def peer_cost(path: str):
    """(minutes, updates, examples seen) of a peer, from the record beside its values."""
    record = path[: -len(".jsonl")] + ".trained.json"
    if not os.path.isfile(record):
        return {}
    with open(record, encoding="utf-8") as f:
        trained = json.load(f)
    return {"minutes": round(trained["minutes"]), "updates": trained["updates"], "examples": trained["examples_seen"]}


def above_zero_shot(rows):
    """{name: paired R@1/20 difference from the zero-shot backbone} on the same examples."""
    if ZERO_SHOT not in rows:
        return {}
    conversations = [r["conversation"] for r in rows[ZERO_SHOT]]
    base = [r["R@1/20"] for r in rows[ZERO_SHOT]]
    return {
        name: paired_bootstrap([r["R@1/20"] for r in values], base, conversations, resamples=DEFAULT_RESAMPLES, seed=0)
        for name, values in rows.items()
        if name != ZERO_SHOT
    }


def table(summary, costs, zero_shot) -> str:
    cell = lambda v: f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"  # noqa: E731
    diff = lambda v: f"{v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"  # noqa: E731
    lines = [
        "| model | R@1/20 | R@5/20 | MRR | R@1/20 - ccc_bi | MRR - ccc_bi | R@1/20 - zero-shot | minutes | updates | examples seen |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["models"].items():
        cost = costs.get(name, {})
        paired = [diff(entry[f"{m} - {BASE}"]) if name != BASE else "-" for m in ("R@1/20", "mrr")]
        paired.append(diff(zero_shot[name]) if name in zero_shot else "-")
        counts = [f"{cost[k]:,}" if cost.get(k) is not None else "-" for k in ("minutes", "updates", "examples")]
        lines.append(f"| {name} | " + " | ".join([cell(entry[m]) for m in METRICS] + paired + counts) + " |")
    return "\n".join(lines)


def seeds_table(whole, seed_datapaths, seed_values=()):
    """Whole-test R@1/20 of each entry by seed (1: the main datapath's), mean and spread."""
    by_seed = {name: {1: rows} for name, rows in whole.items() if name != ZERO_SHOT}
    for seed, datapath in seed_datapaths:
        for name, (card, target) in installed_entries(datapath).items():
            if name == ZERO_SHOT or card.agent == "cross":  # no seeds: untrained, or sample-only
                continue
            if built_seed(card, target) != seed:  # e.g. built there as another entry's dependency
                print(f"{target}: built with seed {built_seed(card, target)}, not {seed}: left out")
                continue
            by_seed.setdefault(name, {})[seed] = evaluate.read_example_rows(os.path.join(target, recipe.EVALUATION_ROWS))
    for name, seed, path in seed_values:
        by_seed.setdefault(name, {})[seed] = evaluate.read_example_rows(path)
    seeds = sorted({seed for runs in by_seed.values() for seed in runs})
    header = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| entry | {header} | mean | spread (max - min) | mean - {BASE}, paired |", "|---" * (len(seeds) + 4) + "|"]
    figures = {}
    for name, runs in by_seed.items():
        if len(runs) < 2:
            continue
        r1 = {seed: sum(r["R@1/20"] for r in rows) / len(rows) for seed, rows in runs.items()}
        mean = sum(r1.values()) / len(r1)
        figures[name] = {"by_seed": r1, "mean": mean, "spread": max(r1.values()) - min(r1.values())}
        paired = "-"
        if name != BASE and set(runs) == set(by_seed.get(BASE, {})):
            figures[name][f"mean - {BASE}"] = seed_mean_difference(runs, by_seed[BASE], name)
            paired = format_interval(figures[name][f"mean - {BASE}"], signed=True)
        cells = [f"{r1[s]:.3f}" if s in r1 else "-" for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} | {figures[name]['spread']:.3f} | {paired} |")
    return figures, "\n".join(lines)


def seed_mean_difference(runs, base_runs, name):
    """R@1/20 of `name` minus BASE's, each example's value averaged over the same seeds first, with
    the conversation bootstrap's interval: the seeds' mean lead, which one seed's noise hides."""
    conversations = None
    means = []
    for entry, by_seed in ((name, runs), (BASE, base_runs)):
        for seed, rows in by_seed.items():
            if conversations is None:
                conversations = [r["conversation"] for r in rows]
            elif [r["conversation"] for r in rows] != conversations:
                raise SystemExit(f"{entry} seed {seed}: its values are not on the same test examples, in the same order, as the other seeds'; give each seed's whole-test evaluation.jsonl")
        means.append(np.mean([[r["R@1/20"] for r in rows] for rows in by_seed.values()], axis=0))
    return paired_bootstrap(means[0], means[1], conversations, resamples=DEFAULT_RESAMPLES, seed=0)


SEEDS = "seeds (whole CCC test, R@1/20)"


def entry_tables(args):
    """(costs, whole-test rows, the results' entry tables) of the entries installed in --datapath."""
    entries = installed_entries(args.datapath)
    if BASE not in entries:
        raise SystemExit(f"{BASE} is not installed in {args.datapath}: python -m parlai_poly.zoo build {BASE} -dp {args.datapath}")
    costs = {name: training(target) for name, (_, target) in entries.items()}
    whole = {
        name: evaluate.read_example_rows(os.path.join(target, recipe.EVALUATION_ROWS))
        for name, (card, target) in entries.items()
        if card.agent != "cross" and "ccc_eval_sample" not in (card.evaluation or {})
    }
    sampled = {name: sample_rows(name, card, target, args) for name, (card, target) in entries.items()}
    archived_costs, archived_whole, archived_sample = archived_entries(args, entries)
    costs.update(archived_costs)
    whole = {name: whole.get(name) or archived_whole[name] for name in sorted({**whole, **archived_whole}, key=table_order)}
    sampled = {name: sampled.get(name) or archived_sample[name] for name in sorted({**sampled, **archived_sample}, key=table_order)}
    for peer in args.peer:
        name, path = peer.split("=", 1)
        sampled[name] = evaluate.read_example_rows(path)
        costs[name] = peer_cost(path)
    results = {}
    for title, rows in (("whole CCC test", whole), (f"{args.sample:,} CCC test examples over all conversations", sampled)):
        summary = evaluate.summarize(list(rows), rows, DEFAULT_RESAMPLES, 0)
        zero_shot = above_zero_shot(rows)
        results[title] = {"summary": summary, "above_zero_shot": zero_shot, "table": table(summary, costs, zero_shot)}
        print(f"\n{title}: {summary['examples']:,} examples in {summary['conversations']} conversations\n{results[title]['table']}")
    return costs, whole, results


def archived_entries(args, installed):
    """(costs, whole-test rows, sample rows) of each --archived NAME[=WHOLE.jsonl]: an entry
    built on another machine, whose values the repository keeps (the sample's in --out/sample/,
    the whole test's in WHOLE.jsonl) and whose costs --out's results.json recorded."""
    costs, whole, sampled = {}, {}, {}
    previous_costs = previous_tables(args.out)[0] if args.archived else {}
    for item in args.archived:
        name, _, path = item.partition("=")
        if name in installed:
            raise SystemExit(f"--archived {name}: it is installed in {args.datapath}, whose values the table reads")
        cached = os.path.join(args.out, "sample", f"{name}.jsonl")
        if not os.path.isfile(cached):
            raise SystemExit(f"--archived {name}: no sample values at {cached}; evaluate it on the sample there first")
        sampled[name] = evaluate.read_example_rows(cached)
        if path:
            whole[name] = evaluate.read_example_rows(path)
        costs[name] = previous_costs.get(name, {})
    return costs, whole, sampled


def previous_tables(out: str):
    """(costs, results) of --out's results.json: the entry tables --seeds-only keeps, the costs
    --archived entries take."""
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: --seeds-only and --archived read what a run with the entries installed wrote there")
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    costs = previous.pop("costs", {})
    previous.pop(SEEDS, None)
    return costs, previous


def parse_seed_values(items):
    """ENTRY:S=FILE -> (entry, seed, file)."""
    parsed = []
    for item in items:
        key, _, path = item.partition("=")
        name, _, seed = key.partition(":")
        if not (path and seed.isdigit()):
            raise SystemExit(f"--seed-values {item}: expected ENTRY:SEED=FILE.jsonl, e.g. ccc_bi:2=docs/zoo/seeds/ccc_bi_seed2.jsonl")
        parsed.append((name, int(seed), path))
    return parsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datapath", default="data")
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--peer", action="append", default=[], help="NAME=FILE.jsonl of per-example values on the sample")
    parser.add_argument("--seed-datapath", action="append", default=[], help="S=PATH: the entries built with --seed S")
    parser.add_argument("--seed-values", action="append", default=[], help="ENTRY:S=FILE.jsonl: a seed build's archived whole-test values")
    parser.add_argument("--archived", action="append", default=[], help="NAME[=WHOLE.jsonl]: an entry not installed here, from its kept values")
    parser.add_argument("--seeds-only", action="store_true", help="rewrite only the seeds table of --out's results")
    parser.add_argument("--seeds-note", default="", help="a line under the seeds table's title (e.g. the recipe they were built on)")
    parser.add_argument("--out", default="docs/zoo")
    args = parser.parse_args(argv)
    if args.seeds_only:
        (costs, results), whole = previous_tables(args.out), {}
    else:
        costs, whole, results = entry_tables(args)
    seed_datapaths = [(int(seed), path) for seed, path in (item.split("=", 1) for item in args.seed_datapath)]
    seeds, seeds_md = seeds_table(whole, seed_datapaths, parse_seed_values(args.seed_values))
    if seeds:
        results[SEEDS] = {"figures": seeds, "table": (args.seeds_note + "\n\n" if args.seeds_note else "") + seeds_md}
        print(f"\n{SEEDS}\n{seeds_md}")
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps({"costs": costs, **results}, indent=1) + "\n")
    markdown = "".join(f"### {title}\n\n{r['table']}\n\n" for title, r in results.items()) + MINUTES_NOTE + "\n"
    atomic_write_text(os.path.join(args.out, "results.md"), markdown)


if __name__ == "__main__":
    main()
