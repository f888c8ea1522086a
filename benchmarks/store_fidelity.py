"""How much a bfloat16 or int8 candidate store changes a trained model's rankings.

    python -m benchmarks.store_fidelity --model-file data/models/parlai_poly/ccc_bi/model \
        --datapath data [--num-examples 0] [--rescore-top-k 100]

Every context of the task's split (CCC test by default: all 13,331 examples, not a model
file's --ccc-eval-sample; its history included, as ``parlai eval_model`` builds it) is ranked against all of the split's responses (CCC test:
13,034) by the model over a float32, a bfloat16 and an int8 store of those candidates
(--candidate-store-dtype; the float32 one encoded once, the others converted from it, in
--cache-dir). Each context is encoded once and the same encoding scored against each store
through the agent's own scoring (``score_encoded``: the compact pass, then the top
--rescore-top-k scored again from float32), and also without the rescoring (the compact pass
alone). Reported, against float32's ranking of the same context: the top-10 overlap (and how
often the top 10 is the same list in the same order), the top-100 recall, the largest score
change relative to the context's largest score; and R@1, R@10 and MRR against the true
response, with their change. Not a timing: run it anywhere. Writes JSON to --out and prints a
table. Other ParlAI options (``--fromfile-datapath`` for another task, say) pass through.
"""
import argparse
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from benchmarks.cascade_eval import add_task_args, candidates_path, task_examples
from parlai_poly.storage import atomic_write_text

