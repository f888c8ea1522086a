"""Print the path of CCC's fixed-candidates file, building the processed data if needed.

    python -m parlai_poly.tasks.ccc [--split test] [--datapath DIR]

The printed path goes to ``--fixed-candidates-path`` of a ranking agent evaluated with
``--eval-candidates fixed``.
"""
import argparse

from parlai_poly.errors import ParlaiPolyError

from .build import EVAL_SPLITS, default_datapath, fixed_candidates_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=EVAL_SPLITS, default="test")
    parser.add_argument("--datapath", default=None, help="ParlAI datapath (default: ParlAI's)")
    args = parser.parse_args(argv)
    try:
        print(fixed_candidates_path(args.datapath or default_datapath(), args.split))
    except ParlaiPolyError as e:  # a sentence and status 2, not a traceback
        parser.exit(2, f"parlai-poly: error: {e}\n")


if __name__ == "__main__":
    main()
