"""The ladder on a real Slurm (configs/slurm/start-local.sh starts a one-machine one; .ci/run
does): every run its own job, with the same results as the local executor; a job requeued
by `scontrol requeue`, or warned of its time limit (SIGUSR1 to the batch shell), stops
with a checkpoint, is requeued and resumes to the same weights; a cancelled job is
resubmitted and a queued or running one never is; a bad Slurm option is one line naming
the field, before anything is submitted."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

from moe.cli import main as cli_main
from moe.runs import checkpoint as ckpt
from moe.scaling.ladder.command import ladder_main

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ladder(tmp_path, monkeypatch):
    """make(sizes, tokens, slurm=...) -> (ladder.yaml, name); cancels the ladder's jobs at
    the end."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "dataclasses.py", "textwrap.py", "string.py", "difflib.py"):
        shutil.copy(stdlib / name, corpus / name)
    monkeypatch.setenv("MOE_TESTBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MOE_TESTBED_SLURM_POLL_S", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(ROOT)
    name = f"sl{uuid.uuid4().hex[:6]}"

    def make(sizes=("a",), sparsities=("dense",), tokens=5120, slurm="{cpus_per_task: 1, mem: 1G}",
             max_epochs=1.0):
        dims = {"a": 16, "b": 24}
        size_lines = "\n".join(f"  - {{name: {s}, d_model: {dims[s]}, n_layers: 2, n_heads: 2}}"
                               for s in sizes)
        sp = {"dense": "{name: dense}", "moe4": "{name: moe4, n_routed: 4, top_k: 2}"}
        sp_lines = "\n".join(f"  - {sp[s]}" for s in sparsities)
        body = textwrap.dedent(f"""\
            train_config: {ROOT / 'configs' / 'tiny-moe.yaml'}
            name: {name}
            overrides: [data.corpus={corpus}, data.tokenizer=bytes, model.vocab_size=300,
                        mtp.depth=0, train.precision=fp32, train.seq_len=32,
                        train.micro_batch_size=8, train.warmup_steps=2, train.eval_batches=2,
                        train.ckpt_every=1000, train.eval_every=1000, train.log_every=1]
            tokens: {{mode: fixed, value: {tokens}}}
            n_boot: 10
            max_epochs: {max_epochs}
            slurm: {slurm}
            sizes:
            """) + size_lines + "\nsparsities:\n" + sp_lines + "\n"
        path = tmp_path / f"{name}.yaml"
        path.write_text(body)
        return path

    yield make
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout
    ids = [j for j, n in (l.split() for l in jobs.splitlines()) if n.startswith(name)]
    if ids:
        subprocess.run(["scancel", *ids])


def _jobs(out: Path) -> dict:
    return json.loads((out / "slurm" / "jobs.json").read_text())


def _state(job_id: str) -> str:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return next((w.split("=", 1)[1] for w in r.stdout.split() if w.startswith("JobState=")), "")


def _until(cond, what: str, timeout: float = 240.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _results(out: Path) -> dict:
    with open(out / "results.csv") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def _weights(run_dir: Path) -> dict:
    return ckpt.load_file(ckpt.latest_checkpoint(run_dir) / "model.pt")


def _same_weights(a: Path, b: Path) -> bool:
    x, y = _weights(a), _weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(l)["step"] for l in lines if '"train"' in l), default=0)


def test_each_run_its_own_job_with_the_local_executors_results(ladder, tmp_path, capsys):
    path = ladder(sizes=("a", "b"), sparsities=("dense", "moe4"))
    local, sl = tmp_path / "local", tmp_path / "slurm"
    assert ladder_main([str(path), "--out", str(local), "--jobs", "2", "--no-report",
                        "--no-progress"]) == 0
    capsys.readouterr()
    assert ladder_main([str(path), "--out", str(sl), "--executor", "slurm", "--wait",
                        "--no-report", "--no-progress"]) == 0
    out = capsys.readouterr().out
    jobs = _jobs(sl)
    assert sorted(jobs) == ["a-dense", "a-moe4", "b-dense", "b-moe4"]
    for run, recs in jobs.items():
        assert len(recs) == 1 and f"{run}: submitted job {recs[0]['job_id']}" in out
        assert Path(recs[0]["log"]).is_file()
    a, b = _results(local), _results(sl)
    assert {n: r["final_eval_loss"] for n, r in a.items()} == \
        {n: r["final_eval_loss"] for n, r in b.items()}
    assert all(r["status"] == "done" for r in b.values())
    for run in jobs:
        assert _same_weights(local / "runs" / run, sl / "runs" / run)
    # --status shows every run done, with its job
    assert ladder_main([str(path), "--out", str(sl), "--status"]) == 0
    text = capsys.readouterr().out
    for run, recs in jobs.items():
        line = next(l for l in text.splitlines() if l.startswith(run + " "))
        assert " done " in line and recs[0]["job_id"] in line
    # the same command again submits nothing and writes the report
    assert cli_main(["ladder", str(path), "--out", str(sl), "--executor", "slurm",
                     "--no-progress"]) in (0, 1)  # 1: the tiny grid may not support every fit
    assert _jobs(sl) == jobs
    assert (sl / "report" / "report.md").is_file()


