"""The model zoo: cards, recipes, and zoo:parlai_poly/... paths from the plain `parlai` command."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import COLOURS

from parlai.scripts.train_model import setup_args as train_model_args

from parlai_poly import compat
from parlai_poly.errors import ZooError
from parlai_poly.zoo import recipe, registry

compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI parses any options here

BIN = os.path.dirname(sys.executable)


def run(*argv, env=None, ok=True):
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=600, env=env)
    assert (result.returncode == 0) == ok, (result.returncode, result.stderr[-3000:])
    return result.stdout + result.stderr


def write_card(folder, name, **front):
    front = dict(name=name, description="a test entry", backbone="tiny BERT", **front)
    text = f"---\n{yaml.safe_dump(front, sort_keys=False)}---\nA tiny entry for the tests.\n"
    path = os.path.join(folder, f"{name}.md")
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory, tiny_backbone, synthetic_task):
    """A private zoo (PARLAI_POLY_ZOO_CARDS) with a poly entry trained on the synthetic task,
    built by its recipe into a fresh datapath, as `python -m parlai_poly.zoo build` does."""
    cards = str(tmp_path_factory.mktemp("cards"))
    datapath = str(tmp_path_factory.mktemp("datapath"))
    task = dict(synthetic_task)
    train = dict(
        hf_model=tiny_backbone, poly_n_codes=4, batchsize=16, learningrate=1e-3, freeze_embeddings=False,
        warmup_updates=10, num_epochs=2, validation_every_n_epochs=-1, log_every_n_secs=1000, seed=3,
        **{k: v for k, v in task.items() if k != "task"},
    )
    evaluation = dict(task, datatype="test", batchsize=8)
    recipe_ = {"task": task["task"], "train": train, "responses": "train"}
    write_card(cards, "tiny_poly", agent="poly", recipe=recipe_, evaluation=evaluation, targets={"R@1/8": 0.5})
    write_card(cards, "tiny_untrained", agent="poly", recipe={"task": task["task"], "train": dict(train, max_train_steps=1)})
    env = dict(os.environ, **{registry.EXTRA_CARDS_ENV: cards})
    out = run(sys.executable, "-m", "parlai_poly.zoo", "build", "tiny_poly", "--datapath", datapath, env=env)
    return {"cards": cards, "datapath": datapath, "env": env, "task": task, "backbone": tiny_backbone, "build_output": out}


def task_args(task):
    return ["-t", task["task"], "--fromfile-datapath", task["fromfile_datapath"], "--fromfile-datatype-extension", "true"]


def test_shipped_cards_parse_and_their_recipes_are_valid_parlai_options():
    cards = registry.entries()
    assert {"minilm", "ccc_bi", "ccc_poly16", "ccc_poly64", "ccc_poly360", "ccc_cross"} <= set(cards)
    for card in cards.values():
        assert card.agent in ("bi", "poly", "cross") and card.description and card.body.strip()
        options = dict(card.recipe.get("options", {}), **(card.recipe.get("train") or {}))
        options.update(card.recipe.get("installed_options") or {})  # the installed model's own
        args = ["-m", f"parlai_poly.agents:{card.agent}", "-t", "parlai_poly.tasks.ccc"]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        # a misspelt option in a card fails here, not after an hour of training
        opt = train_model_args().parse_args(args)
        for key, value in options.items():
            assert opt[key] == value, (card.name, key)


def test_list_shows_every_entry():
    out = run(sys.executable, "-m", "parlai_poly.zoo", "list")
    for name in registry.entries():
        assert f"zoo:parlai_poly/{name}/model" in out


def test_bad_cards_name_the_file_and_the_problem(tmp_path):
    bad = write_card(str(tmp_path), "broken", agent="poly")  # neither files nor recipe
    with pytest.raises(ZooError, match="broken.md.*files or recipe"):
        registry.read_card(bad)
    other = write_card(str(tmp_path), "mismatch", agent="poly", recipe={"train": {}})
    os.rename(other, str(tmp_path / "renamed.md"))
    with pytest.raises(ZooError, match="renamed.md.*must match the file name"):
        registry.read_card(str(tmp_path / "renamed.md"))
    with pytest.raises(ZooError, match="no such entry.*ccc_poly16"):
        registry.get("nope")


def test_a_recipe_keeps_the_best_or_the_last_weights_and_nothing_else(tmp_path):
    assert registry.read_card(write_card(str(tmp_path), "last", agent="bi", recipe={"keep": "last", "train": {}})).recipe["keep"] == "last"
    with pytest.raises(ZooError, match=r"latest.md: recipe keep 'newest' is none of best, last"):
        registry.read_card(write_card(str(tmp_path), "latest", agent="bi", recipe={"keep": "newest", "train": {}}))


def test_the_valid_curve_ends_at_the_last_update_the_training_validated():
    periodic = [{"total_train_updates": n, "mrr": m} for n, m in ((288, 0.75), (576, 0.76))]
    final = {"total_train_updates": 700, "mrr": 0.74}  # the step limit fell between validations
    assert recipe.valid_points({"valid_reports": periodic, "final_valid_report": final}, "mrr") == [
        (288, 0.75), (576, 0.76), (700, 0.74)
    ]
    again = {"total_train_updates": 576, "mrr": 0.76}  # the same weights as the last validation
    assert recipe.valid_points({"valid_reports": periodic, "final_valid_report": again}, "mrr") == [(288, 0.75), (576, 0.76)]
    assert recipe.valid_points({"valid_reports": [], "final_valid_report": {}}, "mrr") == []


@pytest.mark.slow
@pytest.mark.parametrize("keep_last, installed_update", [(False, 4), (True, 13)])
def test_keep_last_installs_the_last_updates_weights_not_the_best_validations(
    tmp_path, tiny_backbone, synthetic_task, keep_last, installed_update
):
    """Validations at updates 4, 8 and 12 of 13, the first the best (fewest updates): ParlAI's
    rule installs update 4; keep-last installs update 13, which no validation saw."""
    from parlai.core.agents import create_agent_from_model_file

    from helpers import train_options
    from parlai_poly.progress import train_with_progress

    model_file = str(tmp_path / "model")
    options = train_options(
        "bi", tiny_backbone, synthetic_task, model_file, max_train_steps=13, validation_every_n_steps=4,
        validation_max_exs=16, validation_metric="total_train_updates", validation_metric_mode="min",
    )
    train_with_progress(keep_last, **options)
    assert create_agent_from_model_file(model_file)._number_training_updates == installed_update


@pytest.mark.slow
def test_recipe_build_installs_the_entry_and_eval_model_reproduces_its_figures(tiny_zoo):
    target = registry.install_dir(tiny_zoo["datapath"], "tiny_poly")
    assert recipe.is_installed(target)
    # no optimizer state; the per-example values of its evaluation, to pair other models with;
    # its default responses and their encodings (the candidate cache: tensors and manifest)
    cache = sorted(name for name in os.listdir(target) if name.startswith("model.cands-responses-"))
    assert [os.path.splitext(name)[1] for name in cache] == [".json", ".safetensors"]
    listed = recipe.KEEP + (recipe.EVALUATION_ROWS, recipe.MARKER, recipe.RESPONSES) + tuple(cache)
    assert sorted(os.listdir(target)) == sorted(listed)
    recorded = json.load(open(os.path.join(target, recipe.MARKER)))
    assert recorded["metrics"]["R@1/8"] > 0.5  # learned: chance is 0.125
    low, high = recorded["intervals"]["R@1/8"]
    assert low <= recorded["metrics"]["R@1/8"] <= high and recorded["metrics"]["exs"] == 40
    # the console shows the training's bar; ParlAI's logs and option dump are in the log file
    build_output = tiny_zoo["build_output"]
    log_file = os.path.join(tiny_zoo["datapath"], "models", "parlai_poly.building", "tiny_poly.log")
    assert "Training: 100%" in build_output and f"ParlAI's log: {log_file}" in build_output
    assert "poly_n_codes:" not in build_output and "poly_n_codes: 4" in open(log_file).read()
    # a fresh `parlai` process resolves zoo:parlai_poly/... before importing any of our code
    out = run(
        os.path.join(BIN, "parlai"), "eval_model", "-mf", "zoo:parlai_poly/tiny_poly/model", *task_args(tiny_zoo["task"]),
        "-dt", "test", "-bs", "8", "-dp", tiny_zoo["datapath"], "--report-filename", os.path.join(target, "..", "report.json"),
        env=tiny_zoo["env"],
    )
    assert "Finished evaluating" in out
    report = json.load(open(os.path.join(target, "..", "report.json")))["report"]
    assert report["R@1/8"] == pytest.approx(recorded["metrics"]["R@1/8"], abs=1e-4)


@pytest.mark.slow
def test_interactive_with_a_zoo_entry_answers_from_its_default_responses(tiny_zoo):
    """The build installed the task's train responses, deduplicated and encoded: interactive
    uses them (no candidates built from the task) and reuses the cache."""
    target = registry.install_dir(tiny_zoo["datapath"], "tiny_poly")
    responses = open(os.path.join(target, recipe.RESPONSES)).read().splitlines()
    assert sorted(responses) == sorted({f"it is {c}" for c in COLOURS[:8]})  # 480 examples, 8 distinct
    opt = json.load(open(os.path.join(target, "model.opt")))
    assert opt["fixed_candidates_path"] == os.path.join(target, recipe.RESPONSES)
    result = subprocess.run(
        [os.path.join(BIN, "parlai"), "interactive", "-mf", "zoo:parlai_poly/tiny_poly/model", "-dp", tiny_zoo["datapath"]],
        input="today the cat please\n", capture_output=True, text=True, timeout=600, env=tiny_zoo["env"],
    )
    out = result.stdout + result.stderr
    assert "Loaded 8 candidate encodings" in out and "Encoding" not in out  # the cache, as built
    assert "it is red" in out  # the cat's colour in the synthetic task


@pytest.mark.slow
def test_a_build_only_to_be_measured_skips_the_default_responses(tiny_zoo, tmp_path):
    datapath = str(tmp_path / "seed4")
    run(sys.executable, "-m", "parlai_poly.zoo", "build", "tiny_poly", "--seed", "4", "--no-responses", "-dp", datapath, env=tiny_zoo["env"])
    target = registry.install_dir(datapath, "tiny_poly")
    assert recipe.is_installed(target) and os.path.isfile(os.path.join(target, recipe.EVALUATION_ROWS))
    assert not any(name.startswith(("responses", "model.cands-")) for name in os.listdir(target))
    assert not json.load(open(os.path.join(target, "model.opt"))).get("fixed_candidates_path")


@pytest.mark.slow
def test_a_cross_entry_answers_interactive_through_its_retriever(tiny_zoo, tmp_path):
    """A cross-encoder entry whose recipe installs --retrieve-model-file: the build builds the
    bi-encoder it names, warms that retriever's cache of the cross entry's responses, and
    interactive answers from them without encoding anything."""
    front = yaml.safe_load(open(os.path.join(tiny_zoo["cards"], "tiny_poly.md")).read().split("---")[1])
    train = {k: v for k, v in front["recipe"]["train"].items() if k != "poly_n_codes"}
    common = {"task": tiny_zoo["task"]["task"], "responses": "train"}
    write_card(tiny_zoo["cards"], "tiny_bi", agent="bi", recipe=dict(common, train=train))
    installed = {"retrieve_model_file": "zoo:parlai_poly/tiny_bi/model", "retrieve_top_k": 3}
    cross_train = dict(train, num_epochs=1, candidates="inline", batchsize=8)
    write_card(tiny_zoo["cards"], "tiny_cross", agent="cross", recipe=dict(common, train=cross_train, installed_options=installed))
    datapath = str(tmp_path / "fresh")
    out = run(sys.executable, "-m", "parlai_poly.zoo", "build", "tiny_cross", "-dp", datapath, env=tiny_zoo["env"])
    assert "tiny_cross needs zoo:parlai_poly/tiny_bi: building it first" in out
    cross = registry.install_dir(datapath, "tiny_cross")
    assert json.load(open(os.path.join(cross, "model.opt")))["retrieve_model_file"] == installed["retrieve_model_file"]
    caches = lambda: sorted(os.listdir(registry.install_dir(datapath, "tiny_bi")))  # noqa: E731
    warmed = caches()
    assert sum(name.startswith("model.cands-responses-") and name.endswith(".json") for name in warmed) == 2  # its own, the cross entry's
    result = subprocess.run(
        [os.path.join(BIN, "parlai"), "interactive", "-mf", "zoo:parlai_poly/tiny_cross/model", "-dp", datapath],
        input="today the cat please\n", capture_output=True, text=True, timeout=600, env=tiny_zoo["env"],
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "Encoding" not in out, out[-3000:]
    assert "it is " in out  # an answer, from the responses
    assert caches() == warmed  # nothing new encoded


@pytest.mark.slow
def test_init_model_from_the_zoo_fine_tunes_a_new_model_file(tiny_zoo, tmp_path):
    model_file = str(tmp_path / "mine")
    out = run(
        os.path.join(BIN, "parlai"), "train_model", "-m", "parlai_poly.agents:poly", "--init-model", "zoo:parlai_poly/tiny_poly/model",
        "-mf", model_file, *task_args(tiny_zoo["task"]), "-dp", tiny_zoo["datapath"], "--max-train-steps", "2",
        "-bs", "16", env=tiny_zoo["env"],  # the architecture comes with the init model
    )
    assert os.path.isfile(model_file) and "test:" in out
    with open(model_file + ".trainstats") as f:
        assert "R@1/8" in json.load(f)["final_test_report"]  # evaluated with our metrics


@pytest.mark.slow
def test_training_into_a_zoo_path_says_what_to_do_instead(tiny_zoo):
    out = run(
        os.path.join(BIN, "parlai"), "train_model", "-m", "parlai_poly.agents:poly", "-mf", "zoo:parlai_poly/tiny_poly/model",
        *task_args(tiny_zoo["task"]), "-dp", tiny_zoo["datapath"], "--max-train-steps", "2", env=tiny_zoo["env"], ok=False,
    )
    assert "--init-model zoo:parlai_poly/tiny_poly/model" in out and "Traceback" not in out


@pytest.mark.slow
def test_a_build_builds_the_entries_its_recipe_names_first(tiny_zoo, tmp_path):
    train = dict(yaml.safe_load(open(os.path.join(tiny_zoo["cards"], "tiny_poly.md")).read().split("---")[1])["recipe"]["train"])
    train.update(init_model="zoo:parlai_poly/tiny_poly/model", max_train_steps=2)
    write_card(tiny_zoo["cards"], "tiny_child", agent="poly", recipe={"task": tiny_zoo["task"]["task"], "train": train})
    datapath = str(tmp_path / "fresh")
    out = run(sys.executable, "-m", "parlai_poly.zoo", "build", "tiny_child", "-dp", datapath, env=tiny_zoo["env"])
    assert "tiny_child needs zoo:parlai_poly/tiny_poly: building it first" in out
    assert recipe.is_installed(registry.install_dir(datapath, "tiny_poly"))
    assert recipe.is_installed(registry.install_dir(datapath, "tiny_child"))

    write_card(tiny_zoo["cards"], "tiny_loop", agent="poly", recipe={"task": "x", "train": {"init_model": "zoo:parlai_poly/tiny_loop/model"}})
    out = run(sys.executable, "-m", "parlai_poly.zoo", "build", "tiny_loop", "-dp", datapath, env=tiny_zoo["env"], ok=False)
    assert "tiny_loop.md: its recipe needs tiny_loop, which needs tiny_loop: a cycle." in out


@pytest.mark.slow
def test_an_installed_entry_runs_from_python(tiny_zoo):
    from parlai.core.agents import create_agent_from_model_file

    model_file = os.path.join(registry.install_dir(tiny_zoo["datapath"], "tiny_poly"), "model")
    agent = create_agent_from_model_file(model_file, {"datapath": tiny_zoo["datapath"]})
    agent.observe({"text": "the cat", "label_candidates": ["it is red", "it is blue"], "episode_done": True})
    assert sorted(agent.act()["text_candidates"]) == ["it is blue", "it is red"]


@pytest.mark.slow
def test_the_python_api_finds_a_zoo_entry_in_the_datapath_it_is_given(tiny_zoo, monkeypatch):
    """ParlAI resolves zoo: paths in its own default datapath whatever the overrides say;
    ``Ranker.load(..., datapath=)`` looks where it is told, and ranks the entry's responses."""
    from parlai_poly import Ranker

    monkeypatch.setenv(registry.EXTRA_CARDS_ENV, tiny_zoo["cards"])
    ranker = Ranker.load("zoo:parlai_poly/tiny_poly/model", fixed_candidates=True, datapath=tiny_zoo["datapath"])
    assert ranker.agent.opt["model_file"] == os.path.join(registry.install_dir(tiny_zoo["datapath"], "tiny_poly"), "model")
    responses = os.path.join(registry.install_dir(tiny_zoo["datapath"], "tiny_poly"), "responses.txt")
    with open(responses) as f:
        assert ranker.fixed_candidates == f.read().splitlines()  # the entry's default responses
    top = ranker.rank("today the cat please", top_k=3)
    assert [t for t, _ in top] == [t for t, _ in ranker.rank("today the cat please", ranker.fixed_candidates, top_k=3)]


