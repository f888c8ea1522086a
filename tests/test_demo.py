"""make demo's output: what a person reads on the console, everything else in ParlAI's log."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_prints_progress_and_results_and_logs_parlai_to_a_file(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "parlai_poly.demo", "--out", str(out), "--datapath", str(tmp_path / "data"),
         "--train-minutes", "0.1", "--eval-examples", "24", "--ranking-pool", "40"],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    console = run.stdout + run.stderr
    assert "INFO |" not in console and "poly_n_codes:" not in console  # no ParlAI logs, no option dump
    assert "Training: 100%" in console and "updates, saved" in console  # the training's bar
    assert "Evaluating poly16_ccc: 100%" in console  # the evaluation's bar
    assert "24 examples in" in console and "paired gain" in console and "R@1/20" in console
    assert f"ParlAI log: {out / 'parlai.log'}" in console
    log = (out / "parlai.log").read_text()
    assert "Opt:" in log and "poly_n_codes: 16" in log  # ParlAI's own logs, kept
    summary = json.loads((out / "summary.json").read_text())
    tuned = summary["results"]["models"]["fine-tuned poly-16"]
    assert summary["results"]["examples"] == 24 and 0 <= tuned["R@1/20"]["mean"] <= 1
    assert len(summary["ranked"]) == 3 and all(len(r["top5"]) == 5 for r in summary["ranked"])
    assert os.path.isfile(out / "poly16_ccc")
