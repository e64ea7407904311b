"""benchmarks/gpu_check.py (`python -m benchmarks.gpu_check` from the repository root), the
one command for a GPU window, run end to end on CPU in its --smoke mode (tiny shapes,
Triton interpreter, fp32): every stage must pass here so the GPU minutes are never spent
on an import or path error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ["-m", "benchmarks.gpu_check"]  # run from ROOT, as on the device


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, *SCRIPT, "--smoke", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr + (out / "log.txt").read_text()
    files = sorted(p.name for p in out.iterdir())
    assert files == ["correctness.json", "env.json", "kernels.csv", "kernels.jsonl",
                     "log.txt", "pytest_gpu.txt", "stages.jsonl", "train.json"]  # <= 8
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [(s["stage"], s["status"]) for s in stages] == [
        (n, "ok") for n in ("env", "pytest", "correctness", "kernels", "train")]
    env = json.loads((out / "env.json").read_text())
    assert env["kernels_available"] and env["torch"] and env["smoke"]
    corr = json.loads((out / "correctness.json").read_text())
    assert [c["routing"] for c in corr] == ["balanced", "skewed"]
    for c in corr:  # fp32 smoke: the kernels agree with the reference to fp32 rounding
        assert c["ok"] and max(c["triton"].values()) < 1e-5 and c["layer_triton_out"] < 1e-5
        assert set(c["triton"]) == set(c["grouped_mm"]) == {"y", "dx", "dW13", "dW2"}
    assert (out / "kernels.jsonl").read_text().count("\n") > 10
    train = json.loads((out / "train.json").read_text())
    assert [t["status"] for t in train] == ["done", "done"]
    assert all(t["tokens_per_s"] > 0 and t["final_eval_loss"] > 0 for t in train)


def test_gpu_check_refuses_without_cuda_or_wheels(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    r = subprocess.run([sys.executable, *SCRIPT, "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--smoke" in r.stderr
    (tmp_path / "w").mkdir()
    r = subprocess.run([sys.executable, *SCRIPT, "--smoke", "--wheels", str(tmp_path / "w"),
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "no .whl files" in r.stderr
