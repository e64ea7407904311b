"""The CPU MoE-layer benchmark script runs end to end at a toy size and writes its rows."""

from __future__ import annotations

import json

from benchmarks import bench_moe_layer_cpu


def test_bench_moe_layer_cpu_writes_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    bench_moe_layer_cpu.main(["--tokens", "64", "--rounds", "2", "--no-deepspeed", "--gemm-floor",
              "--upstream", "random", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    layer = {r["variant"]: r for r in rows if r["bench"] == "moe_layer_fwd_bwd"}
    assert set(layer) == {"dense", "ours", "ours-loop", "naive"}
    assert layer["dense"]["ratio_vs_dense_median"] == 1.0
    assert all(r["cpu_malloc"] == "keep-freed" and r["median_ms"] > 0 for r in layer.values())
    floor = [r for r in rows if r["bench"] == "moe_layer_gemm_floor"]
    for name in ("moe", "dense"):
        mine = {r["gemm"]: r["median_ms"] for r in floor if r["layer"] == name}
        assert set(mine) == {"up", "down", "dW2", "da", "dW13", "dx", "sum"}
        assert abs(mine["sum"] - sum(v for k, v in mine.items() if k != "sum")) < 1e-9
