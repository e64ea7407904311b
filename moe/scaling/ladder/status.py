"""`moe-testbed ladder CONFIG --out DIR --status`: each run's state, job, last step and log,
read from the run directories and, for Slurm ladders, from the scheduler.

States: ``done`` (summary.json says so), ``running`` (a live trainer holds the run
directory, or its Slurm job runs), ``pending`` (queued, or not started yet), ``stopped``
(stopped on a signal with a checkpoint: the next ladder command resumes it) and ``failed``
(the trainer or the job ended without finishing; the next ladder command retries it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from moe.runs.lock import held_by
from moe.scaling.ladder.slurm import QUEUED_STATES, RUNNING_STATES
from moe.scaling.ladder.staleness import DONE, read_summary


@dataclass
class RunState:
    name: str
    state: str
    job_id: str = ""
    job_state: str = ""
    step: Optional[int] = None
    steps: int = 0
    log: str = ""


def last_step(run_dir: Path) -> Optional[int]:
    """The step of the last row in ``run_dir/metrics.jsonl`` (reads its tail only)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def run_state(name: str, run_dir: Path, steps: int, job: Optional[dict] = None,
              job_state: Optional[str] = None, failed_locally: bool = False) -> RunState:
    """One run's state from its directory and (Slurm) its latest job and that job's state."""
    s = read_summary(run_dir) or {}
    st = RunState(name, "pending", step=last_step(run_dir), steps=steps,
                  log=str(run_dir / "train.log"))
    if job is not None:
        st.job_id, st.job_state, st.log = job["job_id"], job_state or "gone", job["log"]
    if s.get("status") == DONE:
        st.state = "done"
    elif job_state in RUNNING_STATES or (job is None and held_by(run_dir) is not None):
        st.state = "running"
    elif job_state in QUEUED_STATES:
        st.state = "pending"
    elif s.get("status") == "stopped":
        st.state = "stopped"
    elif job is not None or failed_locally or s:
        st.state = "failed"
    return st


def failed_runs(out: Path) -> set[str]:
    """Runs with a record in ``out/failures.jsonl`` (the local executor's failures)."""
    names = set()
    try:
        for line in (out / "failures.jsonl").read_text().splitlines():
            try:
                names.add(json.loads(line)["run"])
            except (ValueError, KeyError, TypeError):
                continue
    except OSError:
        pass
    return names


def format_status(states: list[RunState]) -> str:
    """An aligned table: run, state, job (and its Slurm state), step / planned, log."""
    rows = [("run", "state", "job", "step", "log")]
    for s in states:
        job = f"{s.job_id} ({s.job_state})" if s.job_id else "-"
        step = f"{s.step if s.step is not None else '-'}/{s.steps}"
        rows.append((s.name, s.state, job, step, s.log))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)
