"""How long a whole CCC test evaluation takes, against encoding every inline candidate.

    python benchmarks/eval_speed.py MODEL [--sample 640] [--out docs/eval_speed]

1. MODEL (a bi- or poly-encoder file) on the whole CCC test split (13,331 examples, 20
   inline candidates each) through ``parlai_poly.evaluate``, as a user runs it: each distinct
   candidate encoded once (the encoding memo), contexts as ParlAI batches them.
2. --sample test examples drawn over all test conversations (the teacher's
   --ccc-eval-sample), twice: tokenizing and encoding every candidate of every example, as
   ParlAI's TorchRankerAgent does (the memos emptied), in the model's precision; and
   that again in float32, which is all ParlAI's agents run on a CPU (their --fp16 needs
   CUDA): ParlAI's way. Their seconds per example times 13,331 extrapolate each to the whole
   test (marked so); running them whole would take an hour or more here.
Every figure is the evaluation loop's time: loading the model and building the task (the
same for every way, and paid once) are reported apart, not extrapolated.
3. One batch of 32 CCC test contexts (their last 64 tokens), and one context (its last 32,
   as a served request), through MiniLM without gradients: in float32, under bfloat16
   autocast, and on the bfloat16 copy of the backbone that ``TextEncoder`` runs at inference
   (median of 5 after one untimed pass each).
Writes results.json (the timings and the test figures with their intervals) and the whole
test's per-example values (whole_test.jsonl, for ``parlai_poly.evaluate`` to pair) to --out.
"""
import argparse
import json
import os
import random
import statistics
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/scoring_speed.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from parlai_poly import dictionary, evaluate  # noqa: E402
from parlai_poly.encoding_memo import EncodingMemo  # noqa: E402
from parlai_poly.storage import atomic_write_text  # noqa: E402

TEST_EXAMPLES = 13331


def timed_eval(model, datapath, parlai_args=()):
    """(per-example rows, {"setup": s, "loop": s}) of one evaluation."""
    args = SimpleNamespace(task="parlai_poly.tasks.ccc", datatype="test", datapath=datapath, batchsize=32)
    timings = {}
    rows = evaluate.evaluate_model(model, args, list(parlai_args), timings=timings)
    return rows, timings


def every_candidate():
    """Make the memos forget: every candidate of every example is tokenized and encoded, as in
    ParlAI (the encoding memo emptied before each batch, the dictionary remembering no text)."""
    real, memo_size = EncodingMemo.encode, dictionary.TXT2VEC_MEMO_SIZE

    def encode(self, *args, **kwargs):
        self.table = {}
        return real(self, *args, **kwargs)

    def restore():
        EncodingMemo.encode, dictionary.TXT2VEC_MEMO_SIZE = real, memo_size

    EncodingMemo.encode, dictionary.TXT2VEC_MEMO_SIZE = encode, 0
    return restore


def test_contexts(datapath):
    """Every CCC test example's context (its whole history), in the split's order."""
    from parlai_poly.tasks.ccc.agents import full_context_examples
    from parlai_poly.tasks.ccc.build import read_conversations

    return [e["text"] for c in read_conversations(datapath, "test") for e in full_context_examples(c["turns"])]


def context_batch_ms(encoder, tokenizer, contexts, batch, tokens, repeats=5):
    """{way: median ms} for ``encoder`` (a TextEncoder in eval mode) to encode ``batch`` of
    ``contexts`` cut to their last ``tokens``, without gradients."""
    import torch

    chosen = random.Random(0).sample(contexts, batch)
    ids = tokenizer(chosen, truncation=True, max_length=tokens, padding=True, return_tensors="pt")["input_ids"]

    def float32():
        encoder.compute_dtype = None
        return encoder(ids)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder.backbone(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long())

    def bfloat16_copy():
        encoder.compute_dtype = torch.bfloat16
        return encoder(ids)

    timings = {}
    with torch.no_grad():
        for way in (float32, autocast, bfloat16_copy):
            way()
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                way()
                seconds.append(time.perf_counter() - start)
            timings[way.__name__] = 1000 * statistics.median(seconds)
    return {"batch": list(ids.shape), "ms": timings}


