"""Scaling ladders: a grid of runs over active size x sparsity x token budget, a resumable
runner that trains them through the training entry point, and the results table.

    moe-testbed ladder configs/ladder/cpu.yaml --dry-run     # the plan, before training
    moe-testbed ladder configs/ladder/cpu.yaml               # train, collect, fit, report

Runner guarantees: a run whose ``summary.json`` says ``done`` is never trained again
while its config is unchanged; a run whose config changed (its fingerprint, see
:func:`moe.config.config_fingerprint`, recorded in ``runs/<run>/fingerprint.json``) is
moved aside to ``runs/<run>.stale-<UTC>`` and trained again; a run with a checkpoint
resumes from it (``--resume``); a run that fails is recorded in
``failures.jsonl`` with its error and the ladder goes on; killing the ladder at any point
and re-running the same command loses nothing. Results are rewritten atomically into
``results.csv`` (one row per run) after every run; the report (fits.json, report.md, PNGs)
is written to ``<out>/report`` at the end.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from moe.config import load_config
from moe.scaling.ladder.design import LadderConfig, Run, design_notes, load_ladder, plan
from moe.scaling.ladder.dry_run import format_plan
from moe.scaling.ladder.epochs import attach_epochs, epochs_message, over_epochs
from moe.scaling.ladder.executor import LocalExecutor, default_train_cmd
from moe.scaling.ladder.results import write_results
from moe.scaling.ladder.staleness import (DONE, has_checkpoint, read_summary,
                                          record_fingerprint, set_aside_if_stale)


def check_runnable(cfg: LadderConfig, base: Path, runs: list[Run]) -> Optional[str]:
    """Before training anything (not for --dry-run, which may plan for another machine):
    the launcher's executable exists here, and each run of the plan (done ones too: the
    check is from the configs alone, not the run directories) fits this machine when it
    runs as one local process. One line naming the problem, or None."""
    if cfg.launcher:
        exe = default_train_cmd(cfg)[0]
        if shutil.which(exe) is None:
            return (f"launcher={cfg.launcher!r} is invalid: {exe!r} is not an executable "
                    "found on PATH")
        return None  # a launcher decides the world size: train checks each rank itself
    import torch

    from moe.train.memguard import check_fits

    if torch.cuda.is_available():
        # measuring free GPU memory here would give this parent a CUDA context for the
        # whole ladder; each run's train checks its own device before allocating
        return None
    for r in runs:
        err = check_fits(load_config(base, r.overrides), "cpu", 1)
        if err is not None:
            return f"ladder run {r.name}: {err}"
    return None


def run_ladder(cfg: LadderConfig, base: Path, out: Path, runs: list[Run],
               train_cmd: Optional[list[str]] = None, progress: bool = True) -> list[dict]:
    """Train every run not yet done (resuming where a checkpoint exists); return result rows."""
    from moe.runs.lock import lock_dir

    # one ladder per directory: a second one on the same --out is refused (RunDirError)
    with lock_dir(out, "ladder directory"), LocalExecutor.for_ladder(cfg, train_cmd) as ex:
        return _run_ladder(cfg, base, out, runs, ex, progress)


def _run_ladder(cfg: LadderConfig, base: Path, out: Path, runs: list[Run],
                executor: LocalExecutor, progress: bool) -> list[dict]:
    from tqdm import tqdm

    (out / "plan.json").write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=str))
    bar = tqdm(runs, desc=f"ladder {cfg.name}", unit="run", disable=not progress)
    for r in bar:
        run_dir = out / "runs" / r.name
        # a result of another config is never reused: set aside, retrain
        set_aside_if_stale(run_dir, r, base)
        s = read_summary(run_dir)
        if s is not None and s.get("status") == DONE:
            continue
        bar.set_postfix_str(r.name)
        args = [str(base), *r.overrides, "--out", str(run_dir)]
        if has_checkpoint(run_dir):
            args.append("--resume")
        if not progress:
            args.append("--no-progress")
        run_dir.mkdir(parents=True, exist_ok=True)
        record_fingerprint(run_dir, r, base)
        t0 = time.time()
        rc = executor.run(args, run_dir / "train.log")
        s = read_summary(run_dir)
        if rc != 0 or s is None or s.get("status") != DONE:
            tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
            rec = {"run": r.name, "exit_code": rc, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "seconds": round(time.time() - t0, 1), "error": " | ".join(tail),
                   "command": shlex.join(executor.command(args))}
            with open(out / "failures.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            tqdm.write(f"run {r.name} failed (exit {rc}); see {run_dir / 'train.log'}")
        write_results(out, runs)
    return write_results(out, runs)


def ladder_main(argv: list[str]) -> int:
    """``moe-testbed ladder CONFIG [--dry-run] [--out DIR] [--no-report]``."""
    p = argparse.ArgumentParser(prog="moe-testbed ladder", description="Run or plan a scaling ladder.")
    p.add_argument("config")
    p.add_argument("--dry-run", action="store_true", help="print the runs and estimated time; train nothing")
    p.add_argument("--out", help="ladder directory (default runs/ladder-<name>)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg, base = load_ladder(a.config)
    runs = plan(cfg, base)
    from moe.data import DataError

    # Epoch accounting before anything trains: --dry-run reads the prepared caches (or
    # estimates); a real ladder prepares each corpus once here, then the runs find it.
    try:
        sizes = attach_epochs(runs, build=not a.dry_run, progress=not a.no_progress)
    except DataError as exc:
        print(f"error: ladder {cfg.name}: {exc}", file=sys.stderr)
        return 2
    print(format_plan(cfg, runs, sizes))
    over = over_epochs(cfg, runs)
    if over and (not a.dry_run or over[0].epochs_exact):
        print(f"error: {epochs_message(cfg, over)}", file=sys.stderr)
        return 2
    if over:
        print(f"warning: {epochs_message(cfg, over)}", file=sys.stderr)
    if a.dry_run:
        return 0
    out = Path(a.out or f"runs/ladder-{cfg.name}")
    problem = check_runnable(cfg, base, runs)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    t0 = time.time()
    from moe.runs.lock import RunDirError

    try:
        rows = run_ladder(cfg, base, out, runs, progress=not a.no_progress)
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = [r for r in rows if r["status"] == DONE]
    print(f"{len(done)}/{len(rows)} runs done in {time.time() - t0:.0f} s; results: {out / 'results.csv'}")
    if a.no_report:
        return 0 if len(done) == len(rows) else 1
    from moe.scaling.report import write_report
    from moe.scaling.table import ResultsError, validate_rows

    report_dir = out / "report"
    try:
        side: dict = {}
        grid = validate_rows(done, source="results.csv", side=side)  # compare rows -> side
        path = write_report(grid, report_dir, n_boot=cfg.n_boot, holdout="flag", side=side,
                            source=str(out / "results.csv"), notes=design_notes(cfg, runs))
    except ResultsError as exc:
        print(f"error: no report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0 if len(done) == len(rows) else 1
