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
               train_cmd: Optional[list[str]] = None, progress: bool = True,
               jobs: int = 1) -> list[dict]:
    """Train every run not yet done, ``jobs`` at a time (resuming where a checkpoint
    exists); return result rows."""
    from moe.runs.lock import lock_dir

    # one ladder per directory: a second one on the same --out is refused (RunDirError)
    with lock_dir(out, "ladder directory"), \
            LocalExecutor.for_ladder(cfg, train_cmd, jobs) as ex:
        return _run_ladder(cfg, base, out, runs, ex, progress)


def _todo(base: Path, out: Path, runs: list[Run]) -> list[Run]:
    """Runs to train: not done (a result of another config is set aside first, never
    reused)."""
    todo = []
    for r in runs:
        run_dir = out / "runs" / r.name
        set_aside_if_stale(run_dir, r, base)
        s = read_summary(run_dir)
        if s is None or s.get("status") != DONE:
            todo.append(r)
    return todo


def _train_args(base: Path, r: Run, run_dir: Path) -> list[str]:
    return [str(base), *r.overrides, "--out", str(run_dir)]


def _train_one(executor: LocalExecutor, base: Path, out: Path, r: Run,
               progress: bool) -> Optional[dict]:
    """Train run ``r`` (in a worker thread); the failure record, or None when it finished."""
    run_dir = out / "runs" / r.name
    args = _train_args(base, r, run_dir)
    if has_checkpoint(run_dir):
        args.append("--resume")
    if not progress:
        args.append("--no-progress")
    run_dir.mkdir(parents=True, exist_ok=True)
    record_fingerprint(run_dir, r, base)
    t0 = time.time()
    rc = executor.run(args, run_dir / "train.log")
    s = read_summary(run_dir)
    if rc == 0 and s is not None and s.get("status") == DONE:
        return None
    tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
    return {"run": r.name, "exit_code": rc,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - t0, 1), "error": " | ".join(tail),
            "command": shlex.join(executor.command(args))}


def _run_ladder(cfg: LadderConfig, base: Path, out: Path, runs: list[Run],
                executor: LocalExecutor, progress: bool) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    (out / "plan.json").write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=str))
    todo = _todo(base, out, runs)
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"ladder {cfg.name}",
               unit="run", disable=not progress)
    # runs start in plan order; results.csv is rewritten (here, one thread) as each ends
    with ThreadPoolExecutor(max_workers=executor.jobs) as pool:
        futures = {pool.submit(_train_one, executor, base, out, r, progress): r for r in todo}
        for fut in as_completed(futures):
            r, rec = futures[fut], fut.result()
            if rec is not None:
                with open(out / "failures.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                tqdm.write(f"run {r.name} failed (exit {rec['exit_code']}); see "
                           f"{out / 'runs' / r.name / 'train.log'}")
            bar.update()
            bar.set_postfix_str(r.name)
            write_results(out, runs)
    bar.close()
    return write_results(out, runs)


# --------------------------------------------------------------------------------------
# Slurm
# --------------------------------------------------------------------------------------


def submit_ladder(cfg: LadderConfig, base: Path, out: Path, runs: list[Run],
                  wait: bool, poll_s: float = 30.0) -> list[dict]:
    """Submit every run not yet done and not queued or running as its own Slurm job;
    print the job ids (recorded in ``out/slurm/jobs.json``); with ``wait``, block until no
    run of the ladder has a job left. Returns the result rows."""
    from moe.runs.lock import lock_dir

    from moe.scaling.ladder.slurm import SlurmExecutor

    out = out.resolve()
    base = base.resolve()
    with lock_dir(out, "ladder directory"):  # one submitter at a time
        (out / "plan.json").write_text(json.dumps([r.__dict__ for r in runs], indent=1,
                                                  default=str))
        ex = SlurmExecutor(cfg.slurm, cfg.name, out, Path.cwd())
        todo = _todo(base, out, runs)
        live = ex.live([r.name for r in todo])
        new = []
        for r in todo:
            if r.name in live:
                print(f"{r.name}: job {live[r.name]} already queued or running")
                continue
            run_dir = out / "runs" / r.name
            run_dir.mkdir(parents=True, exist_ok=True)
            record_fingerprint(run_dir, r, base)
            new.append((r.name, r.size, run_dir, _train_args(base, r, run_dir)))
        for name, jid in ex.submit(new):
            print(f"{name}: submitted job {jid} (log {out / 'runs' / name / f'slurm-{jid}.log'})")
        rows = write_results(out, runs)
    print(f"jobs: {ex.book.path}")
    if wait and todo:
        print(f"waiting for {len(todo)} run(s) (polling every {poll_s:g} s)")
        ex.wait([r.name for r in todo], poll_s)
        rows = write_results(out, runs)
    return rows


