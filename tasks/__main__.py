"""``python -m parlai_poly.tasks``: put data where ParlAI 1.7.2's teachers read it, offline.

    prepare {convai2,dstc7,ubuntu} --from PATH --datapath DIR
        check official files fetched elsewhere (a folder, or the official archive) and lay
        them out with ParlAI's .built marker, so ParlAI never tries to download;
    fixtures {convai2,dstc7,ubuntu,all} --datapath DIR [--train N --valid N --test N --seed S]
        write small synthetic data sets in the same layouts, to try things offline.

Bad input exits with status 2 and one line on stderr, never a traceback: these commands are
run by people with a download in hand, who need to know which file and line to look at.
"""
import argparse
import sys
from typing import List, Optional

from . import fixtures
from .prepare import LAYOUTS, PrepareError, prepare

PROG = "python -m parlai_poly.tasks"
USAGE_ERROR = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the usage block before its error; keep only the error line."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    prep = commands.add_parser("prepare", help="lay out official data fetched elsewhere")
    prep.add_argument("task", choices=sorted(LAYOUTS))
    prep.add_argument("--from", dest="source", required=True, metavar="PATH",
                      help="folder holding the files, or the official archive (e.g. convai2_fix_723.tgz)")
    prep.add_argument("--datapath", required=True, metavar="DIR", help="ParlAI's --datapath")

    fix = commands.add_parser("fixtures", help="write small synthetic data sets")
    fix.add_argument("task", choices=sorted(LAYOUTS) + ["all"])
    fix.add_argument("--datapath", required=True, metavar="DIR", help="ParlAI's --datapath")
    defaults = fixtures.FixtureSizes()
    fix.add_argument("--train", type=positive_int, default=defaults.train, help="train examples")
    fix.add_argument("--valid", type=positive_int, default=defaults.valid, help="valid examples")
    fix.add_argument("--test", type=positive_int, default=defaults.test, help="test examples")
    fix.add_argument("--seed", type=int, default=0)
    return parser


def say(message: str) -> None:
    print(message, flush=True)


def run(args: argparse.Namespace) -> None:
    if args.command == "prepare":
        prepare(args.task, args.source, args.datapath, log=say)
        return
    sizes = fixtures.FixtureSizes(train=args.train, valid=args.valid, test=args.test)
    tasks = sorted(LAYOUTS) if args.task == "all" else [args.task]
    for task in tasks:
        say(f"{task} fixture:")
        fixtures.write_fixture(task, args.datapath, sizes, args.seed, log=say)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (PrepareError, OSError) as e:  # OSError: e.g. a datapath we may not write to
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