DEFAULT_OUT = "runs/store_fidelity/results.json"
COMPACT = ("bfloat16", "int8")
KS = (10, 100)  # the top-k lists compared with float32's


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.store_fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--model-file", required=True, help="a trained parlai-poly bi or poly model file")
    add_task_args(p)
    p.add_argument("--num-examples", type=int, default=0, help="contexts ranked (default 0: all of the split)")
    p.add_argument("--ccc-eval-sample", type=int, default=0,
                   help="CCC's teacher option: 0 (the default here) every example of the split, not the "
                   "model file's evaluation sample")
    p.add_argument("--batchsize", type=int, default=64, help="contexts encoded and scored at a time")
    p.add_argument("--rescore-top-k", type=int, default=100,
                   help="the agents' --rescore-top-k (default 100: what eval_model shows with --cap-num-predictions 100)")
    p.add_argument("--cache-dir", default=None, help="where the three stores are kept (default: beside --out, cache/)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args, args.parlai_args = p.parse_known_args(argv)
    if args.num_examples < 0 or args.batchsize < 1 or args.rescore_top_k < 0:
        p.error("--num-examples and --rescore-top-k must be at least 0, --batchsize positive")
    return args


def parlai_overrides(args) -> Dict:
    """Other ParlAI options given (``--fromfile-datapath F`` for another task, say), parsed as
    ``parlai eval_model`` would parse them."""
    if not args.parlai_args:
        return {}
    from parlai.core.params import ParlaiParser

    parsed = ParlaiParser(True, True).parse_args(["-t", args.task] + args.parlai_args)
    return {k: parsed[k] for k in parsed.get("override", {}) if k != "task"}


def load_store_agent(args, dtype: str):
    """The model over the fixed candidates with its store in ``dtype`` (built or converted)."""
    from parlai_poly.loading import load_agent

    overrides = dict(
        eval_candidates="fixed", fixed_candidates_path=args.candidates, datatype=args.datatype, task=args.task,
        candidate_store_dtype=dtype, candidate_cache_dir=args.cache_dir, rescore_top_k=args.rescore_top_k,
        interactive_mode=False, ccc_eval_sample=args.ccc_eval_sample, **parlai_overrides(args),
    )
    if args.datapath:
        overrides["datapath"] = args.datapath
    agent = load_agent(args.model_file, overrides, kinds=("bi", "poly"), what="--model-file")
    agent.model.eval()
    return agent


def collect_contexts(agent, args) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """The contexts' token ids and their labels' indices among the fixed candidates."""
    from parlai.core.teachers import create_task_agent_from_taskname

    teacher = create_task_agent_from_taskname(agent.opt)[0]
    index = {text: i for i, text in enumerate(agent.fixed_candidates)}
    vecs, labels = [], []
    for vec, label in task_examples(agent, teacher, args.num_examples):
        if label in index:  # a response not among the candidates cannot be ranked
            vecs.append(vec)
            labels.append(index[label])
    if not vecs:
        raise SystemExit("the task gave no contexts whose response is among the candidates")
    return vecs, torch.tensor(labels)


def batches(vecs: List[torch.Tensor], size: int, pad: int):
    """(positions, padded ids [b, T]) in batches of contexts of similar length."""
    order = sorted(range(len(vecs)), key=lambda i: len(vecs[i]))
    for start in range(0, len(order), size):
        picked = order[start : start + size]
        ids = torch.nn.utils.rnn.pad_sequence([vecs[i] for i in picked], batch_first=True, padding_value=pad)
        yield torch.tensor(picked), ids


def score_all(agents: Dict[str, object], vecs, labels: torch.Tensor, batchsize: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per store and mode, per context: its top-k lists, largest relative change, rank metrics.

    Each batch of contexts is encoded once (by the float32 agent's model: the same weights)
    and scored against every store; only top-k indices and small figures are kept."""
    from parlai_poly import ranking

    exact_agent = agents["float32"]
    out: Dict[str, Dict[str, list]] = {}
    with torch.no_grad():
        for number, (picked, ids) in enumerate(batches(vecs, batchsize, exact_agent.NULL_IDX)):
            context = exact_agent.unwrapped_model.encode_context(ids)
            exact = exact_agent.score_encoded(context, exact_agent.fixed_candidate_encs)  # [b, N]
            scored = {"float32": exact}
            for dtype in COMPACT:
                agent = agents[dtype]
                scored[f"{dtype} rescored"] = agent.score_encoded(context, agent.fixed_candidate_encs)
                scored[f"{dtype} alone"] = agent.unwrapped_model.score_encoded(context, agent.fixed.stored)
            top = exact.abs().max(1).values  # [b]
            for name, scores in scored.items():
                entry = out.setdefault(name, {"positions": [], "error": [], "metrics": [], **{f"top{k}": [] for k in KS}})
                entry["positions"].append(picked)
                entry["error"].append((scores - exact).abs().max(1).values / top)
                entry["metrics"].append(ranking.rank_metrics(scores, labels[picked], ks=(1, 10)))
                for k in KS:
                    entry[f"top{k}"].append(scores.topk(min(k, scores.size(1)), dim=1).indices)
            if number % 20 == 0:
                print(f"store_fidelity: {min((number + 1) * batchsize, len(vecs)):,} of {len(vecs):,} contexts", flush=True)
    return {name: _joined(entry) for name, entry in out.items()}


def _joined(entry) -> Dict[str, torch.Tensor]:
    """The per-batch pieces of one store and mode, put back in context order."""
    positions = torch.cat(entry["positions"])
    order = positions.argsort()
    joined = {key: torch.cat(entry[key])[order] for key in ["error"] + [f"top{k}" for k in KS]}
    for name in entry["metrics"][0]:
        joined[name] = torch.cat([m[name] for m in entry["metrics"]])[order]
    return joined


def compare(results: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict]:
    """The figures of each store and mode against float32's (see the module docstring)."""
    exact = results["float32"]
    report = {}
    for name, r in results.items():
        row = {"R@1": r["R@1"].mean().item(), "R@10": r["R@10"].mean().item(), "MRR": r["mrr"].mean().item()}
        if name != "float32":
            for k in KS:
                overlap = [len(set(a.tolist()) & set(b.tolist())) / a.numel() for a, b in zip(r[f"top{k}"], exact[f"top{k}"])]
                row[f"top{k}_overlap"] = sum(overlap) / len(overlap)
            row["top10_same_order"] = (r["top10"] == exact["top10"]).all(1).double().mean().item()
            row["max_score_change"] = r["error"].max().item()
            row["mean_score_change"] = r["error"].mean().item()
            for metric in ("R@1", "R@10", "MRR"):
                row[f"{metric}_change"] = row[metric] - report["float32"][metric]
        report[name] = row
    return report


def store_file(agent) -> Dict:
    """The agent's store file just after loading: its size and status ('built', 'converted',
    'reused'); the stores share one place, each converted from the one before."""
    store = agent.candidate_store
    size = os.path.getsize(store.tensor_path) if store.prefix and os.path.exists(store.tensor_path) else None
    return {"status": store.status, "file_bytes": size, "path": store.prefix and store.tensor_path}


def render(result) -> str:
    lines = [
        f"{result['contexts']:,} contexts of {result['task']} {result['datatype']} ranked against "
        f"{result['num_candidates']:,} candidates ({result['candidates']}); model {result['model_file']} "
        f"({result['agent']}); rescored top {result['rescore_top_k']} in float32.",
    ]
    header = (f"{'store':19s} {'top10':>7s} {'same10':>7s} {'top100':>7s} {'max chg':>8s} {'R@1':>7s} {'dR@1':>8s} "
              f"{'R@10':>7s} {'MRR':>7s} {'dMRR':>8s}")
    lines += [header, "-" * len(header)]
    fmt = lambda v, f=".4f": "-" if v is None else format(v, f)  # noqa: E731
    for name, row in result["stores"].items():
        lines.append(
            f"{name:19s} {fmt(row.get('top10_overlap')):>7s} {fmt(row.get('top10_same_order')):>7s} "
            f"{fmt(row.get('top100_overlap')):>7s} {fmt(row.get('max_score_change'), '.2%'):>8s} {row['R@1']:>7.4f} "
            f"{fmt(row.get('R@1_change'), '+.4f'):>8s} {row['R@10']:>7.4f} {row['MRR']:>7.4f} "
            f"{fmt(row.get('MRR_change'), '+.4f'):>8s}"
        )
    lines.append("top10/top100: overlap with float32's top 10/100 (mean over contexts); same10: the same top 10 "
                 "in the same order; max chg: the largest score change over the context's largest |score|.")
    files = ", ".join(f"{d} {f['file_bytes'] / 2**20:,.1f} MiB ({f['status']})" for d, f in result["files"].items()
                      if f["file_bytes"] is not None)
    if files:
        lines.append(f"store files: {files} (bfloat16 and int8 keep the float32 encodings for rescoring too)")
    return "\n".join(lines)


def run(args) -> Dict:
    args.candidates = candidates_path(args)
    args.cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "cache")
    agents, files = {}, {}
    for dtype in ("float32",) + COMPACT:  # float32 first: the others convert from its store
        print(f"store_fidelity: the {dtype} store ...", flush=True)
        agents[dtype] = load_store_agent(args, dtype)
        files[dtype] = store_file(agents[dtype])
    exact_agent = agents["float32"]
    vecs, labels = collect_contexts(exact_agent, args)
    print(f"store_fidelity: {len(vecs):,} contexts, {len(exact_agent.fixed_candidates):,} candidates", flush=True)
    results = score_all(agents, vecs, labels, args.batchsize)
    result = {
        "model_file": args.model_file, "agent": exact_agent.agent_name, "task": args.task, "datatype": args.datatype,
        "candidates": args.candidates, "num_candidates": len(exact_agent.fixed_candidates), "contexts": len(vecs),
        "rescore_top_k": args.rescore_top_k, "precision": exact_agent.precision, "files": files,
        "stores": compare(results), "setup": vars(args),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1, default=str) + "\n")
    print(render(result))
    print(f"wrote {args.out}")
    return result


def main(argv: Optional[List[str]] = None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
