"""The main job (`make demo`): fine-tune a poly-encoder on real chit-chat, evaluate, rank.

1. Fine-tunes a poly-encoder (16 codes) from the default all-MiniLM-L6-v2 backbone on the CCC
   train split for a few minutes (ParlAI's train loop logs progress and time left).
2. Evaluates it and the untouched backbone on CCC test (20 candidates per example) and
   prints R@1/20, R@5/20 and MRR.
3. Prints the top-5 responses it ranks for a few test contexts among test responses.

Everything runs offline on CPU; `python -m parlai_poly.demo --help` lists the knobs.
"""
import argparse
import json
import os
import random

from parlai.core.agents import create_agent_from_model_file
from parlai.scripts.eval_model import EvalModel
from parlai.scripts.train_model import TrainModel

from parlai_poly import compat
from parlai_poly.storage import atomic_write_text
from parlai_poly.tasks.ccc import fixed_candidates_path
from parlai_poly.tasks.ccc.build import read_conversations

compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything

TASK = "parlai_poly.tasks.ccc"
MODEL = "parlai_poly.agents:poly"
# shorter inputs than the agent's defaults: 2 CPU cores train about twice as many steps
INPUTS = dict(text_truncate=64, label_truncate=32, poly_n_codes=16)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for the model file and results")
    p.add_argument("--datapath", default="data", help="ParlAI datapath (CCC is built here)")
    p.add_argument("--train-minutes", type=float, default=7.0)
    p.add_argument("--eval-examples", type=int, default=300, help="CCC test examples to score")
    p.add_argument("--ranking-pool", type=int, default=2000, help="test responses to rank among")
    return p.parse_args()


def fine_tune(model_file, datapath, minutes):
    print(f"\n== 1. Fine-tuning a poly-encoder on CCC train for {minutes:g} minutes ==", flush=True)
    if os.path.exists(model_file):
        print(f"{model_file} exists: ParlAI resumes its training within the same time budget "
              "(remove the --out folder for a fresh run)", flush=True)
    TrainModel.main(
        task=TASK, model=MODEL, model_file=model_file, datapath=datapath, batchsize=32,
        max_train_time=minutes * 60, warmup_updates=20, log_every_n_secs=30,
        validation_every_n_epochs=-1, validation_max_exs=64, short_final_eval=True, **INPUTS,
    )


def evaluate(datapath, n, model_file=None):
    """R@k/20 and MRR on the first ``n`` CCC test examples."""
    model = dict(model_file=model_file) if model_file else dict(model=MODEL, **INPUTS)
    report = EvalModel.main(task=TASK, datatype="test", datapath=datapath, num_examples=n, batchsize=32, log_every_n_secs=30, **model)
    return {key: round(float(report[key]), 4) for key in ("R@1/20", "R@5/20", "mrr", "exs")}


def sample_contexts(datapath, k=3, seed=0):
    """(context, true reply) from the start of a few test conversations."""
    conversations = list(read_conversations(datapath, "test"))
    picked = random.Random(seed).sample(conversations, k)
    return [("\n".join(c["turns"][:2]), c["turns"][2]) for c in picked if len(c["turns"]) > 2]


def rank_examples(model_file, datapath, out, pool_size):
    print(f"\n== 3. Top-5 of {pool_size} test responses for sample contexts ==", flush=True)
    samples = sample_contexts(datapath)
    with open(fixed_candidates_path(datapath, "test"), encoding="utf-8") as f:
        responses = [line.strip() for line in f if line.strip()]
    pool = random.Random(0).sample(responses, pool_size - len(samples)) + [reply for _, reply in samples]
    pool_file = os.path.join(out, "ranking_pool.txt")
    atomic_write_text(pool_file, "\n".join(pool) + "\n")
    agent = create_agent_from_model_file(
        model_file, dict(eval_candidates="fixed", fixed_candidates_path=pool_file, return_cand_scores=True)
    )
    shown = []
    for context, reply in samples:
        agent.reset()
        agent.observe({"text": context, "episode_done": True})
        act = agent.act()
        top = list(zip(act["text_candidates"][:5], act["sorted_scores"][:5].tolist()))
        print("\ncontext:\n  " + context.replace("\n", "\n  "))
        print(f"true reply: {reply}")
        for i, (cand, score) in enumerate(top, 1):
            print(f"  {i}. ({score:6.2f}) {cand}{'   <- true reply' if cand == reply else ''}")
        shown.append({"context": context, "reply": reply, "top5": top})
    return shown


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    model_file = os.path.join(args.out, "poly16_ccc")
    fine_tune(model_file, args.datapath, args.train_minutes)
    print(f"\n== 2. CCC test, first {args.eval_examples} examples, 20 candidates each ==", flush=True)
    results = {
        "zero-shot backbone (poly, untrained codes)": evaluate(args.datapath, args.eval_examples),
        "fine-tuned poly-16": evaluate(args.datapath, args.eval_examples, model_file),
    }
    ranked = rank_examples(model_file, args.datapath, args.out, args.ranking_pool)
    print("\n== Results: CCC test ==")
    print(f"{'model':45s} {'R@1/20':>7s} {'R@5/20':>7s} {'MRR':>7s}")
    for name, r in results.items():
        print(f"{name:45s} {r['R@1/20']:7.3f} {r['R@5/20']:7.3f} {r['mrr']:7.3f}")
    summary = {"results": results, "ranked": ranked, "model_file": model_file, "args": vars(args)}
    atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    print(f"\nmodel file: {model_file}\nsummary: {os.path.join(args.out, 'summary.json')}")


if __name__ == "__main__":
    main()
