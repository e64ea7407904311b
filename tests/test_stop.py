"""One stop path for the signals a cluster sends: SIGTERM, SIGUSR1 (Slurm's warning before
a time limit) or SIGINT during training writes a checkpoint at the current step and the
summary (status "stopped"), exits 75 with one line and no traceback, and a resume ends
with the same weights and metrics as a run that was never stopped (bitwise on CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe.runs import checkpoint as ckpt
from moe.runs.process import EXIT_STOPPED, StopSignals
from moe.train.metrics import read_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import clean_env, comparable, tiny_overrides  # noqa: E402

STEPS = 400


def _cmd(tmp_path, out, *flags):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: stop\n")
    over = tiny_overrides(tmp_path, **{"train.max_steps": STEPS, "train.ckpt_every": 1000,
                                       "train.eval_every": 1000})
    return [sys.executable, "-m", "moe.cli", "train", str(cfg), *over, "--out", str(out),
            "--no-progress", *flags]


def _last_step(out: Path) -> int:
    try:
        rows = read_rows(out / "metrics.jsonl")
    except FileNotFoundError:
        return 0
    return max((r["step"] for r in rows if r.get("kind") == "train"), default=0)


def _weights(out: Path) -> dict:
    return ckpt.load_file(ckpt.latest_checkpoint(out) / "model.pt")


def test_stop_signals_record_the_first_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.name == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C insists
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path, sig):
    ref, out = tmp_path / "ref", tmp_path / "run"
    r = subprocess.run(_cmd(tmp_path, ref), env=clean_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    p = subprocess.Popen(_cmd(tmp_path, out), env=clean_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _last_step(out) < 5 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == EXIT_STOPPED, stderr[-3000:]
    assert "Traceback" not in stderr
    assert [l for l in stderr.splitlines() if l.startswith("stopped:")] == [
        l for l in stderr.splitlines() if "stopped by" in l]
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["status"] == "stopped" and 5 <= stopped_at < STEPS, summary
    assert signal.Signals(sig).name in summary["message"]
    # the checkpoint is at the step it stopped on: nothing trained is lost
    assert ckpt.latest_checkpoint(out).name == f"step_{stopped_at:08d}"

    r = subprocess.run(_cmd(tmp_path, out, "--resume"), env=clean_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "done"
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert comparable(read_rows(out / "metrics.jsonl")) == comparable(read_rows(ref / "metrics.jsonl"))
