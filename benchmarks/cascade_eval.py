"""Does retrieve-and-rerank pay? R@1 over all fixed candidates, and ms per context, for the
bi-encoder alone, the poly-encoder alone, the cascade, and the cross-encoder on everything.

    python -m benchmarks.cascade_eval \
        --bi-model-file data/models/parlai_poly/ccc_bi/model \
        --poly-model-file data/models/parlai_poly/ccc_poly64/model \
        --cross-model-file data/models/parlai_poly/ccc_cross/model \
        --datapath data --num-examples 200

The target (issue 4): on CCC test with all 13,034 test responses as candidates, the cascade
(bi top-K -> poly -> cross top-k) has a higher R@1 than the poly-encoder alone, in at least
100x less time per context than the cross-encoder scoring every candidate.

Each model is evaluated the way ``parlai eval_model`` does it (the same world loop over the
task's examples, contexts with their history, each labelled with its true response, which
is among the fixed candidates), on --num-examples examples, with --eval-candidates fixed (on
CCC a sample drawn over all the split's conversations, ``--ccc-eval-sample``, seed 0, one batch
more for the untimed first; other tasks: their first examples); the poly-encoder as itself
and with --retrieve-model-file / --rerank-model-file. The candidates are encoded (or their
caches loaded) before the clock starts, and one batch runs untimed first, so ms per context is
the steady state of scoring. The cross-encoder on everything is far too slow to run (13,034
forward passes per context), so it is timed on --cross-pairs (context, candidate) pairs, the
candidates spread over the whole file (so their lengths are the file's), and extrapolated
linearly to N: marked ``extrapolated``, its R@1 not measured. Other ParlAI options (e.g.
``--fromfile-datapath`` for another task) are passed through. Writes JSON to --out and prints a table.
"""
import argparse
import json
import os
import time
from typing import Dict, List, Optional

import torch

from parlai_poly.storage import atomic_write_text

DEFAULT_OUT = "runs/cascade_eval/results.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cascade_eval", description=__doc__.splitlines()[0])
    p.add_argument("--bi-model-file", required=True, help="the retriever (a parlai-poly bi model file)")
    p.add_argument("--poly-model-file", required=True, help="the poly-encoder (alone, and the cascade's middle)")
    p.add_argument("--cross-model-file", required=True, help="the reranker (a parlai-poly cross model file)")
    add_task_args(p)
    p.add_argument("--num-examples", type=int, default=200)
    p.add_argument("--batchsize", type=int, default=16)
    p.add_argument("--retrieve-top-k", type=int, default=100)
    p.add_argument("--rerank-top-k", type=int, default=10)
    p.add_argument("--retrieve-index", choices=("exact", "hnsw"), default="exact")
    p.add_argument("--score-dtype", choices=("float32", "bfloat16", "auto"), default=None,
                   help="the poly-encoder's --score-dtype (default: as its model file says)")
    p.add_argument("--cross-pairs", type=int, default=2000,
                   help="(context, candidate) pairs timed for the cross-encoder on everything")
    p.add_argument("--cross-contexts", type=int, default=4, help="contexts those pairs are spread over")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args, parlai_args = p.parse_known_args(argv)
    if min(args.num_examples, args.batchsize, args.cross_pairs, args.cross_contexts, args.retrieve_top_k) < 1:
        p.error("--num-examples, --batchsize, --cross-pairs, --cross-contexts and --retrieve-top-k must be positive")
    return args, parlai_args


def add_task_args(p: argparse.ArgumentParser) -> None:
    """The task, split and fixed candidates an evaluation ranks against (CCC test's by default)."""
    p.add_argument("--task", default="parlai_poly.tasks.ccc")
    p.add_argument("--datatype", default="test")
    p.add_argument("--datapath", default=None, help="ParlAI datapath (default: ParlAI's)")
    p.add_argument("--fixed-candidates-path", default=None,
                   help="one candidate a line (default: the CCC split's responses, from parlai_poly.tasks.ccc)")


def candidates_path(args) -> str:
    if args.fixed_candidates_path:
        return args.fixed_candidates_path
    if args.task != "parlai_poly.tasks.ccc":
        raise SystemExit(f"--task {args.task}: give --fixed-candidates-path (only CCC's is known here)")
    from parlai_poly.tasks.ccc.build import default_datapath, fixed_candidates_path

    return fixed_candidates_path(args.datapath or default_datapath(), args.datatype.split(":")[0])


