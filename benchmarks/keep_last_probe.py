"""Issue 16: does keeping the last update beat keeping the best of the 800-example validations?

    python benchmarks/keep_last_probe.py [--entry ccc_bi] [--datapath data_fixed] [--out runs/keep_last] \\
        [--against docs/zoo/ccc_bi/evaluation_2026-12-04_bf16_rebuild.jsonl]

Trains ENTRY by its recipe and seed under ParlAI's rule (``keep: best``) with the weights also
saved after every validation, so one run gives both the update its valid sample keeps (OUT/model)
and the last validated one (OUT/last, update 1,620 of the bi/poly recipes). Then evaluates both
on the whole CCC test, paired with --against (per-example values of an earlier build, e.g. the
same seed's that kept update 900); the values and summary.json go to OUT/eval. Resumable: rerun
to continue the training. About 35 minutes on 2 cores with AMX, 60 without.
"""
import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from parlai_poly import evaluate  # noqa: E402
from parlai_poly.zoo import recipe, registry  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", default="ccc_bi")
    parser.add_argument("--datapath", default="data_fixed")
    parser.add_argument("--out", default="runs/keep_last")
    parser.add_argument("--against", default="docs/zoo/ccc_bi/evaluation_2026-12-04_bf16_rebuild.jsonl")
    args = parser.parse_args(argv)
    card = registry.get(args.entry)
    card.recipe.update(keep="best", train=dict(card.recipe["train"], save_after_valid=True))
    os.makedirs(args.out, exist_ok=True)
    best, last = os.path.join(args.out, "model"), os.path.join(args.out, "last")
    if not os.path.isfile(best + ".test"):  # ParlAI's final test report: the training is over
        recipe.train(card, best, args.datapath, seed=None)
    for suffix in ("", ".opt", ".dict"):  # saved after the last validation
        shutil.copyfile(best + ".checkpoint" + suffix, last + suffix)
    evaluate.main([args.against, best, last, "-t", "parlai_poly.tasks.ccc", "-dt", "test", "-dp", args.datapath,
                   "-bs", "32", "--out", os.path.join(args.out, "eval")])


if __name__ == "__main__":
    main()
