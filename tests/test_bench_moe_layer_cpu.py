"""The CPU MoE-layer benchmark script runs end to end at a toy size and writes its rows."""

from __future__ import annotations

import json

from benchmarks import bench_moe_layer_cpu


def test_bench_moe_layer_cpu_writes_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    bench_moe_layer_cpu.main(["--tokens", "64", "--rounds", "2", "--gemm-floor",
                              "--shape", "e8k2", "--dtype", "fp32", "bf16",
                              "--variants", "dense", "ours", "ours-nopad", "ours-loop", "naive",
                              "--upstream", "random", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    layer = [r for r in rows if r["bench"] == "moe_layer_fwd_bwd"]
    for dtype in ("fp32", "bf16"):
        mine = {r["variant"]: r for r in layer if r["dtype"] == dtype}
        assert set(mine) == {"dense", "ours", "ours-nopad", "ours-loop", "naive"}
        assert mine["dense"]["ratio_vs_dense_median"] == 1.0
        assert all(r["computes_in"] == dtype and r["routing"] == "varying" for r in mine.values())
        assert all(r["shape"]["E"] == 8 and r["shape"]["K"] == 2 for r in mine.values())
    assert all(r["cpu_malloc"] == "keep-freed" and r["median_ms"] > 0 for r in layer)
    floor = [r for r in rows if r["bench"] == "moe_layer_gemm_floor"]
    for name in ("moe", "dense"):
        mine = {r["gemm"]: r["median_ms"] for r in floor if r["layer"] == name}
        assert set(mine) == {"up", "down", "dW2", "da", "dW13", "dx", "sum"}
        assert abs(mine["sum"] - sum(v for k, v in mine.items() if k != "sum")) < 1e-9


def test_torchtitan_peer_records_that_its_experts_compute_in_bf16(tmp_path):
    """torchtitan's GroupedExperts cast to bf16 whatever the input dtype: its fp32 row says
    so (or it is reported not measured where torchtitan is not installed)."""
    import os

    import pytest

    if not os.environ.get("MOE_TESTBED_REQUIRE_PEERS"):  # .ci/run installs torchtitan
        pytest.importorskip("torchtitan.models.common.moe")
    out = tmp_path / "rows.jsonl"
    bench_moe_layer_cpu.main(["--tokens", "64", "--rounds", "2", "--shape", "e8k2",
                              "--dtype", "fp32", "--variants", "dense", "torchtitan",
                              "--out", str(out)])
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["torchtitan"]["computes_in"] == "bf16 experts" and rows["dense"]["computes_in"] == "fp32"
