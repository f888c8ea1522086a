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
RATIOS = (
    "poly64_speed_parlai_over_ours",
    "poly64_speed_parlai_over_ours_bf16",
    "poly64_over_bi_ours",
    "poly64_bf16_over_bi_bf16",
    "poly64_bf16_over_bi_bf16_largest",
    "bi_speed_parlai_over_ours_bfloat16",
    "bi_top100_recall_bfloat16",
    "bi_speed_parlai_over_ours_int8",
    "bi_top100_recall_int8",
    "poly_extra_memory_ours_over_parlai",
    "ours_extra_memory_largest_mib",
    "ours_score_over_limit_largest",
    "cross_throughput_ours_over_parlai",
    "cross_throughput_ours_over_parlai_mixed",
)


def expected_impls(model):
    """bf16 and int8 stores are for bi and poly; ParlAI has no cascade."""
    if model.startswith("cascade"):
        return {"ours"}
    return set(IMPLS) if model == "bi" or model.startswith("poly") else set(IMPLS) - {"ours_bf16", "ours_int8"}


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
    assert "ParlAI/this" in proc.stdout and "xlimit" in proc.stdout  # the table
    for target in ("poly64_speed_parlai_over_ours", "cross_throughput_ours_over_parlai_mixed"):
        assert target in proc.stdout

    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert {r["model"] for r in rows} == set(MODELS)
    for row in rows:
        assert set(row["impls"]) == expected_impls(row["model"]), row["model"]
        for impl in row["impls"].values():
            assert impl["ms"] > 0, row
        if row["model"] == "bi" or row["model"].startswith("poly"):  # split, limited, compared
            for name, impl in row["impls"].items():
                assert impl["encode_ms"] > 0 and impl["score_ms"] > 0 and impl["limit_ms"] > 0, (row["model"], name)
                assert impl["score_over_limit"] == pytest.approx(impl["score_ms"] / impl["limit_ms"])
                assert (name.startswith("ours_")) == (impl.get("top_recall_vs_float32") is not None)
                if name.startswith("ours_"):
                    assert 0 <= impl["top_recall_vs_float32"] <= 1
    measured = [r for r in rows if not r["extrapolated"]]
    assert all(len(e["runs_ms"]) == r["runs"] for r in measured for e in r["impls"].values())
    cross = [r for r in rows if r["model"] == "cross"]
    assert any(not r["extrapolated"] for r in cross) and any(r["extrapolated"] for r in cross)
    mixed = [r for r in rows if r["model"] == "cross-mixed"]
    assert len(mixed) == 1 and not mixed[0]["extrapolated"] and mixed[0]["lengths"]["high"] == 64
    assert set(result["ratios"]) == set(RATIOS)
    # the machine's limits, our context encoding in float32 and bfloat16, the chunk sweep
    machine = result["machine"]
    assert machine["copy"]["gb_s"] > 0 and machine["copy"]["mib"] == 32
    assert {g["m"] for g in machine["gemm"].values()} == {16, 64, 360}
    assert all(g["ms"] > 0 and g["ms_float32"] > 0 for g in machine["gemm"].values())
    assert set(result["encode"]) == {"bi", "poly-16", "poly-64", "poly-360"}
    assert all(e["float32"] > 0 and e["bfloat16"] > 0 for e in result["encode"].values())
    sweep = result["chunk_sweep"]
    assert sweep["model"] == "poly-64" and sweep["n"] == 10000 and sweep["fused"]  # 10k: the fused pass
    assert set(sweep["ms"]) == {"16", "64", "256", str(sweep["default_chunk"])}
    # the cascades, per N: both retrievals timed, the HNSW build time and recall against exact
    assert set(result["cascade"]) == {"100", "10000"}
    for entry in result["cascade"].values():
        assert entry["exact_ms"] > 0 and entry["hnsw_ms"] > 0 and entry["hnsw_build_s"] >= 0
        assert 0 <= entry["recall_at_k"] <= 1 and entry["k"] == 100
    assert result["memory_method"]
    assert result["setup"]["versions"]["parlai"] == "1.7.2"

    png = out / "benchmark.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    table = (out / "table.txt").read_text()
    assert table.startswith("Scoring time per context")
    assert "bfloat16 GEMM GFLOP/s by N x m" in table and "float32 GEMM GFLOP/s by N x m" in table
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


