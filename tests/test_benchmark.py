"""python -m benchmarks.scoring_speed --quick: every model for both implementations, and the files;
the report's figures from hand-made timings.

A smoke test only (tiny model, tiny N): no timing is asserted.
"""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.scoring_constants import IMPLS, MODELS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def expected_impls(model):
    """bf16 is a poly-encoder setting; ParlAI has no cascade."""
    if model.startswith("cascade"):
        return {"ours"}
    return set(IMPLS) if model.startswith("poly") else set(IMPLS) - {"ours_bf16"}


@pytest.mark.slow
def test_quick_benchmark_writes_every_model_for_both_implementations(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scoring_speed", "--quick", "--in-process", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ParlAI/ours" in proc.stdout  # the table
    for target in ("poly64_speed_parlai_over_ours", "cross_throughput_ours_over_parlai_mixed"):
        assert target in proc.stdout

    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert {r["model"] for r in rows} == set(MODELS)
    for row in rows:
        assert set(row["impls"]) == expected_impls(row["model"]), row["model"]
        for impl in row["impls"].values():
            assert impl["ms"] > 0, row
    measured = [r for r in rows if not r["extrapolated"]]
    assert all(len(e["runs_ms"]) == r["runs"] for r in measured for e in r["impls"].values())
    cross = [r for r in rows if r["model"] == "cross"]
    assert any(not r["extrapolated"] for r in cross) and any(r["extrapolated"] for r in cross)
    mixed = [r for r in rows if r["model"] == "cross-mixed"]
    assert len(mixed) == 1 and not mixed[0]["extrapolated"] and mixed[0]["lengths"]["high"] == 64
    for name in (
        "poly64_speed_parlai_over_ours",
        "poly64_over_bi_ours",
        "poly64_speed_parlai_over_ours_bf16",
        "poly64_bf16_over_bi_ours",
        "poly_extra_memory_ours_over_parlai",
        "ours_extra_memory_1m_gib",
        "cross_throughput_ours_over_parlai",
        "cross_throughput_ours_over_parlai_mixed",
    ):
        assert name in result["ratios"]
    # the cascades, per N: both retrievals timed, the HNSW build time and recall against exact
    assert set(result["cascade"]) == {"100", "1000"}
    for entry in result["cascade"].values():
        assert entry["exact_ms"] > 0 and entry["hnsw_ms"] > 0 and entry["hnsw_build_s"] >= 0
        assert 0 <= entry["recall_at_k"] <= 1 and entry["k"] == 100
    assert result["memory_method"]
    assert result["setup"]["versions"]["parlai"] == "1.7.2"

    png = out / "benchmark.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "table.txt").read_text().startswith("Scoring time per context")
    # written atomically: no temporary files left behind
    assert sorted(os.listdir(out)) == ["benchmark.png", "results.json", "table.txt"]


def test_report_extrapolates_cross_linearly_and_computes_speedups():
    """The report's figures from hand-made timings: no timing involved, every value checked."""
    from benchmarks.scoring_report import build_rows

    def cell(model, n, ours, parlai, **extra):
        impls = {"ours": {"ms": ours, "runs_ms": [ours]}, "parlai": {"ms": parlai, "runs_ms": [parlai]}}
        return dict(model=model, n=n, runs=1, reduced_runs=False, impls=impls, **extra)

    timed = {"cells": [cell("bi", 1000, 2.0, 3.0), cell("cross", 10, 5.0, 20.0, pairs=10)]}
    memory = {"cells": [{"model": "bi", "n": 1000, "impls": {"ours": {"extra_mib": 1.5}}}]}
    rows = build_rows(timed, memory, sizes=[1000])
    bi = next(r for r in rows if r["model"] == "bi")
    assert bi["speedup_parlai_over_ours"] == pytest.approx(1.5) and bi["impls"]["ours"]["extra_mib"] == 1.5
    cross = {r["n"]: r for r in rows if r["model"] == "cross"}
    assert not cross[10]["extrapolated"] and cross[1000]["extrapolated"]
    assert cross[1000]["impls"]["ours"]["ms"] == pytest.approx(500.0)  # 5 ms per 10 pairs, times 100
    assert cross[1000]["speedup_parlai_over_ours"] == pytest.approx(4.0)