def encoder_timings(datapath):
    """context_batch_ms of MiniLM for 32 test contexts of up to 64 tokens, and for one of up to
    32 (a served request's)."""
    from parlai_poly.backbone import load_encoder, load_tokenizer
    from parlai_poly.modules import TextEncoder

    tokenizer = load_tokenizer(None)
    tokenizer.truncation_side = "left"  # a context's last turns, as the agents keep them
    encoder = TextEncoder(load_encoder(None), pad_idx=tokenizer.pad_token_id).eval()
    contexts = test_contexts(datapath)
    return context_batch_ms(encoder, tokenizer, contexts, 32, 64), context_batch_ms(encoder, tokenizer, contexts, 1, 32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--sample", type=int, default=640, help="examples the ways that encode every candidate are timed on")
    parser.add_argument("--datapath", default="data")
    parser.add_argument("--out", default="docs/eval_speed")
    args = parser.parse_args(argv)
    sample = ["--ccc-eval-sample", str(args.sample)]
    restore = every_candidate()
    try:
        _, every = timed_eval(args.model, args.datapath, sample)
        _, parlai_way = timed_eval(args.model, args.datapath, sample + ["--precision", "fp32"])
    finally:
        restore()
    rows, whole = timed_eval(args.model, args.datapath)
    encoder_ms, one_context_ms = encoder_timings(args.datapath)
    summary = evaluate.summarize(["model"], {"model": rows}, evaluate.DEFAULT_RESAMPLES, 0)
    per_example = {"every candidate": every["loop"] / args.sample, "parlai": parlai_way["loop"] / args.sample}
    result = {
        "command": " ".join(["python benchmarks/eval_speed.py"] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model,
        "whole_test_examples": len(rows),
        "whole_test_loop_seconds": whole["loop"],
        "setup_seconds": whole["setup"],
        "sample_examples": args.sample,
        "sample_loop_seconds_every_candidate": every["loop"],
        "sample_loop_seconds_every_candidate_fp32": parlai_way["loop"],
        "every_candidate_whole_test_seconds_extrapolated": per_example["every candidate"] * TEST_EXAMPLES,
        "parlai_way_whole_test_seconds_extrapolated": per_example["parlai"] * TEST_EXAMPLES,
        "test": summary,
        "context_batch_ms": encoder_ms,
        "one_context_ms": one_context_ms,
    }
    result["speedup_whole_test"] = result["every_candidate_whole_test_seconds_extrapolated"] / whole["loop"]
    result["speedup_whole_test_vs_parlai_way"] = result["parlai_way_whole_test_seconds_extrapolated"] / whole["loop"]
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(os.path.join(args.out, "whole_test.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    print(evaluate.render(summary))
    print(
        f"whole test: {whole['loop'] / 60:.1f} min for {len(rows):,} examples (loading: {whole['setup']:.0f} s); "
        f"every candidate encoded: {result['every_candidate_whole_test_seconds_extrapolated'] / 60:.1f} min "
        f"extrapolated from {args.sample} examples: {result['speedup_whole_test']:.1f}x; ParlAI's way (every "
        f"candidate, float32): {result['parlai_way_whole_test_seconds_extrapolated'] / 60:.1f} min "
        f"extrapolated: {result['speedup_whole_test_vs_parlai_way']:.1f}x"
    )
    for timed in (encoder_ms, one_context_ms):
        ways = ", ".join(f"{way} {ms:.1f} ms" for way, ms in timed["ms"].items())
        print(f"{timed['batch'][0]} context(s) of up to {timed['batch'][1]} tokens, no gradients: {ways}")

if __name__ == "__main__":
    main()