@pytest.mark.slow
def test_an_entry_not_built_yet_gives_the_build_command(tiny_zoo):
    out = run(
        os.path.join(BIN, "parlai"), "eval_model", "-mf", "zoo:parlai_poly/tiny_untrained/model", *task_args(tiny_zoo["task"]),
        "-dp", tiny_zoo["datapath"], env=tiny_zoo["env"], ok=False,
    )
    assert "python -m parlai_poly.zoo build tiny_untrained" in out and "Traceback" not in out
    assert not os.path.exists(registry.install_dir(tiny_zoo["datapath"], "tiny_untrained"))


@pytest.mark.slow
def test_an_unknown_entry_lists_the_real_ones(tiny_zoo):
    out = run(
        os.path.join(BIN, "parlai"), "eval_model", "-mf", "zoo:parlai_poly/no_such_model/model", *task_args(tiny_zoo["task"]),
        "-dp", tiny_zoo["datapath"], env=tiny_zoo["env"], ok=False,
    )
    assert "no such entry" in out and "tiny_poly" in out and "ccc_poly16" in out


@pytest.mark.slow
def test_the_backbone_entry_is_assembled_on_first_use_without_download(tmp_path, synthetic_task):
    datapath = str(tmp_path)
    out = run(
        os.path.join(BIN, "parlai"), "eval_model", "-mf", "zoo:parlai_poly/minilm/model", *task_args(synthetic_task),
        "-dt", "test", "-dp", datapath, "-bs", "20", "--report-filename", str(tmp_path / "report.json"),
    )
    assert "Finished evaluating" in out
    with open(tmp_path / "report.json") as f:  # whatever layout ParlAI printed it in (pandas or not)
        assert "R@1/8" in json.load(f)["report"]
    target = registry.install_dir(datapath, "minilm")
    assert recipe.is_installed(target)
    meta = json.load(open(os.path.join(target, recipe.MARKER)))
    assert meta["source"] == "recipe" and meta["metrics"] == {}