def ladder_status(cfg: LadderConfig, out: Path, runs: list[Run], executor: str) -> str:
    from moe.scaling.ladder.slurm import SlurmExecutor, check_sbatch
    from moe.scaling.ladder.status import failed_runs, format_status, run_state

    jobs: dict = {}
    if executor == "slurm" or (out / "slurm" / "jobs.json").exists():
        if check_sbatch() is None:
            jobs = SlurmExecutor(cfg.slurm, cfg.name, out, Path.cwd()).latest_states(
                [r.name for r in runs])
    failed = failed_runs(out)
    states = [run_state(r.name, out / "runs" / r.name, r.steps, *jobs.get(r.name, (None, None)),
                        failed_locally=r.name in failed) for r in runs]
    return format_status(states)


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moe-testbed ladder", description="Run or plan a scaling ladder.")
    p.add_argument("config")
    p.add_argument("--dry-run", action="store_true", help="print the runs and estimated time; train nothing")
    p.add_argument("--out", help="ladder directory (default runs/ladder-<name>)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: train here, --jobs at a time; slurm: one Slurm job per run "
                        "(resources from the config's slurm: section)")
    p.add_argument("--jobs", type=int, default=None,
                   help="local: runs at once, each with cores/jobs threads (default: 2 on a "
                        "CPU-only machine with 2+ cores, measured faster; else 1)")
    p.add_argument("--wait", action="store_true",
                   help="slurm: wait for every job, then write results and the report")
    p.add_argument("--status", action="store_true",
                   help="print each run's state, job id, last step and log; train nothing")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.jobs is not None and a.jobs < 1:
        p.error(f"--jobs {a.jobs} is invalid: at least 1")
    if a.jobs is not None and a.executor == "slurm":
        p.error("--jobs is for --executor local (Slurm runs every job it can)")
    if a.wait and a.executor != "slurm":
        p.error("--wait is for --executor slurm (the local executor always waits)")
    return a


def default_jobs() -> int:
    """2 runs at once on a CPU-only machine with 2 or more cores, else 1 (a GPU machine
    trains one run on its devices). Measured on the embedded CPU ladder (configs/ladder/
    cpu.yaml, 2 cores, fresh clones, benchmarks/results/ladder_jobs.jsonl): --jobs 2 took
    876 s, --jobs 1 1089 s. A run's thread count changes the last bits of its losses (23 of
    33 final losses differed between the two settings), so results are bitwise the same
    across --jobs values that give each run the same number of threads."""
    import torch

    from moe.scaling.ladder.executor import usable_cores

    return 2 if not torch.cuda.is_available() and usable_cores() >= 2 else 1


def ladder_main(argv: list[str]) -> int:
    """``moe-testbed ladder CONFIG [--dry-run | --status] [--out DIR] [--executor local|slurm]
    [--jobs N] [--wait] [--no-report]``."""
    a = _parse(argv)
    cfg, base = load_ladder(a.config)
    runs = plan(cfg, base)
    out = Path(a.out or f"runs/ladder-{cfg.name}")
    if a.status:
        print(ladder_status(cfg, out, runs, a.executor))
        return 0
    problem = _slurm_problem() if a.executor == "slurm" and not a.dry_run else None
    if problem is not None:  # before any corpus is prepared
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if _check_epochs(cfg, runs, a) is not None:
        return 2
    if a.dry_run:
        return 0
    problem = check_runnable(cfg, base, runs) if a.executor == "local" else None
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    t0 = time.time()
    from moe.runs.lock import RunDirError

    from moe.scaling.ladder.slurm import SlurmUnavailable

    try:
        if a.executor == "slurm":
            rows = submit_ladder(cfg, base, out, runs, a.wait, _poll_s())
        else:
            rows = run_ladder(cfg, base, out, runs, progress=not a.no_progress,
                              jobs=a.jobs or default_jobs())
    except (RunDirError, SlurmUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = [r for r in rows if r["status"] == DONE]
    if a.executor == "slurm" and len(done) < len(rows):
        print(f"{len(done)}/{len(rows)} runs done; watch: moe-testbed ladder {a.config} --out "
              f"{out} --status; the same command again resubmits what failed and, once "
              "every run is done, writes the fits and the report")
        return 0 if not a.wait else 1
    print(f"{len(done)}/{len(rows)} runs done in {time.time() - t0:.0f} s; results: {out / 'results.csv'}")
    if a.no_report:
        return 0 if len(done) == len(rows) else 1
    return _report(cfg, out, runs, done, len(rows))


def _poll_s() -> float:
    import os

    return float(os.environ.get("MOE_TESTBED_SLURM_POLL_S", "30"))


def _slurm_problem() -> Optional[str]:
    from moe.scaling.ladder.slurm import check_sbatch

    return check_sbatch()


def _check_epochs(cfg: LadderConfig, runs: list[Run], a) -> Optional[int]:
    """Epoch accounting before anything trains: --dry-run reads the prepared caches (or
    estimates); a real ladder prepares each corpus once here, then the runs find it.
    Prints the plan; 2 (after one error line) when the ladder must not start."""
    from moe.data import DataError

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
    return None


def _report(cfg: LadderConfig, out: Path, runs: list[Run], done: list[dict], n: int) -> int:
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
    return 0 if len(done) == n else 1
