"""python -m benchmarks.cascade_eval end to end on tiny models and the synthetic task."""
import json

import pytest

from helpers import make_agent
from benchmarks import cascade_eval

pytestmark = pytest.mark.slow  # every test here runs a command or trains (see pytest.ini)

COLOURS = "red blue green yellow orange purple pink brown".split()  # the synthetic task's 8 replies


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_backbone):
    folder = tmp_path_factory.mktemp("cascade_eval")
    files = {}
    for kind, extra in (("bi", []), ("poly", ["--poly-n-codes", "4"]), ("cross", [])):
        files[kind] = str(folder / kind)
        make_agent("-m", f"parlai_poly.agents:{kind}", "--hf-model", tiny_backbone, *extra).save(files[kind])
    cands = folder / "replies.txt"
    cands.write_text("".join(f"it is {c}\n" for c in COLOURS))
    return files, str(cands), folder


def test_cascade_eval_reports_every_model_and_the_targets(models, synthetic_task, capsys):
    files, cands, folder = models
    out = folder / "results.json"
    result = cascade_eval.main([
        "--bi-model-file", files["bi"], "--poly-model-file", files["poly"], "--cross-model-file", files["cross"],
        "--task", synthetic_task["task"], "--fixed-candidates-path", cands, "--num-examples", "12",
        "--batchsize", "4", "--retrieve-top-k", "4", "--rerank-top-k", "2", "--cross-pairs", "8",
        "--cross-contexts", "2", "--out", str(out),
        "--fromfile-datapath", synthetic_task["fromfile_datapath"], "--fromfile-datatype-extension", "true",
    ])
    rows = result["rows"]
    assert set(rows) == {"bi", "poly", "cascade", "cross_all"}
    for name in ("bi", "poly", "cascade"):
        row = rows[name]
        assert row["examples"] == 12 and row["timed_examples"] == 8 and row["ms_per_context"] > 0
        assert 0 <= row["metrics"]["R@1/8"] <= 1 and "mrr" in row["metrics"]
    assert rows["cascade"]["options"]["retrieve_model_file"] == files["bi"]
    cross = rows["cross_all"]
    assert cross["extrapolated"] and cross["num_candidates"] == 8 and cross["measured_pairs"] == 8
    assert cross["ms_per_context"] > 0 and cross["metrics"] == {}
    assert set(result["targets"]) == {"cascade_r1_over_poly_r1", "cross_all_ms_over_cascade_ms"}
    assert json.loads(out.read_text())["rows"]["cascade"]["metrics"] == rows["cascade"]["metrics"]
    printed = capsys.readouterr().out
    assert "R@1/8" in printed and "extrapolated" in printed
