"""Evaluate models on the same examples, with confidence intervals by conversation.

    python -m parlai_poly.evaluate MODEL [MODEL ...] -t parlai_poly.tasks.ccc -dt test \\
        [--ccc-eval-sample 2000] [--out DIR] [-- any other ParlAI eval option]

A MODEL is a model file (or ``zoo:`` path); ``agent:parlai_poly.agents:bi`` for an untrained
backbone (zero-shot); or a ``NAME.jsonl`` of per-example values that an earlier run wrote
with ``--out``, which is read instead of evaluated again (it must cover the same examples). Every model sees the same examples through ParlAI's own
eval loop (the agents' own metrics, per example); the command prints, per model, R@1/N,
R@5/N and MRR with 95% intervals from a bootstrap over conversations, and for every model
after the first its paired difference from the first. ``--out DIR`` keeps the per-example
values (``NAME.jsonl``) and the summary (``summary.json``).

The task's examples should name their conversation (``conversation_id``, as the CCC teacher's
do); a task whose examples do not is bootstrapped by example instead, with a warning.
"""
import argparse
import functools
import json
import os
import sys
import time
from typing import Dict, List, Optional

from tqdm import tqdm

from .errors import ParlaiPolyError, report_bad_input_on_exit
from .storage import atomic_write_text
from .stats import DEFAULT_RESAMPLES, conversation_bootstrap, format_interval, paired_bootstrap

AGENT_PREFIX = "agent:"
REPORTED = ("R@1", "R@5", "mrr")  # R@k: the R@k/N of the task's N


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model files, zoo: paths or agent:MODULE:CLASS")
    parser.add_argument("-t", "--task", default="parlai_poly.tasks.ccc")
    parser.add_argument("-dt", "--datatype", default="test", help="valid or test")
    parser.add_argument("-dp", "--datapath", default=None)
    parser.add_argument("-bs", "--batchsize", type=int, default=32)
    parser.add_argument("--out", default=None, help="folder for per-example values and summary.json")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES)
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    args, parlai_args = parser.parse_known_args(argv)
    if args.datatype.split(":")[0] == "train":
        parser.error("-dt train: evaluate on valid (to tune) or test (to report)")
    return args, [a for a in parlai_args if a != "--"]


def evaluate_model(
    model: str, args, parlai_args: List[str], max_examples: Optional[int] = None, timings: Optional[Dict] = None
) -> List[Dict]:
    """Per-example metrics of one model, in the task's order, each with its conversation.

    ``max_examples``: stop after about that many (whole batches), for timing a prefix;
    ``timings`` (a dict) gets the seconds spent loading (``setup``) and evaluating (``loop``)."""
    if model.endswith(".jsonl"):
        return read_example_rows(model)
    from parlai.core.agents import create_agent
    from parlai.core.params import ParlaiParser
    from parlai.core.worlds import create_task

    from . import compat

    compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything

    argv = ["-t", args.task, "-dt", args.datatype, "-bs", str(args.batchsize)] + parlai_args
    if args.datapath:
        argv += ["-dp", args.datapath]
    argv += ["-m", model[len(AGENT_PREFIX):]] if model.startswith(AGENT_PREFIX) else ["-mf", model]
    started = time.perf_counter()
    opt = ParlaiParser(True, True).parse_args(argv)
    agent = create_agent(opt, requireModelExists=True)
    world = create_task(opt, agent)
    looped = time.perf_counter()
    rows: List[Dict] = []
    total = world.num_examples() if max_examples is None else min(max_examples, world.num_examples())
    with tqdm(total=total, desc=f"Evaluating {os.path.basename(model)}", unit="ex") as bar:
        while not world.epoch_done() and len(rows) < total:
            world.parley()
            for sub in getattr(world, "worlds", [world]):
                rows.extend(_example_row(sub.get_acts(), len(rows)))
            bar.update(len(rows) - bar.n)
    if timings is not None:
        timings.update(setup=looped - started, loop=time.perf_counter() - looped)
    world.shutdown()
    return rows


