"""python -m parlai_poly.zoo {list,show,build} — the model zoo from the command line."""
import argparse
import json
import sys

from parlai_poly.errors import ParlaiPolyError
from parlai_poly.zoo import recipe, registry


# the order a reader compares entries in; any other metric follows, by name
METRIC_ORDER = ("R@1/20", "R@5/20", "mrr", "exs", "conversations")
COUNTS = ("exs", "conversations")  # whole numbers, whatever type the card stored them as


def metric_line(metrics, intervals=None) -> str:
    """'R@1/20 0.625 [0.611, 0.639], mrr 0.730, exs 13331': a fixed order, each metric's
    95% interval where measured, counts as integers."""
    order = {name: i for i, name in enumerate(METRIC_ORDER)}
    names = sorted(metrics, key=lambda k: (order.get(k, len(order)), k))
    return ", ".join(_metric(k, metrics[k], (intervals or {}).get(k)) for k in names)


def _metric(name, value, interval=None) -> str:
    if name in COUNTS and isinstance(value, (int, float)):
        return f"{name} {int(round(value))}"
    text = f"{name} {value:.3f}" if isinstance(value, float) else f"{name} {value}"
    return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def cmd_list(args) -> None:
    cards = registry.entries()
    width = max(len(c.zoo_path) for c in cards.values())
    for card in cards.values():
        print(f"{card.zoo_path:{width}s}  {card.agent:5s}  {card.source:18s}  {card.description}")
        measured = card.results.get("metrics")
        if measured:
            print(f"{'':{width}s}  measured: {metric_line(measured, card.results.get('intervals'))}")


def cmd_show(args) -> None:
    card = registry.get(args.entry)
    print(f"# {card.zoo_path}\n")
    with open(card.path, encoding="utf-8") as f:
        print(f.read().split("\n---\n", 1)[1].strip())
    if card.targets:
        print(f"\ntargets: {metric_line(card.targets)}")
    measured = card.results
    if measured.get("metrics"):
        minutes = measured.get("train_seconds", 0) / 60
        print(f"measured: {metric_line(measured['metrics'], measured.get('intervals'))}")
        print(f"trained: {minutes:.0f} min on {measured.get('hardware')}, options {measured.get('train_options')}")
    datapath = args.datapath or recipe.default_datapath()
    target = registry.install_dir(datapath, card.name)
    state = "installed" if recipe.is_installed(target) else "not installed"
    print(f"\n{state} at {target}")
    if card.evaluation:
        print(f"reproduce: {recipe.eval_command(card)}")


def cmd_build(args) -> None:
    card = registry.get(args.entry)
    if not card.recipe:
        raise ParlaiPolyError(f"{card.zoo_path} is downloaded, not built: it has no recipe.")
    results = recipe.build(card, args.datapath, seed=args.seed, verbose=args.verbose, responses=args.responses)
    print(json.dumps(results, indent=2))
    print(f"\nmetrics: {metric_line(results['metrics'], results.get('intervals'))}\nreproduce: {results['evaluation']}")
    if args.record:
        registry.write_results(card, results)
        print(f"recorded in {card.path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parlai_poly.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the entries, their agent, source and measured metrics")
    show = sub.add_parser("show", help="an entry's model card and install state")
    show.add_argument("entry")
    show.add_argument("--datapath", "-dp", default=None)
    build = sub.add_parser("build", help="train an entry by its recipe, evaluate and install it")
    build.add_argument("entry")
    build.add_argument("--datapath", "-dp", default=None, help="default: ParlAI's own datapath")
    build.add_argument("--seed", type=int, default=None)
    build.add_argument("--verbose", action="store_true", help="ParlAI's training logs on the console too (else in a log file)")
    build.add_argument("--record", action="store_true", help="write the results into the card (maintainers)")
    build.add_argument(
        "--no-responses", dest="responses", action="store_false",
        help="skip encoding the recipe's default responses (a build only to be measured, e.g. another --seed)",
    )
    args = parser.parse_args(argv)
    try:
        {"list": cmd_list, "show": cmd_show, "build": cmd_build}[args.command](args)
    except ParlaiPolyError as e:
        print(f"parlai-poly: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
