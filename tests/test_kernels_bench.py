"""The kernel benchmark script runs end to end (--cpu-smoke: tiny shape, interpreter) and
refuses to run without CUDA otherwise; the summary script reads its rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ["-m", "benchmarks.kernels.bench_kernels"]  # run from ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_bench_refuses_without_cuda():
    r = subprocess.run([sys.executable, *BENCH], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--cpu-smoke" in r.stderr


def test_bench_cpu_smoke_writes_marked_rows(tmp_path):
    out = tmp_path / "k.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, *BENCH, "--cpu-smoke", "--routing", "skewed",
                    "--out", str(out)], cwd=ROOT, check=True, env=env, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ops = {r["op"] for r in rows}
    assert {"route", "permute", "unpermute", "mlp_fwd", "mlp_bwd", "mlp_fwd_bwd",
            "moe_layer_fwd", "moe_layer_fwd_bwd", "dense_matmul"} <= ops
    assert all(r["smoke"] is True and r["device"] and r["torch"] and r["commit"] for r in rows)
    assert out.with_suffix(".csv").exists()
    subprocess.run([sys.executable, "-m", "benchmarks.kernels.summarize",
                    str(out), "--include-smoke", "--out", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    assert "SMOKE" in (tmp_path / "k_summary.md").read_text()