def test_report_computes_limits_and_targets_from_hand_made_timings():
    """Each row's limit (bytes at the copy bandwidth, FLOPs at the GEMM's rate), the score's
    multiple of it, and the issue's ratios, from made-up timings: every figure checked."""
    from benchmarks.scoring_report import add_limits, build_rows, compute_ratios

    def impl(ms, encode, score, recall=None):
        entry = {"ms": ms, "runs_ms": [ms], "encode_ms": encode, "score_ms": score}
        return entry if recall is None else dict(entry, top_recall_vs_float32=recall)

    n, dim = 1_000_000, 384
    timed = {"cells": [
        dict(model="bi", n=n, runs=1, reduced_runs=False, impls={
            "ours": impl(80.0, 20.0, 60.0), "ours_bf16": impl(40.0, 20.0, 20.0, 1.0),
            "ours_int8": impl(30.0, 20.0, 10.0, 0.98), "parlai": impl(90.0, 20.0, 70.0)}),
        dict(model="poly-64", n=n, runs=1, reduced_runs=False, impls={
            "ours": impl(400.0, 20.0, 380.0), "ours_bf16": impl(200.0, 20.0, 180.0, 1.0),
            "ours_int8": impl(210.0, 20.0, 190.0, 1.0), "parlai": impl(4000.0, 20.0, 3980.0)}),
    ]}
    memory = {"cells": [{"model": "poly-64", "n": n, "impls": {"ours_bf16": {"extra_mib": 19.0}, "ours": {"extra_mib": 6.0}}}]}
    rows = build_rows(timed, memory, sizes=[n])
    # 20 GB/s; a bfloat16 GEMM [1M, 384] x [384, 16] in 10 ms, [1M, 384] x [384, 64] in 100 ms
    machine = {"copy": {"mib": 1024, "ms": 1.0, "gb_s": 20.0},
               "gemm": {f"{n}x16": {"n": n, "m": 16, "ms": 10.0}, f"{n}x64": {"n": n, "m": 64, "ms": 100.0}}}
    add_limits(rows, machine, {"dim": dim})
    bi, poly = rows
    rescored = 100 * dim * 4  # the float32 rows of the top 100
    assert bi["impls"]["ours"]["bytes_read"] == n * dim * 4
    assert bi["impls"]["ours_bf16"]["bytes_read"] == n * dim * 2 + rescored
    assert bi["impls"]["ours_int8"]["bytes_read"] == n * dim + n * 4 + rescored
    # bi: bound by the read (its 2 N d FLOPs at the m = 16 GEMM's rate take 0.625 ms)
    assert bi["impls"]["ours"]["limit_ms"] == pytest.approx(n * dim * 4 / 20e9 * 1000)  # 76.8 ms
    assert bi["impls"]["ours_bf16"]["score_over_limit"] == pytest.approx(20.0 / ((n * dim * 2 + rescored) / 20e6))
    assert bi["flops"] == 2 * n * dim and bi["gemm_gflop_s"] == pytest.approx(2 * n * dim * 16 / 0.010 / 1e9)
    # poly-64: bound by the products, 100 ms (the read of a bfloat16 store: 38.4 ms)
    assert poly["impls"]["ours_bf16"]["limit_ms"] == pytest.approx(100.0)
    assert poly["impls"]["ours_bf16"]["score_over_limit"] == pytest.approx(1.8)
    assert poly["impls"]["parlai"]["score_over_limit"] == pytest.approx(39.8)
    assert bi["impls"]["ours_int8"]["speedup_parlai_over_this"] == pytest.approx(3.0)

    ratios = compute_ratios(rows, sizes=[n])
    assert ratios["bi_speed_parlai_over_ours_bfloat16"]["value"] == pytest.approx(90 / 40)
    assert ratios["bi_speed_parlai_over_ours_bfloat16"]["meets_target"]  # 2.25 >= 1.8
    assert ratios["bi_speed_parlai_over_ours_int8"]["value"] == pytest.approx(3.0)
    assert ratios["bi_top100_recall_int8"]["value"] == 0.98 and not ratios["bi_top100_recall_int8"]["meets_target"]
    assert ratios["poly64_bf16_over_bi_bf16_largest"]["value"] == pytest.approx(5.0)
    assert not ratios["poly64_bf16_over_bi_bf16_largest"]["meets_target"]  # target <= 2
    worst = ratios["ours_score_over_limit_largest"]
    assert worst["value"] == pytest.approx(max(e["score_over_limit"] for r in rows for k, e in r["impls"].items() if k != "parlai"))
    assert set(worst["per_model"]) == {f"{m} {i}" for m in ("bi", "poly-64") for i in ("ours", "ours_bf16", "ours_int8")}
    assert ratios["ours_extra_memory_largest_mib"]["value"] == 19.0 and ratios["ours_extra_memory_largest_mib"]["meets_target"]
