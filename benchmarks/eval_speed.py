"""How long a whole CCC test evaluation takes, against encoding every inline candidate.

    python benchmarks/eval_speed.py MODEL [--prefix 640] [--out docs/eval_speed]

1. MODEL (a bi- or poly-encoder file) on the whole CCC test split (13,331 examples, 20
   inline candidates each) through ``parlai_poly.evaluate``, as a user runs it: each distinct
   candidate encoded once (the encoding memo), contexts as ParlAI batches them. Timed.
2. The first --prefix examples three times: as in 1; encoding every candidate of every
   example, as ParlAI's TorchRankerAgent does (the memo emptied before each batch), in the
   same precision; and that again in float32, which is all ParlAI's agents run on a CPU
   (their --fp16 needs CUDA): ParlAI's way. Seconds per example times 13,331 extrapolate
   each to the whole test (marked so); running them whole would take hours here.
Writes results.json (the timings and the test figures with their intervals) to --out.
"""
import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/scoring_speed.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from parlai_poly import evaluate  # noqa: E402
from parlai_poly.encoding_memo import EncodingMemo  # noqa: E402
from parlai_poly.storage import atomic_write_text  # noqa: E402

TEST_EXAMPLES = 13331


def timed_eval(model, datapath, max_examples=None, parlai_args=()):
    args = SimpleNamespace(task="parlai_poly.tasks.ccc", datatype="test", datapath=datapath, batchsize=32)
    start = time.perf_counter()
    rows = evaluate.evaluate_model(model, args, list(parlai_args), max_examples)
    return rows, time.perf_counter() - start


def every_candidate():
    """Make the memo forget before each batch: every candidate is encoded, as in ParlAI."""
    real = EncodingMemo.encode

    def encode(self, *args, **kwargs):
        self.table = {}
        return real(self, *args, **kwargs)

    EncodingMemo.encode = encode
    return lambda: setattr(EncodingMemo, "encode", real)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--prefix", type=int, default=640)
    parser.add_argument("--datapath", default="data")
    parser.add_argument("--out", default="docs/eval_speed")
    args = parser.parse_args(argv)
    prefix = args.prefix
    _, memo_prefix_s = timed_eval(args.model, args.datapath, prefix)
    restore = every_candidate()
    try:
        _, every_prefix_s = timed_eval(args.model, args.datapath, prefix)
        _, parlai_prefix_s = timed_eval(args.model, args.datapath, prefix, ["--precision", "fp32"])
    finally:
        restore()
    rows, whole_s = timed_eval(args.model, args.datapath)
    summary = evaluate.summarize(["model"], {"model": rows}, evaluate.DEFAULT_RESAMPLES, 0)
    result = {
        "command": " ".join(["python benchmarks/eval_speed.py"] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model,
        "whole_test_examples": len(rows),
        "whole_test_seconds": whole_s,
        "prefix_examples": args.prefix,
        "prefix_seconds_memo": memo_prefix_s,
        "prefix_seconds_every_candidate": every_prefix_s,
        "prefix_seconds_every_candidate_fp32": parlai_prefix_s,
        "every_candidate_whole_test_seconds_extrapolated": every_prefix_s / args.prefix * TEST_EXAMPLES,
        "parlai_way_whole_test_seconds_extrapolated": parlai_prefix_s / args.prefix * TEST_EXAMPLES,
        "test": summary,
    }
    result["speedup_whole_test"] = result["every_candidate_whole_test_seconds_extrapolated"] / whole_s
    result["speedup_whole_test_vs_parlai_way"] = result["parlai_way_whole_test_seconds_extrapolated"] / whole_s
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(result, indent=1) + "\n")
    print(evaluate.render(summary))
    print(
        f"whole test: {whole_s / 60:.1f} min for {len(rows):,} examples; every candidate encoded "
        f"(ParlAI's way): {result['every_candidate_whole_test_seconds_extrapolated'] / 60:.1f} min "
        f"extrapolated from {args.prefix} examples ({every_prefix_s:.0f} s, against {memo_prefix_s:.0f} s "
        f"with the memo): {result['speedup_whole_test']:.1f}x; ParlAI's way (every candidate, "
        f"float32): {result['parlai_way_whole_test_seconds_extrapolated'] / 60:.1f} min extrapolated "
        f"({parlai_prefix_s:.0f} s): {result['speedup_whole_test_vs_parlai_way']:.1f}x"
    )


if __name__ == "__main__":
    main()
