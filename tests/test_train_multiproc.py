"""Data-parallel training under ``torchrun --nproc_per_node 2`` on CPU (gloo).

The 2-rank run uses micro_batch 2 per rank, the 1-rank run micro_batch 4: the same global
batch of the same samples (TokenBatches hands rank r entries r, r+2, ... of each global
batch), so losses agree to fp32 rounding and the expert-bias updates -- driven by exact
int64 counts SUM-all-reduced over ranks -- agree exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.runs import atomic_write
from moe.runs import checkpoint as ckpt
from moe.train.metrics import read_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import clean_env, comparable, tiny_overrides  # noqa: E402

pytestmark = pytest.mark.multiproc


def _run(tmp_path, out, nproc, extra, *flags):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: dp\n")
    train = ["-m", "moe.cli", "train", str(cfg_path), *tiny_overrides(tmp_path, **extra),
             "--out", str(out), "--no-progress", *flags]
    if nproc == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", "0", "--standalone", *train]
    env = clean_env()
    env["MOE_TESTBED_CACHE"] = str(tmp_path / "cache")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out


def _biases(run: Path, rank: int):
    return ckpt.load_file(ckpt.latest_checkpoint(run) / ckpt.rank_filename(rank))["expert_bias"]


def test_two_ranks_match_one_rank_same_global_batch(tmp_path):
    steps = {"train.max_steps": 16, "train.eval_every": 8, "train.ckpt_every": 8}
    one = _run(tmp_path, tmp_path / "one", 1, {**steps, "train.micro_batch_size": 4})
    two = _run(tmp_path, tmp_path / "two", 2, {**steps, "train.micro_batch_size": 2})
    a, b = read_rows(one / "metrics.jsonl"), read_rows(two / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert rb["lm_loss"] == pytest.approx(ra["lm_loss"], rel=1e-4, abs=1e-5)
        assert rb.get("mtp_loss_1") == pytest.approx(ra.get("mtp_loss_1"), rel=1e-4, abs=1e-5)
        assert rb["tokens"] == ra["tokens"]
        if ra["kind"] == "train":
            assert rb["maxvio"] == ra["maxvio"]  # exact counts, summed over ranks
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
    # expert biases: identical on both ranks, and equal to the one-rank run
    b0, b1, b_one = _biases(two, 0), _biases(two, 1), _biases(one, 0)
    assert all(torch.equal(x, y) for x, y in zip(b0, b1))
    assert all(torch.equal(x, y) for x, y in zip(b0, b_one))


def test_zero2_two_ranks_resume_exact(tmp_path):
    """ZeRO-2 on 2 ranks: per-rank optimizer partitions are saved and restored; a run
    rewound to its step-8 checkpoint and resumed reproduces steps 9..16 exactly."""
    extra = {"train.max_steps": 16, "train.eval_every": 8, "train.ckpt_every": 8,
             "train.micro_batch_size": 2, "train.zero_stage": 2}
    run = _run(tmp_path, tmp_path / "z2", 2, extra)
    full = comparable(read_rows(run / "metrics.jsonl"))
    final = ckpt.load_file(ckpt.latest_checkpoint(run) / "model.pt")
    atomic_write(run / ckpt.CKPT_DIR / ckpt.LATEST, ckpt.step_dirname(8) + "\n")
    _run(tmp_path, run, 2, extra, "--resume")
    assert comparable(read_rows(run / "metrics.jsonl")) == full
    again = ckpt.load_file(ckpt.latest_checkpoint(run) / "model.pt")
    assert all(torch.equal(final[k], again[k]) for k in final)
    b0, b1 = _biases(run, 0), _biases(run, 1)
    assert all(torch.equal(x, y) for x, y in zip(b0, b1))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{}, {"parallel.ep": 2}], ids=["dp", "ep2"])
def test_killed_rank_fails_the_launch_quickly_naming_it(tmp_path, layout):
    """SIGKILL one rank mid-training: the launch exits non-zero, naming the failed rank,
    well within 2 minutes (no hang on the survivor's next collective: a gradient
    all-reduce under DP, the token all-to-all inside the forward under EP)."""
    import os
    import signal
    import time

    import psutil

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: kill\n")
    out = tmp_path / "run"
    extra = {"train.max_steps": 100000, "train.eval_every": 100000, "train.ckpt_every": 100000,
             "train.micro_batch_size": 2, "train.log_every": 1, "parallel.timeout_s": 30,
             **layout}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "0", "--standalone", "-m", "moe.cli", "train", str(cfg_path),
           *tiny_overrides(tmp_path, **extra), "--out", str(out), "--no-progress"]
    env = clean_env()
    env["MOE_TESTBED_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # wait until training is under way
            m = out / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        victim = next(c for c in psutil.Process(proc.pid).children(recursive=True)
                      if c.environ().get("LOCAL_RANK") == "1" and "moe.cli" in " ".join(c.cmdline()))
        t0 = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert elapsed < 120
    assert "local_rank: 1" in output or "rank 1" in output, output[-3000:]