def parlai_opt(args, model_file: str, extra: Dict, parlai_args: List[str]):
    """The options eval_model would parse for this model over the fixed candidates."""
    from parlai.core.params import ParlaiParser

    argv = ["-mf", model_file, "-t", args.task, "-dt", args.datatype, "-bs", str(args.batchsize),
            "--eval-candidates", "fixed", "--fixed-candidates-path", args.candidates]
    if args.datapath:
        argv += ["-dp", args.datapath]
    if args.task == "parlai_poly.tasks.ccc" and "--ccc-eval-sample" not in parlai_args:
        # turns of one conversation are not independent: examples from all of them, not the first few
        argv += ["--ccc-eval-sample", str(args.num_examples + args.batchsize), "--ccc-eval-seed", "0"]
    for key, value in extra.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return ParlaiParser(True, True).parse_args(argv + parlai_args)


def evaluate(args, model_file: str, extra: Dict, parlai_args: List[str]) -> Dict:
    """R@k/N, MRR and ms per context of one model (or cascade) over --num-examples examples."""
    from parlai.core.agents import create_agent
    from parlai.core.worlds import create_task

    opt = parlai_opt(args, model_file, extra, parlai_args)
    began = time.perf_counter()
    agent = create_agent(opt, requireModelExists=True)  # encodes or loads the candidates
    world = create_task(opt, agent)
    world.parley()  # untimed: the cascade loads its models and index on its first batch
    setup_s = time.perf_counter() - began
    untimed = _value(world.report().get("exs", 0))
    count, timed = opt["batchsize"], 0.0
    while not world.epoch_done() and count < args.num_examples:
        started = time.perf_counter()
        world.parley()
        timed += time.perf_counter() - started
        count += opt["batchsize"]
    report = {k: _value(v) for k, v in world.report().items()}
    examples = report.get("exs", 0)
    timed_examples = examples - untimed
    recalls = {k: v for k, v in report.items() if k.startswith("R@") or k in ("mrr", "hits@1")}
    return {
        "examples": examples,
        "metrics": recalls,
        "ms_per_context": 1000 * timed / timed_examples if timed_examples else None,
        "timed_examples": timed_examples,
        "setup_seconds": round(setup_s, 2),
        "options": extra,
    }


def _value(metric):
    return metric.value() if hasattr(metric, "value") else metric


