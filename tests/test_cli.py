"""The user's commands, run as the plain `parlai` command in a subprocess."""
import json
import os
import subprocess
import sys

import pytest

from helpers import AGENTS

pytestmark = pytest.mark.slow  # every test here runs a command or trains (see pytest.ini)

PARLAI = os.path.join(os.path.dirname(sys.executable), "parlai")


def parlai(*args, stdin=None):
    result = subprocess.run([PARLAI, *args], input=stdin, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def task_args(task):
    return ["-t", task["task"], "--fromfile-datapath", task["fromfile_datapath"], "--fromfile-datatype-extension", "true"]


@pytest.mark.parametrize("agent", AGENTS)
def test_train_eval_interactive_display(agent, tmp_path, tiny_backbone, synthetic_task):
    model_file = str(tmp_path / "model")
    extra = {"poly": ["--poly-n-codes", "4"], "cross": ["--candidates", "inline"], "bi": []}[agent]
    out = parlai(
        "train_model", *task_args(synthetic_task), "-m", f"parlai_poly.agents:{agent}", "-mf", model_file,
        "--hf-model", tiny_backbone, "--num-epochs", "1", "-bs", "16", "-lr", "1e-3", "--freeze-embeddings", "false",
        "--warmup-updates", "10", *extra,
    )
    assert "test:" in out and os.path.isfile(model_file)
    with open(model_file + ".trainstats") as f:  # the report, whatever layout ParlAI printed it in
        assert "R@1/8" in json.load(f)["final_test_report"]

    report_file = str(tmp_path / "report.json")
    out = parlai("eval_model", "-mf", model_file, *task_args(synthetic_task), "-dt", "test", "--report-filename", report_file)
    assert "Finished evaluating" in out
    with open(report_file) as f:
        assert "R@1/8" in json.load(f)["report"]

    cands = tmp_path / "replies.txt"
    cands.write_text("it is red\nit is blue\nit is green\n")
    out = parlai("interactive", "-mf", model_file, "-fcp", str(cands), stdin="hello the cat\n")
    reply = [line for line in out.splitlines() if "Encoder]:" in line]
    assert reply and reply[0].split("]: ")[1] in {"it is red", "it is blue", "it is green"}

    out = parlai("display_model", "-mf", model_file, *task_args(synthetic_task), "-n", "2")
    assert sum(line.strip().startswith("model:") for line in out.splitlines()) == 2
