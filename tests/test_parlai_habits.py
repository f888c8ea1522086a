"""ParlAI habits on our model files: --tensorboard-log, multiprocessing_eval on CPU, and the two
commands that cannot handle a ranker in safetensors (vacuum, torchscript) refusing by name."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from parlai.scripts.train_model import TrainModel

from helpers import train_options
from parlai_poly.errors import ModelFileError

OUR_METRICS = ("R_1/8", "R_2/8", "mrr", "rank", "codes_cos", "codes_entropy")  # ParlAI writes R@1/8 as R_1/8


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone, synthetic_task):
    """A poly-encoder half trained (R@1/8 well between chance and 1), logging to tensorboard."""
    model_file = str(tmp_path_factory.mktemp("poly") / "model")
    TrainModel.main(**train_options(
        "poly", tiny_backbone, synthetic_task, model_file, num_epochs=0.5,
        validation_every_n_epochs=0.25, log_every_n_steps=5, tensorboard_log=True,
    ))
    return model_file


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logdir)
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def parlai(*args, timeout=300):
    """(exit status, output) of the `parlai` command, on CPU even where a GPU is present."""
    command = [os.path.join(os.path.dirname(sys.executable), "parlai"), *map(str, args)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    # its own session, so a hung run's spawned workers die with it
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"parlai {args[0]} did not exit within {timeout} s; its last output:\n" + output[-3000:])
    return process.returncode, output


def reported(*args, report_file):
    """The report `parlai ARGS --report-filename REPORT_FILE` saved (stdout's report is a table
    where pandas is installed, rounded to 4 digits)."""
    status, output = parlai(*args, "--report-filename", report_file)
    assert status == 0, output[-3000:]
    with open(report_file) as f:
        return json.load(f)["report"]


def task_args(task):
    return ["-t", task["task"], "--fromfile-datapath", task["fromfile_datapath"], "--fromfile-datatype-extension", "true"]


@pytest.mark.slow
def test_tensorboard_log_of_training_has_our_metrics(trained):
    logged = scalars(trained + ".tensorboard")
    for metric in OUR_METRICS:
        assert logged.get(f"{metric}/valid"), f"{metric}/valid missing from {sorted(logged)}"
    for metric in ("mrr", "codes_cos", "negatives"):
        assert logged.get(f"{metric}/train"), f"{metric}/train missing from {sorted(logged)}"
    assert all(0 <= v <= 1 for v in logged["R_1/8/valid"] + logged["mrr/train"])
    assert logged["negatives/train"][0] == 15  # batch 16: the other 15 labels


@pytest.fixture(scope="module")
def evaluated(trained, synthetic_task, tmp_path_factory):
    """`parlai eval_model` on the valid set, logging to tensorboard: (its report, the log folder)."""
    logdir = tmp_path_factory.mktemp("eval_tensorboard")
    report = reported(
        "eval_model", *eval_args(trained, synthetic_task), "--tensorboard-log", "true", "--tensorboard-logdir", logdir,
        report_file=logdir / "report.json",
    )
    return report, str(logdir)


def eval_args(model_file, task):
    # float32 even on a CPU where auto picks bfloat16: in bfloat16 a batch's make-up moves scores
    # enough to flip near ties, and the comparisons below hold the workers' merge to 2e-4
    return ["-mf", model_file, *task_args(task), "-dt", "valid", "-bs", "8", "--precision", "fp32"]


@pytest.mark.slow
def test_tensorboard_log_of_eval_model_holds_its_report(evaluated):
    report, logdir = evaluated
    logged = scalars(logdir)
    for metric in OUR_METRICS:
        ours = metric.replace("_", "@", 1) if metric.startswith("R_") else metric
        assert logged[f"{metric}/valid"] == [pytest.approx(report[ours], abs=1e-3)]


@pytest.mark.slow
def test_multiprocessing_eval_on_cpu_reports_what_eval_model_does(trained, synthetic_task, evaluated, tmp_path):
    """2 gloo workers, each evaluating its share of the 40 examples, give eval_model's report."""
    alone, _ = evaluated
    report_file = tmp_path / "report.json"
    shared = reported("multiprocessing_eval", "--distributed-world-size", "2", *eval_args(trained, synthetic_task), report_file=report_file)
    assert 0.125 < alone["R@1/8"] < 1  # neither chance nor perfect, so a wrong merge would show
    assert shared["exs"] == alone["exs"] == 40  # each example once, not once per worker
    for metric in ("R@1/8", "R@2/8", "R@5/8", "hits@1", "mrr", "rank", "loss", "codes_cos", "codes_entropy"):
        assert shared[metric] == pytest.approx(alone[metric], abs=2e-4), metric


