"""The main job (`make demo`): fine-tune a poly-encoder on real chit-chat, evaluate, rank.

1. Fine-tunes a poly-encoder (16 codes) from the default all-MiniLM-L6-v2 backbone on the CCC
   train split for a few minutes, with a progress bar and the time left.
2. Evaluates it and the untouched backbone on the same CCC test examples, drawn over all test
   conversations (20 candidates each), and prints R@1/20, R@5/20 and MRR with 95% intervals
   from a bootstrap over conversations, and the fine-tuning's paired gain.
3. Prints the top-5 responses it ranks for a few test contexts among test responses.

ParlAI's own logs (every option of every model it builds, its metrics reports) go to
OUT/parlai.log; ``--verbose`` shows them on the console too. Everything runs offline on CPU;
`python -m parlai_poly.demo --help` lists the knobs.
"""
import argparse
import json
import os
import random
import warnings
from types import SimpleNamespace

# ParlAI 1.7.2 imports setuptools' deprecated pkg_resources: nothing a demo user can act on
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

from parlai_poly import compat, evaluate  # noqa: E402
from parlai_poly.api import Ranker  # noqa: E402
from parlai_poly.progress import parlai_log_file, train_with_progress  # noqa: E402
from parlai_poly.stats import DEFAULT_RESAMPLES  # noqa: E402
from parlai_poly.storage import atomic_write_text  # noqa: E402
from parlai_poly.tasks.ccc import fixed_candidates_path  # noqa: E402
from parlai_poly.tasks.ccc.build import read_conversations  # noqa: E402

compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything

TASK = "parlai_poly.tasks.ccc"
MODEL = "parlai_poly.agents:poly"
# shorter inputs than the agent's defaults: 2 CPU cores train about twice as many steps
INPUTS = dict(text_truncate=64, label_truncate=32, poly_n_codes=16)
ZERO_SHOT, FINE_TUNED = "zero-shot backbone", "fine-tuned poly-16"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for the model file and results")
    p.add_argument("--datapath", default="data", help="ParlAI datapath (CCC is built here)")
    p.add_argument("--train-minutes", type=float, default=7.0)
    p.add_argument("--eval-examples", type=int, default=600, help="CCC test examples, drawn over all test conversations")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of that draw")
    p.add_argument("--ranking-pool", type=int, default=2000, help="test responses to rank among")
    p.add_argument("--verbose", action="store_true", help="ParlAI's own logs on the console too")
    return p.parse_args()


def fine_tune(model_file, datapath, minutes):
    print(f"\n== 1. Fine-tuning a poly-encoder on CCC train for {minutes:g} minutes ==", flush=True)
    if os.path.exists(model_file):
        print(f"{model_file} exists: ParlAI resumes its training within the same time budget "
              "(remove the --out folder for a fresh run)", flush=True)
    train_with_progress(
        task=TASK, model=MODEL, model_file=model_file, datapath=datapath, batchsize=32,
        max_train_time=minutes * 60, warmup_updates=20, log_every_n_secs=10,
        validation_every_n_epochs=-1, validation_max_exs=64, short_final_eval=True, **INPUTS,
    )


def evaluate_both(model_file, args):
    """Per-example values of the zero-shot backbone and the fine-tuned model on one sample."""
    print(f"\n== 2. CCC test: {args.eval_examples} examples drawn over all test conversations ==", flush=True)
    setup = SimpleNamespace(task=TASK, datatype="test", datapath=args.datapath, batchsize=32)
    sample = ["--ccc-eval-sample", str(args.eval_examples), "--ccc-eval-seed", str(args.eval_seed)]
    inputs = [a for k, v in INPUTS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    rows = {
        ZERO_SHOT: evaluate.evaluate_model(f"{evaluate.AGENT_PREFIX}{MODEL}", setup, sample + inputs),
        FINE_TUNED: evaluate.evaluate_model(model_file, setup, sample),
    }
    return evaluate.summarize([ZERO_SHOT, FINE_TUNED], rows, DEFAULT_RESAMPLES, 0)


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
    ranker = Ranker.load(model_file, fixed_candidates=pool_file)
    shown = []
    for context, reply in samples:
        top = ranker.rank(context, top_k=5)
        print("\ncontext:\n  " + context.replace("\n", "\n  "))
        print(f"true reply: {reply}")
        for i, (cand, score) in enumerate(top, 1):
            print(f"  {i}. ({score:6.2f}) {cand}{'   <- true reply' if cand == reply else ''}")
        shown.append({"context": context, "reply": reply, "top5": top})
    return shown


def results_table(summary) -> str:
    """The models' R@1/20, R@5/20 and MRR with intervals, then the fine-tuning's paired gain."""
    cell = lambda v: f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"  # noqa: E731
    metrics = ("R@1/20", "R@5/20", "mrr")
    lines = [f"{'model':24s}" + "".join(f"{m.upper() if m == 'mrr' else m:>24s}" for m in metrics)]
    for name, entry in summary["models"].items():
        lines.append(f"{name:24s}" + "".join(f"{cell(entry[m]):>24s}" for m in metrics))
    gains = summary["models"][FINE_TUNED]
    lines.append(f"{'paired gain':24s}" + "".join(f"{cell(gains[f'{m} - {ZERO_SHOT}']):>24s}" for m in metrics))
    return "\n".join(lines)


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    model_file = os.path.join(args.out, "poly16_ccc")
    log_file = os.path.join(args.out, "parlai.log")
    with parlai_log_file(log_file, args.verbose):
        fine_tune(model_file, args.datapath, args.train_minutes)
        summary = evaluate_both(model_file, args)
        ranked = rank_examples(model_file, args.datapath, args.out, args.ranking_pool)
    print(f"\n== Results: CCC test, {summary['examples']} examples in {summary['conversations']} conversations, "
          "95% intervals by conversation ==")
    print(results_table(summary))
    result = {"results": summary, "ranked": ranked, "model_file": model_file, "args": vars(args)}
    summary_file = os.path.join(args.out, "summary.json")
    atomic_write_text(summary_file, json.dumps(result, indent=2) + "\n")
    print(f"\nmodel file: {model_file}\nsummary:    {summary_file}\nParlAI log: {log_file}")


if __name__ == "__main__":
    main()
