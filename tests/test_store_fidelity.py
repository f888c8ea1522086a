"""python -m benchmarks.store_fidelity end to end: a tiny model and the synthetic task."""
import json

import pytest

from benchmarks import store_fidelity
from helpers import make_agent

pytestmark = pytest.mark.slow  # builds agents and runs a whole evaluation (see pytest.ini)

COLOURS = "red blue green yellow orange purple pink brown".split()  # the synthetic task's 8 replies


@pytest.mark.parametrize("kind", ["bi", "poly"])
def test_store_fidelity_compares_every_store_with_float32(kind, tmp_path, tiny_backbone, synthetic_task, capsys):
    model_file = str(tmp_path / kind)
    extra = ["--poly-n-codes", "4"] if kind == "poly" else []
    make_agent("-m", f"parlai_poly.agents:{kind}", "--hf-model", tiny_backbone, *extra).save(model_file)
    cands = tmp_path / "replies.txt"
    fillers = [f"it is {c} and {d}" for c in COLOURS for d in COLOURS]  # 64 more than the 8 labels
    cands.write_text("".join(line + "\n" for line in [f"it is {c}" for c in COLOURS] + fillers))
    out = tmp_path / "fidelity" / "results.json"
    result = store_fidelity.main([
        "--model-file", model_file, "--task", synthetic_task["task"], "--datatype", "valid",
        "--fixed-candidates-path", str(cands), "--num-examples", "20", "--batchsize", "8",
        "--rescore-top-k", "5", "--out", str(out),
        "--fromfile-datapath", synthetic_task["fromfile_datapath"], "--fromfile-datatype-extension", "true",
    ])
    assert result["contexts"] == 20 and result["num_candidates"] == 72 and result["agent"] == kind
    # the float32 store encoded once, the others converted from it in the cache folder
    assert {d: f["status"] for d, f in result["files"].items()} == {
        "float32": "built", "bfloat16": "converted", "int8": "converted"}
    assert result["files"]["int8"]["file_bytes"] < result["files"]["bfloat16"]["file_bytes"]
    stores = result["stores"]
    assert set(stores) == {"float32", "bfloat16 rescored", "bfloat16 alone", "int8 rescored", "int8 alone"}
    for name, row in stores.items():
        assert 0 <= row["R@1"] <= row["R@10"] <= 1 and 0 < row["MRR"] <= 1
        if name != "float32":
            assert 0 < row["top10_overlap"] <= 1 and 0 <= row["top10_same_order"] <= 1
            assert row["R@1_change"] == pytest.approx(row["R@1"] - stores["float32"]["R@1"])
            assert 0 < row["max_score_change"] < 0.05  # really compact, and close
    assert json.loads(out.read_text())["stores"] == stores
    assert "int8 rescored" in capsys.readouterr().out
