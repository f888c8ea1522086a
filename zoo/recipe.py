"""Build a zoo entry from its recipe: train (or just assemble) it, evaluate it, install it.

The build works in ``<datapath>/models/parlai_poly.building/<entry>``, outside the zoo's own
directory (where agents refuse to train) but on the same disk, so an interrupted build
resumes where ParlAI's last checkpoint left it (run the same command again) and users never
see half an entry; the finished entry is renamed into place with its evaluation recorded.
Entries a recipe names by zoo path (``init_model: zoo:parlai_poly/ccc_bi/model``) are built
first when they are not installed.
"""
import json
import os
import platform
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

from parlai_poly.errors import ZooError
from parlai_poly.storage import atomic_write, atomic_write_text, replace_dir
from parlai_poly.zoo.registry import Card, get, install_dir
from parlai_poly.zoo_hook import ZOO_PREFIX

from parlai_poly.zoo.fetch import MARKER  # written last: an install directory without it is incomplete
from parlai_poly.zoo.fetch import foreign_target_error, installed_by_us
KEEP = ("model", "model.opt", "model.dict")  # what an installed entry needs
# what a build adds when it has them: the evaluation's per-example values (to pair other
# models with, by ``python -m parlai_poly.evaluate``) and the valid curve of its training
EVALUATION_ROWS, VALID_CURVE = "evaluation.jsonl", "valid_curve.png"
PUBLISHED = KEEP + (EVALUATION_ROWS, VALID_CURVE)
# a recipe's ``installed_options``: written into the installed model's options, so `parlai
# interactive -mf zoo:...` gets them without flags (a cross-encoder's --retrieve-model-file)
# a recipe with ``responses: train``: the task's train responses, deduplicated, installed
# beside the model as its default candidates (interactive answers at once)
RESPONSES = "responses.txt"


def default_datapath() -> str:
    """ParlAI's own default, so `parlai eval_model -mf zoo:...` without -dp finds the entry."""
    from parlai.core.params import ParlaiParser

    return ParlaiParser(False, False).parse_args([])["datapath"]


def is_installed(target: str) -> bool:
    return os.path.isfile(os.path.join(target, MARKER)) and os.path.isfile(os.path.join(target, "model"))


def agent_module(card: Card) -> str:
    return f"parlai_poly.agents:{card.agent}"


def train(card: Card, model_file: str, datapath: str, seed: Optional[int], verbose: bool = False) -> Dict[str, Any]:
    """Train by the recipe, with a progress bar; ParlAI's own logs go to MODEL.log beside the
    staging folder (kept after the install: the training's full record)."""
    from parlai_poly import compat
    from parlai_poly.progress import parlai_log_file, train_with_progress

    compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything

    recipe = card.recipe
    options = dict(recipe.get("options", {}), **recipe["train"])
    if seed is not None:
        options["seed"] = seed
    log_file = os.path.dirname(model_file) + ".log"
    print(f"{card.name}: training by its recipe (ParlAI's log: {log_file}; rerun to resume)", flush=True)
    started = time.time()
    with parlai_log_file(log_file, verbose):
        keep_last = recipe.get("keep", "best") == "last"
        train_with_progress(keep_last, task=recipe["task"], model=agent_module(card), model_file=model_file, datapath=datapath, **options)
    record = training_record(model_file)
    seconds = record.pop("train_seconds", None) or time.time() - started
    return {"train_seconds": round(seconds), **record, "train_options": options}


