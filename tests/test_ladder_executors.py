"""Ladder executors without a scheduler: the local executor's --jobs, the Slurm section's
validation and batch scripts, --status, and the command's refusals (one line, exit 2).
Against a real Slurm: tests/test_ladder_slurm.py."""

from __future__ import annotations

import csv
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from moe import ConfigError
from moe.cli import main as cli_main
from moe.scaling.ladder.command import ladder_main, run_ladder
from moe.scaling.ladder.design import load_ladder, plan
from moe.scaling.ladder.slurm import load_slurm, sbatch_script

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ladder import ROOT, SMALL, STUB  # noqa: E402  (the same small ladder and stub)


def _ladder(tmp_path, body: str = SMALL, extra: str = "") -> Path:
    p = tmp_path / "ladder.yaml"
    p.write_text(f"train_config: {ROOT / 'configs' / 'tiny-moe.yaml'}\n"
                 + textwrap.dedent(body) + textwrap.dedent(extra))
    return p


def _losses(out: Path) -> dict:
    with open(out / "results.csv") as f:
        return {r["name"]: (r["status"], r["final_eval_loss"]) for r in csv.DictReader(f)}


def test_jobs_two_runs_at_once_with_the_same_results(tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_DELAY", "0.5")
    path = _ladder(tmp_path)
    cfg, base = load_ladder(path)
    runs = plan(cfg, base)
    run_ladder(cfg, base, tmp_path / "one", runs, train_cmd=STUB, progress=False, jobs=1)
    run_ladder(cfg, base, tmp_path / "two", runs, train_cmd=STUB, progress=False, jobs=2)
    assert _losses(tmp_path / "one") == _losses(tmp_path / "two")
    assert all(s == "done" for s, _ in _losses(tmp_path / "two").values())
    # with 2 jobs two trainers overlapped: some run started before another had ended
    spans = []
    for d in sorted((tmp_path / "two" / "runs").iterdir()):
        s = json.loads((d / "summary.json").read_text())
        spans.append((s["started"], s["ended"]))
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans)
               for (b0, b1) in spans[i + 1:])


def test_jobs_give_each_run_its_share_of_the_cores():
    from moe.scaling.ladder.executor import LocalExecutor, usable_cores

    assert LocalExecutor([], False, jobs=1).threads is None  # torch's default: every core
    assert LocalExecutor([], False, jobs=2).threads == max(1, usable_cores() // 2)
    with pytest.raises(ValueError, match="jobs=0"):
        LocalExecutor([], False, jobs=0)


@pytest.mark.parametrize("argv, word", [
    (["--jobs", "0"], "--jobs 0 is invalid"),
    (["--executor", "slurm", "--jobs", "2"], "--jobs is for --executor local"),
    (["--wait"], "--wait is for --executor slurm"),
    (["--executor", "pbs"], "invalid choice"),
])
def test_bad_executor_options_are_one_line(tmp_path, capsys, argv, word):
    with pytest.raises(SystemExit) as e:
        ladder_main([str(_ladder(tmp_path)), *argv])
    assert e.value.code == 2
    assert word in capsys.readouterr().err


@pytest.mark.parametrize("section, field", [
    ("slurm: {partition: 'a b'}", "slurm.partition"),
    ("slurm: {nodes: two}", "slurm.nodes"),
    ("slurm: {nodes: 0}", "slurm.nodes"),
    ("slurm: {time: 1h}", "slurm.time"),
    ("slurm: {mem: lots}", "slurm.mem"),
    ("slurm: {gpus_per_nodes: 8}", "slurm.gpus_per_nodes"),
    ("slurm: {extra: [constraint=h100]}", "slurm.extra[0]"),
    ("slurm: {sizes: {xl: {nodes: 2}}}", "slurm.sizes.xl"),
    ("slurm: {sizes: {s: {cpus_per_task: -1}}}", "slurm.sizes.s.cpus_per_task"),
    ("slurm: [partition]", "slurm"),
])
def test_bad_slurm_section_names_the_field(tmp_path, capsys, section, field):
    path = _ladder(tmp_path, extra=section + "\n")
    with pytest.raises(ConfigError) as e:
        load_ladder(path)
    assert str(e.value).startswith(field + " ") or str(e.value).startswith(field + "=")
    # the command: one error line naming it, exit 2, before anything runs
    assert cli_main(["ladder", str(path), "--executor", "slurm", "--out",
                     str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]
    assert not (tmp_path / "out").exists()


def test_slurm_resources_grow_with_size(tmp_path):
    cfg = load_slurm({"partition": "gpu", "time": "04:00:00", "gpus_per_node": 1,
                      "sizes": {"s": {"nodes": 2, "gpus_per_node": 8, "time": "1-00:00:00"}}},
                     ["xs", "s"])
    small, big = cfg.for_size("xs"), cfg.for_size("s")
    assert (small.nodes, small.gpus_per_node, small.time) == (1, 1, "04:00:00")
    assert (big.nodes, big.gpus_per_node, big.time, big.partition) == (2, 8, "1-00:00:00", "gpu")
    one = sbatch_script("t-xs", tmp_path / "xs", ["c.yaml", "--out", "xs"], small, tmp_path)
    many = sbatch_script("t-s", tmp_path / "s", ["c.yaml", "--out", "s"], big, tmp_path)
    for text in (one, many):
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text
        assert "#SBATCH --partition=gpu" in text
        assert "scontrol requeue" in text and "--resume" in text
    assert "#SBATCH --nodes=2" in many and "#SBATCH --gpus-per-node=8" in many
    assert "torch.distributed.run" in many and "--nproc_per_node=8" in many
    assert "torch.distributed.run" not in one
    import subprocess

    for text in (one, many):  # valid bash
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_slurm_executor_without_sbatch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    path = _ladder(tmp_path)
    rc = ladder_main([str(path), "--executor", "slurm", "--out", str(tmp_path / "out"),
                      "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sbatch" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was prepared or written


def test_status_reads_the_run_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUB_FAIL", "xs-moe4")
    monkeypatch.setenv("STUB_DELAY", "0")
    path = _ladder(tmp_path)
    cfg, base = load_ladder(path)
    out = tmp_path / "out"
    runs = plan(cfg, base)
    run_ladder(cfg, base, out, runs[:2], train_cmd=STUB, progress=False, jobs=1)
    capsys.readouterr()
    assert ladder_main([str(path), "--out", str(out), "--status"]) == 0
    text = capsys.readouterr().out
    state = {line.split()[0]: line.split()[1] for line in text.splitlines()[1:-1]}
    assert state == {"xs-dense": "done", "xs-moe4": "failed", "s-dense": "pending",
                     "s-moe4": "pending"}
    assert str(out / "runs" / "xs-dense" / "train.log") in text
    assert text.splitlines()[-1] == "1 done, 1 failed, 2 pending"