@pytest.mark.parametrize("how", ["scontrol-requeue", "time-limit-signal"])
def test_a_stopped_job_requeues_and_resumes_to_the_same_weights(ladder, tmp_path, capsys, how):
    path = ladder(tokens=32 * 8 * 400)  # 400 steps: several seconds of training
    local, sl = tmp_path / "local", tmp_path / "slurm"
    assert ladder_main([str(path), "--out", str(sl), "--executor", "slurm",
                        "--no-progress"]) == 0
    jid = _jobs(sl)["a-dense"][0]["job_id"]
    run_dir = sl / "runs" / "a-dense"
    _until(lambda: _last_step(run_dir) >= 5, "the job's first steps")
    if how == "scontrol-requeue":
        subprocess.run(["scontrol", "requeue", jid], check=True)
    else:  # what --signal=B:USR1@S sends before the time limit
        subprocess.run(["scancel", "--batch", "--signal=USR1", jid], check=True)
    _until(lambda: _state(jid) == "PENDING", "the requeued job")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and 5 <= summary["steps"] < 400
    assert ckpt.latest_checkpoint(run_dir).name == f"step_{summary['steps']:08d}"
    # Slurm holds a requeued job ~2 minutes before it may start again; skip most of the
    # wait, but not all: started again within a second, while slurmd still revokes the
    # last incarnation's credential, the job fails ("Job credential revoked")
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=True)
    capsys.readouterr()
    assert ladder_main([str(path), "--out", str(sl), "--executor", "slurm", "--wait",
                        "--no-report", "--no-progress"]) == 0
    assert f"a-dense: job {jid} already queued or running" in capsys.readouterr().out
    assert len(_jobs(sl)["a-dense"]) == 1  # requeued, never resubmitted
    log = (run_dir / f"slurm-{jid}.log").read_text()
    assert "(restart 1) --resume" in log
    if how == "time-limit-signal":
        assert "requeueing" in log  # the job requeued itself
    assert ladder_main([str(path), "--out", str(local), "--jobs", "1", "--no-report",
                        "--no-progress"]) == 0
    assert _same_weights(local / "runs" / "a-dense", run_dir)
    assert _results(sl)["a-dense"]["final_eval_loss"] == _results(local)["a-dense"]["final_eval_loss"]


def test_a_cancelled_job_is_resubmitted_and_a_running_one_is_not(ladder, tmp_path, capsys):
    path = ladder(sparsities=("dense", "moe4"), tokens=32 * 8 * 5000, max_epochs=10)
    sl = tmp_path / "slurm"
    assert ladder_main([str(path), "--out", str(sl), "--executor", "slurm",
                        "--no-progress"]) == 0
    first = {run: recs[0]["job_id"] for run, recs in _jobs(sl).items()}
    subprocess.run(["scancel", first["a-dense"]], check=True)
    _until(lambda: _state(first["a-dense"]) == "CANCELLED", "the cancelled job")
    capsys.readouterr()
    assert ladder_main([str(path), "--out", str(sl), "--executor", "slurm",
                        "--no-progress"]) == 0
    out = capsys.readouterr().out
    jobs = _jobs(sl)
    assert [r["job_id"] for r in jobs["a-moe4"]] == [first["a-moe4"]]
    assert f"a-moe4: job {first['a-moe4']} already queued or running" in out
    assert len(jobs["a-dense"]) == 2 and jobs["a-dense"][0]["job_id"] == first["a-dense"]
    new = jobs["a-dense"][1]["job_id"]
    assert new != first["a-dense"] and f"a-dense: submitted job {new}" in out
    assert _state(new) in ("PENDING", "RUNNING", "CONFIGURING")


@pytest.mark.parametrize("slurm, field", [
    ("{partition: nosuch, mem: 1G}", "slurm.partition"),
    # size a is fine; b's partition is not: nothing at all is submitted
    ("{mem: 1G, sizes: {b: {partition: nosuch}}}", "slurm.sizes.b.partition"),
])
def test_a_bad_slurm_option_is_one_line_before_anything_is_submitted(ladder, tmp_path,
                                                                     capsys, slurm, field):
    path = ladder(sizes=("a", "b"), slurm=slurm)
    sl = tmp_path / "slurm"
    capsys.readouterr()
    assert cli_main(["ladder", str(path), "--out", str(sl), "--executor", "slurm",
                     "--no-progress"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {field} is invalid: Slurm refused")
    assert not (sl / "slurm" / "jobs.json").exists()
    name = path.stem
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout
    assert not any(n.startswith(name) for n in queued.split())