@pytest.fixture
def file_server(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving a folder (what a published zoo file looks like)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow
def test_a_downloadable_entry_is_fetched_checked_and_evaluated_by_plain_parlai(tiny_zoo, file_server, tmp_path):
    import hashlib
    import tarfile

    folder, url = file_server
    built = registry.install_dir(tiny_zoo["datapath"], "tiny_poly")
    archive = folder / "tiny_poly.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in recipe.KEEP:
            tar.add(os.path.join(built, name), arcname=name)
    data = archive.read_bytes()
    files = [{"url": f"{url}/tiny_poly.tar.gz", "name": archive.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "extract": True}]
    write_card(tiny_zoo["cards"], "tiny_download", agent="poly", files=files)
    datapath = str(tmp_path / "fresh_datapath")
    report_file = str(tmp_path / "report.json")
    run(
        os.path.join(BIN, "parlai"), "eval_model", "-mf", "zoo:parlai_poly/tiny_download/model", *task_args(tiny_zoo["task"]),
        "-dt", "test", "-bs", "8", "-dp", datapath, "--report-filename", report_file, env=tiny_zoo["env"],
    )
    expected = json.load(open(os.path.join(built, recipe.MARKER)))["metrics"]["R@1/8"]
    assert json.load(open(report_file))["report"]["R@1/8"] == pytest.approx(expected, abs=1e-4)

    # the server now has a corrupted file: a fresh datapath refuses it and installs nothing
    archive.write_bytes(data[:-10] + b"corrupted!")
    other = str(tmp_path / "other_datapath")
    out = run(
        os.path.join(BIN, "parlai"), "eval_model", "-mf", "zoo:parlai_poly/tiny_download/model", *task_args(tiny_zoo["task"]),
        "-dp", other, env=tiny_zoo["env"], ok=False,
    )
    assert "sha256" in out and "Traceback" not in out
    assert not os.path.exists(registry.install_dir(other, "tiny_download"))


@pytest.mark.slow
def test_init_model_brings_its_architecture_unless_the_command_line_says_otherwise(tiny_zoo, tmp_path):
    from parlai.core.agents import create_agent
    from parlai.core.params import ParlaiParser

    init = os.path.join(registry.install_dir(tiny_zoo["datapath"], "tiny_poly"), "model")
    base = ["-m", "parlai_poly.agents:poly", "--init-model", init, *task_args(tiny_zoo["task"])]
    agent = create_agent(ParlaiParser(True, True).parse_args(base + ["-mf", str(tmp_path / "a")]))
    # the tiny backbone and 4 codes come from the init model's .opt, and its weights load
    assert agent.opt["hf_model"] == tiny_zoo["backbone"] and agent.unwrapped_model.n_codes == 4
    with pytest.raises(Exception, match="do not fit"):
        create_agent(ParlaiParser(True, True).parse_args(base + ["-mf", str(tmp_path / "b"), "--poly-n-codes", "8"]))



def test_metrics_print_in_a_fixed_order_with_counts_as_integers():
    from parlai_poly.zoo.__main__ import metric_line

    line = metric_line({"mrr": 0.7301, "exs": 1024.0, "hits@1": 0.6, "R@5/20": 0.86, "R@1/20": 0.625})
    assert line == "R@1/20 0.625, R@5/20 0.860, mrr 0.730, exs 1024, hits@1 0.600"