def cross_everything(args, parlai_args: List[str]) -> Dict:
    """ms per context of the cross-encoder scoring all N candidates, extrapolated from pairs."""
    from parlai.core.agents import create_agent
    from parlai.core.teachers import create_task_agent_from_taskname

    opt = parlai_opt(args, args.cross_model_file, {}, parlai_args)
    agent = create_agent(opt, requireModelExists=True)
    agent.model.eval()
    cands = agent.fixed_candidate_vecs  # [N, L]
    n = cands.size(0)
    contexts = _context_vecs(agent, create_task_agent_from_taskname(opt)[0], args.cross_contexts)
    per_context = max(1, args.cross_pairs // len(contexts))
    spread = torch.linspace(0, n - 1, min(per_context, n)).long()  # over the whole file: its lengths
    with torch.no_grad():
        _score_pairs(agent, contexts[0], cands, spread[: min(16, len(spread))])  # warm-up
        started = time.perf_counter()
        for context in contexts:
            _score_pairs(agent, context, cands, spread)
        seconds = time.perf_counter() - started
    pairs = len(spread) * len(contexts)
    return {"examples": None, "metrics": {}, "ms_per_context": 1000 * seconds / pairs * n, "extrapolated": True,
            "measured_pairs": pairs, "measured_contexts": len(contexts), "num_candidates": n}


def task_examples(agent, teacher, limit: int = 0):
    """(text_vec [T], label text) of the task's examples in order, as the agent vectorizes them
    in a world (history and all); ``limit`` 0: the whole split. (Counted against the
    teacher's num_examples: ParlAI's epoch_done turns true before its last examples.)"""
    total = teacher.num_examples()
    for _ in range(min(limit, total) if limit else total):
        example = teacher.act()
        if example is None or not example.get("text"):
            break
        observed = agent.observe(example)
        labels = example.get("eval_labels") or example.get("labels") or [None]
        yield observed["text_vec"], labels[0]
        agent.self_observe({})  # as a world does: the true reply joins the history


def _context_vecs(agent, teacher, count: int) -> List[torch.Tensor]:
    """The first ``count`` contexts of the task as the agent vectorizes them, history and all."""
    vecs = [vec.view(1, -1) for vec, _ in task_examples(agent, teacher, count)]
    if not vecs:
        raise SystemExit("the task gave no contexts to time the cross-encoder on")
    return vecs


def _score_pairs(agent, context, cands, index):
    zeros = torch.zeros(len(index), dtype=torch.long)
    return agent.score_pairs(context, cands, zeros, index)


def run(args, parlai_args: List[str]) -> Dict:
    args.candidates = candidates_path(args)
    poly_extra = {"score_dtype": args.score_dtype} if args.score_dtype else {}
    cascade = dict(poly_extra, retrieve_model_file=args.bi_model_file, retrieve_top_k=args.retrieve_top_k,
                   rerank_model_file=args.cross_model_file, rerank_top_k=args.rerank_top_k,
                   retrieve_index=args.retrieve_index)
    rows = {}
    for name, model_file, extra in (
        ("bi", args.bi_model_file, {}),
        ("poly", args.poly_model_file, poly_extra),
        ("cascade", args.poly_model_file, cascade),
    ):
        print(f"cascade_eval: {name} ...", flush=True)
        rows[name] = evaluate(args, model_file, extra, parlai_args)
    print("cascade_eval: cross on every candidate (timed on pairs) ...", flush=True)
    rows["cross_all"] = cross_everything(args, parlai_args)
    result = {"candidates": args.candidates, "num_examples": args.num_examples, "rows": rows,
              "targets": targets(rows), "setup": vars(args) | {"parlai_args": parlai_args,
                                                              "torch_threads": torch.get_num_threads()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1, default=str) + "\n")
    print(render(result))
    print(f"wrote {args.out}")
    return result


def _r1(row) -> Optional[float]:
    return next((v for k, v in row["metrics"].items() if k.startswith("R@1/")), None)


def targets(rows) -> Dict:
    cascade, poly, cross = rows["cascade"], rows["poly"], rows["cross_all"]
    r1_cascade, r1_poly = _r1(cascade), _r1(poly)
    speedup = cross["ms_per_context"] / cascade["ms_per_context"] if cascade["ms_per_context"] else None
    return {
        "cascade_r1_over_poly_r1": {"cascade": r1_cascade, "poly": r1_poly,
                                    "meets": None if None in (r1_cascade, r1_poly) else r1_cascade > r1_poly},
        "cross_all_ms_over_cascade_ms": {"value": speedup, "target": ">= 100 (cross extrapolated)",
                                         "meets": None if speedup is None else speedup >= 100},
    }


def render(result) -> str:
    rows = result["rows"]
    n = rows["cross_all"]["num_candidates"]
    recall_keys = sorted({k for r in rows.values() for k in r["metrics"] if k.startswith("R@")},
                         key=lambda k: int(k[2:].split("/")[0]))
    recall_header = " ".join(f"{k:>10s}" for k in recall_keys)
    header = f"{'model':12s} {'examples':>8s} {recall_header} {'MRR':>7s} {'ms/context':>12s}"
    lines = [f"{result['num_examples']} examples (asked), {n:,} fixed candidates from {result['candidates']}", header,
             "-" * len(header)]
    for name, row in rows.items():
        recall = " ".join(f"{row['metrics'][k]:>10.4f}" if k in row["metrics"] else f"{'-':>10s}" for k in recall_keys)
        mrr, ms = row["metrics"].get("mrr"), row["ms_per_context"]
        examples = "-" if row["examples"] is None else str(row["examples"])
        mrr = "-" if mrr is None else f"{mrr:.4f}"
        ms = ("-" if ms is None else f"{ms:,.1f}") + ("*" if row.get("extrapolated") else "")
        lines.append(f"{name:12s} {examples:>8s} {recall} {mrr:>7s} {ms:>12s}")
    cross = rows["cross_all"]
    lines.append(f"* extrapolated from {cross['measured_pairs']} pairs over {cross['measured_contexts']} contexts; "
                 "R@1 not measured.")
    r1, speed = result["targets"]["cascade_r1_over_poly_r1"], result["targets"]["cross_all_ms_over_cascade_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines.append(f"targets: cascade R@1 {fmt(r1['cascade'])} > poly alone {fmt(r1['poly'])}: {r1['meets']}; "
                 f"cross on everything / cascade time {speed['value'] or 0:,.0f}x >= 100: {speed['meets']}")
    return "\n".join(lines)


def main(argv=None):
    args, parlai_args = parse_args(argv)
    return run(args, parlai_args)


if __name__ == "__main__":
    main()