def test_only_the_primary_worker_writes_the_report_file(tmp_path, monkeypatch):
    """ParlAI's guard lets every worker of a distributed evaluation write --report-filename."""
    import parlai_poly.agents  # noqa: F401  (applies the fixes)
    from parlai.scripts import eval_model
    from parlai.utils import distributed

    opt = {"report_filename": str(tmp_path / "report.json"), "model_file": str(tmp_path / "model")}
    monkeypatch.setattr(distributed, "is_primary_worker", lambda: False)
    eval_model._save_eval_stats(opt, {"exs": 40})
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(distributed, "is_primary_worker", lambda: True)
    eval_model._save_eval_stats({**opt, "report_filename": ".report"}, {"exs": 40})
    assert os.listdir(tmp_path) == ["model.report"]  # ParlAI's ".ext" shorthand, no temporary left
    with open(tmp_path / "model.report") as f:
        assert json.load(f)["report"] == {"exs": 40}


@pytest.mark.slow
def test_multiprocessing_eval_on_cpu_without_a_world_size_says_what_to_pass(trained, synthetic_task):
    status, output = parlai("multiprocessing_eval", "-mf", trained, *task_args(synthetic_task), "-dt", "valid", timeout=120)
    assert status == 1 and "Traceback" not in output, output[-3000:]
    assert "parlai-poly: error: --distributed-world-size is 0" in output
    assert "Pass --distributed-world-size N" in output


def forbid_unpickling(monkeypatch):
    import pickle

    def unpickle(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", unpickle)
    monkeypatch.setattr(pickle, "load", unpickle)
    monkeypatch.setattr(pickle, "Unpickler", unpickle)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["", ".trainstate"], ids=["model", "trainstate"])
def test_vacuum_refuses_our_files_before_reading_them(trained, tmp_path, monkeypatch, suffix):
    from parlai.scripts.vacuum import Vacuum

    folder = shutil.copytree(os.path.dirname(trained), tmp_path / "copy")
    path = str(folder / ("model" + suffix))
    before = {name: sha256(folder / name) for name in os.listdir(folder) if os.path.isfile(folder / name)}
    forbid_unpickling(monkeypatch)
    with pytest.raises(ModelFileError, match="parlai vacuum: .* not a pickled ParlAI checkpoint") as refused:
        Vacuum.main("--model-file", path)
    assert path in str(refused.value) and "model.trainstate" in str(refused.value)
    after = {name: sha256(folder / name) for name in os.listdir(folder) if os.path.isfile(folder / name)}
    assert after == before  # byte for byte, and no .unvacuumed backup


@pytest.mark.slow
def test_vacuum_command_refuses_our_model_file_in_one_line(trained):
    before = sha256(trained)
    status, output = parlai("vacuum", "-mf", trained, "--no-backup", timeout=120)
    assert status == 1 and "Traceback" not in output, output[-3000:]
    assert f"parlai-poly: error: parlai vacuum: {trained} is a parlai-poly model file (the 'poly' agent's weights)" in output
    assert "leave that file out" in output
    assert sha256(trained) == before


@pytest.mark.slow
def test_torchscript_refuses_our_rankers_and_names_the_onnx_export(trained, tmp_path):
    before = sha256(trained)
    scripted = tmp_path / "scripted.pt"
    status, output = parlai("torchscript", "-mf", trained, "--scripted-model-file", scripted, timeout=120)
    assert status == 1 and "Traceback" not in output, output[-3000:]
    assert f"parlai-poly: error: parlai torchscript: {trained} is a parlai-poly ranking model" in output
    assert "only exports generator models" in output
    assert f"python -m parlai_poly.export onnx {trained} OUT_DIR" in output
    assert not scripted.exists() and sha256(trained) == before


def test_torchscript_refusal_of_a_cross_encoder_names_no_export(tmp_path):
    """The ONNX export takes a bi- or poly-encoder's encoders; a cross-encoder has none."""
    from parlai.scripts import torchscript
    from parlai_poly.errors import ParlaiPolyError

    opt = {"model": "parlai_poly.agents:cross", "model_file": str(tmp_path / "model"), "script_module": torchscript.setup_args().get_default("script_module")}
    with pytest.raises(ParlaiPolyError, match="parlai_poly.agents:cross.*A cross-encoder has no export") as refused:
        torchscript.export_model(opt)
    assert "parlai_poly.export onnx" not in str(refused.value)