def training_record(model_file: str) -> Dict[str, Any]:
    """From ParlAI's MODEL.trainstats, which a resumed build carries on from its checkpoint
    (the whole training, not just this run): its clock, updates and epochs of the task."""
    try:
        with open(model_file + ".trainstats", encoding="utf-8") as f:
            stats = json.load(f)
        return {"train_seconds": float(stats["train_time"]), "updates": int(stats["train_steps"]), "epochs": round(float(stats["total_epochs"]), 4)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def assemble(card: Card, model_file: str, datapath: str) -> Dict[str, Any]:
    """An entry with no training: the agent as its options build it, saved."""
    from parlai.core.agents import create_agent
    from parlai.core.params import ParlaiParser

    from parlai_poly import compat

    compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything

    args = ["-m", agent_module(card), "-mf", model_file, "-dp", datapath]
    for key, value in card.recipe.get("options", {}).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    create_agent(ParlaiParser(True, True).parse_args(args)).save(model_file)
    return {"train_seconds": 0, "train_options": {}}


def evaluate(card: Card, model_file: str, datapath: str) -> Dict[str, Any]:
    """The card's metrics with 95% intervals by conversation, as ``python -m
    parlai_poly.evaluate`` gives them; the per-example values go to EVALUATION_ROWS."""
    from types import SimpleNamespace

    from parlai_poly import evaluate as evaluation

    options = dict(card.evaluation)
    args = SimpleNamespace(
        task=options.pop("task"), datatype=options.pop("datatype", "test"),
        batchsize=options.pop("batchsize", 32), datapath=datapath,
    )
    parlai_args = [str(a) for k, v in options.items() for a in (f"--{k.replace('_', '-')}", v)]
    rows = evaluation.evaluate_model(model_file, args, parlai_args)
    path = os.path.join(os.path.dirname(model_file), EVALUATION_ROWS)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    summary = evaluation.summarize(["model"], {"model": rows}, evaluation.DEFAULT_RESAMPLES, 0)
    metrics = {"exs": summary["examples"], "conversations": summary["conversations"]}
    intervals = {}
    for name, value in summary["models"]["model"].items():
        metrics[name] = round(value["mean"], 4)
        intervals[name] = [round(value["low"], 4), round(value["high"], 4)]
    return {"metrics": metrics, "intervals": intervals}


def eval_command(card: Card) -> str:
    """The user's command that reproduces the card's figures, with their intervals."""
    options = dict(card.evaluation)
    head = f"-t {options.pop('task')} -dt {options.pop('datatype', 'test')}"
    rest = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
    return f"python -m parlai_poly.evaluate {card.zoo_path} {head} {rest}".rstrip()


def plot_valid_curve(card: Card, model_file: str) -> None:
    """VALID_CURVE from the training's valid reports (ParlAI's MODEL.trainstats), if any."""
    stats_path = model_file + ".trainstats"
    if not os.path.isfile(stats_path):
        return
    with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    reports = stats.get("valid_reports") or []
    metric = next((k for k in (card.targets or {}) if reports and k in reports[0]), "mrr")
    points = valid_points(stats, metric)
    if len(points) < 2:  # only the end-of-training validation: no curve to draw
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points), marker="o")
    ax.set_xlabel("updates")
    ax.set_ylabel(f"valid {metric}")
    ax.set_title(f"{card.name}: valid {metric} during training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(os.path.join(os.path.dirname(model_file), VALID_CURVE), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def valid_points(stats: Dict[str, Any], metric: str) -> List[Tuple[int, float]]:
    """(update, metric) of each validation in ParlAI's trainstats ``stats``: the periodic ones,
    then the end-of-training one where it saw later weights (a step limit between two
    validations: the last update's weights, which a keep-last recipe installs)."""
    reports = list(stats.get("valid_reports") or []) + [stats.get("final_valid_report") or {}]
    points: List[Tuple[int, float]] = []
    for report in reports:
        if metric in report and "total_train_updates" in report:
            if not points or report["total_train_updates"] > points[-1][0]:
                points.append((report["total_train_updates"], report[metric]))
    return points


def hardware() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"


def build(
    card: Card,
    datapath: Optional[str] = None,
    seed: Optional[int] = None,
    evaluate_it: bool = True,
    building: Tuple[str, ...] = (),
    verbose: bool = False,
    responses: bool = True,
) -> Dict[str, Any]:
    """Train or assemble ``card``'s entry, evaluate it and install it; returns its results.

    ``building``: the entries whose builds are waiting for this one (to refuse a cycle);
    ``verbose``: ParlAI's training logs on the console too; ``responses``: install the
    recipe's default responses (False: a build only measured, such as another seed's)."""
    datapath = datapath or default_datapath()
    build_dependencies(card, datapath, building)
    target = install_dir(datapath, card.name)
    staging = os.path.join(datapath, "models", ZOO_PREFIX + ".building", card.name)
    os.makedirs(staging, exist_ok=True)
    model_file = os.path.join(staging, "model")
    info = train(card, model_file, datapath, seed, verbose) if card.recipe.get("train") else assemble(card, model_file, datapath)
    if card.recipe.get("train"):
        plot_valid_curve(card, model_file)
    measured = evaluate(card, model_file, datapath) if evaluate_it and card.evaluation else {"metrics": {}}
    # optimizer state, checkpoints, caches: not published (kept until now so that a build
    # stopped during evaluation resumes instead of training again)
    for name in os.listdir(staging):
        if name not in PUBLISHED:
            path = os.path.join(staging, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    results = {
        **measured,
        "evaluation": eval_command(card) if card.evaluation else None,
        "seed": seed,
        "hardware": hardware(),
        **info,
    }
    atomic_write_text(os.path.join(staging, MARKER), json.dumps({"entry": card.name, "source": "recipe", **results}, indent=2) + "\n")
    install_entry(staging, target)
    install_options(card, target)
    if card.recipe.get("responses") and responses:
        install_responses(card, target, datapath)
    return results


def dependencies(card: Card) -> List[str]:
    """The entries a recipe's options name by zoo path: an --init-model, a hard-negative miner."""
    prefix = f"zoo:{ZOO_PREFIX}/"
    options = dict(card.recipe.get("options", {}), **(card.recipe.get("train") or {}))
    options.update({f"installed_{k}": v for k, v in (card.recipe.get("installed_options") or {}).items()})
    named = (value[len(prefix):].split("/")[0] for value in options.values() if str(value).startswith(prefix))
    return sorted(set(named))


def build_dependencies(card: Card, datapath: str, building: Tuple[str, ...] = ()) -> None:
    """Build, by their own recipes, the entries ``card`` needs that are not installed yet.

    Downloaded entries are left to the zoo hook, which fetches them when ParlAI asks."""
    for name in dependencies(card):
        if name in building + (card.name,):
            raise ZooError(f"{card.path}: its recipe needs {name}, which needs {card.name}: a cycle.")
        needed = get(name)
        if needed.recipe and not is_installed(install_dir(datapath, name)):
            print(f"{card.name} needs zoo:{ZOO_PREFIX}/{name}: building it first", flush=True)
            build(needed, datapath, building=building + (card.name,))


def install_entry(staged: str, target: str) -> None:
    """Put a built entry in place; only an earlier install of ours (or nothing) is replaced."""
    what = f"the zoo entry {os.path.basename(target)}"
    replace_dir(staged, target, installed_by_us, lambda path: foreign_target_error(path, what))


def install_options(card: Card, target: str) -> None:
    """The recipe's ``installed_options``, written into the installed model's options."""
    options = card.recipe.get("installed_options")
    if not options:
        return
    opt_path = os.path.join(target, "model.opt")
    with open(opt_path, encoding="utf-8") as f:
        opt = json.load(f)
    atomic_write_text(opt_path, json.dumps({**opt, **options}, indent=4) + "\n")


def install_responses(card: Card, target: str, datapath: str) -> None:
    """The entry's default response set: the recipe task's train responses, deduplicated,
    written beside the model, named in its options as ``fixed_candidates_path`` (so `parlai
    interactive -mf zoo:...` uses it without building candidates from the task) and encoded
    once into the checked candidate cache beside the model. Any --fixed-candidates-path given
    on the command line still replaces it."""
    from parlai_poly.loading import load_agent

    path = os.path.abspath(os.path.join(target, RESPONSES))  # the options must hold from any folder
    texts = task_responses(card, datapath, card.recipe["responses"])
    if not texts:
        raise ZooError(f"{card.path}: responses: {card.recipe['responses']} found no labels in {card.recipe['task']}.")
    atomic_write_text(path, "".join(text + "\n" for text in texts))
    opt_path = os.path.join(target, "model.opt")
    with open(opt_path, encoding="utf-8") as f:
        opt = json.load(f)
    opt["fixed_candidates_path"] = path
    atomic_write_text(opt_path, json.dumps(opt, indent=4) + "\n")
    print(f"{card.name}: {len(texts):,} default responses in {path}; encoding them once", flush=True)
    overrides = {"eval_candidates": "fixed", "fixed_candidates_path": path, "datatype": "valid", "datapath": datapath}
    agent = load_agent(os.path.join(target, "model"), overrides)  # a bi/poly: builds the cache beside the model
    if opt.get("retrieve_model_file"):
        # a retriever encodes the responses into its own cache when first asked: ask it now
        agent.observe({"text": "hello", "episode_done": True})
        agent.act()


def task_responses(card: Card, datapath: str, split: str) -> List[str]:
    """Every distinct label of the recipe task's ``split``, in the order the teacher gives them."""
    from parlai.core.params import ParlaiParser

    from parlai_poly import compat
    from parlai_poly.candidate_file import task_labels

    compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything
    args = ["-t", card.recipe["task"], "-m", agent_module(card), "-dp", datapath]
    train = card.recipe.get("train") or {}
    for key, value in train.items():  # the task's own options (e.g. a fromfile path) are among them
        if key.startswith(("fromfile_", "ccc_")):
            args += [f"--{key.replace('_', '-')}", str(value)]
    return task_labels(ParlaiParser(True, True).parse_args(args), split)