def read_example_rows(path: str) -> List[Dict]:
    """The per-example values that ``--out`` wrote to ``path`` (one JSON object a line)."""
    if not os.path.isfile(path):
        raise ParlaiPolyError(f"{path}: no such file; give a NAME.jsonl that --out wrote, or a model file.")
    with open(path, encoding="utf-8") as f:
        rows = []
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ParlaiPolyError(f"{path}, line {number}: not a JSON object of per-example values ({e.msg}).") from None
    return rows


def _example_row(acts, index: int) -> List[Dict]:
    """The example of one (teacher, agent) exchange, if it was an example this parley."""
    if not acts or len(acts) < 2 or acts[0] is None or acts[1] is None:
        return []
    teacher, reply = acts
    metrics = reply.get("metrics") or {}
    if "mrr" not in metrics or teacher.get("batch_padding"):
        return []
    if "conversation_id" not in teacher:
        _warn_no_conversations()
    row = {"conversation": str(teacher.get("conversation_id", f"example {index}"))}
    for name, value in metrics.items():
        if name in ("mrr", "codes_cos", "codes_entropy") or name.startswith("R@"):
            row[name] = float(value.value())
    return [row]


@functools.lru_cache(maxsize=None)
def _warn_no_conversations():
    print(
        "warning: this task's examples name no conversation_id: the intervals treat every "
        "example as independent, which is too narrow if examples share conversations",
        file=sys.stderr,
    )


def summarize(names: List[str], results: Dict[str, List[Dict]], resamples: int, seed: int) -> Dict:
    first = names[0]
    conversations = [r["conversation"] for r in results[first]]
    for name in names[1:]:
        if [r["conversation"] for r in results[name]] != conversations:
            raise SystemExit(f"{name} was evaluated on other examples than {first}: cannot pair them.")
    metrics = [m for m in results[first][0] if m.split("/")[0] in REPORTED]
    summary = {"examples": len(conversations), "conversations": len(set(conversations)), "models": {}}
    for name in names:
        entry = {}
        for metric in ("codes_cos", "codes_entropy"):  # poly-encoders: still a bi-encoder?
            if metric in results[name][0]:
                entry[metric] = conversation_bootstrap([r[metric] for r in results[name]], conversations, resamples, seed)
        for metric in metrics:
            values = [r[metric] for r in results[name]]
            entry[metric] = conversation_bootstrap(values, conversations, resamples, seed)
            if name != first:
                base = [r[metric] for r in results[first]]
                entry[f"{metric} - {first}"] = paired_bootstrap(values, base, conversations, resamples=resamples, seed=seed)
        summary["models"][name] = entry
    return summary


def render(summary: Dict) -> str:
    lines = [
        f"{summary['examples']:,} examples in {summary['conversations']:,} conversations; "
        "95% intervals from a bootstrap over conversations"
    ]
    for name, entry in summary["models"].items():
        cells = [f"{k} {format_interval(v)}" for k, v in entry.items() if " - " not in k]
        lines.append(f"{name}: " + "  ".join(cells))
        diffs = [f"{k.split(' - ')[0]} {format_interval(v, signed=True)}" for k, v in entry.items() if " - " in k]
        if diffs:
            lines.append(f"  paired difference from {next(iter(summary['models']))}: " + "  ".join(diffs))
    return "\n".join(lines)


def model_name(model: str) -> str:
    if model.endswith(".jsonl"):
        return os.path.basename(model)[: -len(".jsonl")].replace("__", "/")
    if model.startswith(AGENT_PREFIX):
        return model[len(AGENT_PREFIX):].split(":")[-1] + "-zero-shot"
    return os.path.basename(os.path.dirname(model)) + "/" + os.path.basename(model) if os.sep in model else model


def main(argv=None):
    report_bad_input_on_exit()
    args, parlai_args = parse_args(argv)
    names = [model_name(m) for m in args.models]
    if len(set(names)) != len(names):
        raise SystemExit(f"two models share a name ({names}): give distinct paths")
    results = {name: evaluate_model(model, args, parlai_args) for name, model in zip(names, args.models)}
    summary = summarize(names, results, args.resamples, args.seed)
    summary["command"] = " ".join(["python -m parlai_poly.evaluate"] + (argv if argv is not None else sys.argv[1:]))
    print(render(summary), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name, rows in results.items():
            path = os.path.join(args.out, name.replace("/", "__") + ".jsonl")
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
