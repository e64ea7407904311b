"""The Slurm executor: every ladder run not yet done becomes its own Slurm job.

Each run gets a generated batch script (``<out>/slurm/<run>.sbatch``) sized by the ladder
config's ``slurm:`` section (defaults, then ``sizes: {SIZE: {...}}`` per model size), so a
run's nodes and GPUs can grow with its size. Inside the job the trainer starts under
``srun`` (one task per node; ``torchrun`` per node when a run has several GPUs or nodes).

Preemption and time limits: the job asks Slurm for ``SIGUSR1`` ``signal_s`` seconds before
its time limit (``--signal=USR1@S``, delivered to the job step); the trainer checkpoints
at the current step and exits with :data:`moe.train.EXIT_STOPPED`; the script then
requeues the job (``--requeue``), which resumes from that checkpoint. ``scontrol requeue``
or a preemption (SIGTERM) takes the same stop path in the trainer, and Slurm requeues.

Job ids are recorded in ``<out>/slurm/jobs.json`` (atomic rewrites). A run's state comes
from its run directory (``summary.json`` says done) and from the scheduler (``squeue``,
then ``scontrol show job`` for jobs that squeue no longer lists). Submitting again sends
only runs that are neither done nor queued/running.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from moe.config import ConfigError, build_dataclass
from moe.runs import atomic_write
from moe.runs.process import EXIT_STOPPED

_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$|^\d+-\d+$")
_MEM = re.compile(r"^\d+[KMGT]?$")
#: Slurm job states in which a job will still run (or is running): never resubmitted
QUEUED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "SUSPENDED", "PREEMPTED", "RESIZING"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
LIVE_STATES = QUEUED_STATES | RUNNING_STATES


@dataclass
class SlurmResources:
    """What one run's job asks for. Empty strings and None leave the choice to the cluster."""
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = ""  # Slurm's format: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    mem: str = ""  # e.g. 64G; "0": all of the node's memory
    extra: list[str] = field(default_factory=list)  # more sbatch options, e.g. --constraint=h100
    signal_s: int = 120  # SIGUSR1 this many seconds before the time limit: checkpoint, requeue

    def check(self, where: str) -> None:
        """ConfigError naming the field of the first invalid value."""
        def bad(name, why):
            raise ConfigError(f"{where}.{name}={getattr(self, name)!r} is invalid: {why}")

        for name in ("partition", "account", "qos"):
            v = getattr(self, name)
            if v and not re.fullmatch(r"[A-Za-z0-9_.,\-]+", v):
                bad(name, "letters, digits, '_', '-', '.' and ',' only")
        if self.time and not _TIME.match(self.time):
            bad("time", "Slurm's MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
        if self.nodes < 1:
            bad("nodes", "at least 1")
        if self.gpus_per_node < 0:
            bad("gpus_per_node", "0 or more")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            bad("cpus_per_task", "at least 1 (or leave it out)")
        if self.mem and not _MEM.match(self.mem):
            bad("mem", "a number with an optional K, M, G or T suffix, e.g. 64G")
        if self.signal_s < 0:
            bad("signal_s", "0 or more seconds")
        for i, line in enumerate(self.extra):
            if not isinstance(line, str) or not line.startswith("--") or "\n" in line:
                raise ConfigError(f"{where}.extra[{i}]={line!r} is invalid: one sbatch option "
                                  "per item, starting with '--' (e.g. --constraint=h100)")

    def world(self) -> int:
        return self.nodes * max(1, self.gpus_per_node)


@dataclass
class SlurmConfig(SlurmResources):
    """A ladder config's ``slurm:`` section: defaults for every run, and under ``sizes``,
    per model size (the names of the ladder's ``sizes``), the fields that differ."""
    sizes: dict = field(default_factory=dict)  # size name -> SlurmResources

    def for_size(self, size: str) -> SlurmResources:
        if size in self.sizes:
            return self.sizes[size]
        return SlurmResources(**{f.name: getattr(self, f.name) for f in fields(SlurmResources)})


def load_slurm(data, size_names: list[str]) -> SlurmConfig:
    """The validated ``slurm:`` section (defaults when the ladder config has none):
    unknown fields, wrong types, bad values and sizes that the ladder does not have are
    ConfigErrors naming the field, e.g. ``slurm.sizes.m4.nodes``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"slurm={data!r} is invalid: a mapping of sbatch resources")
    data = dict(data)
    per_size = data.pop("sizes", None) or {}
    cfg = build_dataclass(SlurmConfig, data, "slurm.")
    cfg.check("slurm")
    if not isinstance(per_size, dict):
        raise ConfigError(f"slurm.sizes={per_size!r} is invalid: a mapping size name -> fields")
    defaults = {f.name: getattr(cfg, f.name) for f in fields(SlurmResources)}
    for size, over in per_size.items():
        if size not in size_names:
            import difflib

            near = difflib.get_close_matches(str(size), size_names, 1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; sizes are {size_names}"
            raise ConfigError(f"slurm.sizes.{size} is invalid: no such size{hint}")
        if not isinstance(over, dict):
            raise ConfigError(f"slurm.sizes.{size}={over!r} is invalid: a mapping of fields")
        res = build_dataclass(SlurmResources, {**defaults, **over}, f"slurm.sizes.{size}.")
        res.check(f"slurm.sizes.{size}")
        cfg.sizes[size] = res
    return cfg


# --------------------------------------------------------------------------------------
# batch scripts
# --------------------------------------------------------------------------------------


def sbatch_script(job_name: str, run_dir: Path, train_argv: list[str], res: SlurmResources,
                  workdir: Path, python: str = sys.executable) -> str:
    """The batch script of one run: resources, then the trainer under srun (torchrun per
    node when the run spans several GPUs or nodes), resuming when a checkpoint exists.

    Stopping: Slurm sends SIGUSR1 to the batch shell ``signal_s`` seconds before the time
    limit (``--signal=B:USR1@S``); the shell sends SIGTERM to every task of the job's steps
    (``scancel --signal=TERM``: srun itself would kill its step on SIGTERM; torchrun hands
    it to its workers); each trainer checkpoints at its current step and exits (75), and
    the shell requeues the job, which resumes from that checkpoint.
    ``scontrol requeue`` and preemption send SIGTERM themselves: same stop, Slurm requeues.
    """
    opts = [f"--job-name={job_name}", f"--output={run_dir / 'slurm-%j.log'}",
            "--open-mode=append", "--requeue", f"--nodes={res.nodes}",
            "--ntasks-per-node=1", f"--chdir={workdir}"]
    if res.signal_s:
        opts.append(f"--signal=B:USR1@{res.signal_s}")
    for name in ("partition", "account", "qos", "time", "mem"):
        if getattr(res, name):
            opts.append(f"--{name}={getattr(res, name)}")
    if res.gpus_per_node:
        opts.append(f"--gpus-per-node={res.gpus_per_node}")
    if res.cpus_per_task:
        opts.append(f"--cpus-per-task={res.cpus_per_task}")
    opts += res.extra
    py = shlex.quote(python)
    argv = " ".join(shlex.quote(a) for a in train_argv)
    if res.world() > 1:
        # single quotes: $SLURM_NODEID expands on each node (srun sets it per task);
        # --node_rank keeps global rank order = node order (TP groups stay in a node)
        launch = (f"bash -c 'exec {py} -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" "
                  f"--nproc_per_node={max(1, res.gpus_per_node)} --node_rank=\"$SLURM_NODEID\" "
                  "--master_addr=\"$HEAD\" --master_port=\"$PORT\" -m moe.cli train \"$@\"' "
                  "moe-testbed-launch")
    else:
        launch = f"{py} -m moe.cli train"
    ckpt = shlex.quote(str(run_dir / "checkpoints" / "latest"))
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts), "",
             "# generated by `moe-testbed ladder --executor slurm` (rewritten at each submission)",
             "set -u",
             "export HEAD=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)",
             "export PORT=$((20000 + SLURM_JOB_ID % 20000))",
             "RESUME=",
             f"[ -f {ckpt} ] && RESUME=--resume",
             "# one intra-op thread per CPU the job holds",
             "[ -n \"${SLURM_CPUS_PER_TASK:-}\" ] && export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK",
             "echo \"[$(date -u +%FT%TZ)] job $SLURM_JOB_ID on $SLURM_JOB_NODELIST "
             "(restart ${SLURM_RESTART_COUNT:-0}) $RESUME\"",
             "STOP=0",
             "# SIGTERM to every task of the job's steps (not via srun, which would kill them)",
             "trap 'STOP=1; scancel --signal=TERM \"$SLURM_JOB_ID\"' USR1",
             f"srun --kill-on-bad-exit=1 {launch} {argv} $RESUME --no-progress &",
             "PID=$!",
             "wait $PID; rc=$?",
             "while kill -0 $PID 2>/dev/null; do wait $PID; rc=$?; done  # a trap ends wait early",
             f"if [ $rc -ne 0 ] && {{ [ $STOP = 1 ] || [ $rc -eq {EXIT_STOPPED} ]; }}; then",
             "    echo \"[$(date -u +%FT%TZ)] stopped (exit $rc) before the time limit; requeueing\"",
             "    scontrol requeue \"$SLURM_JOB_ID\" && exit 0",
             "fi",
             "exit $rc", ""]
    return "\n".join(lines)


def _sbatch(args: list[str]) -> subprocess.CompletedProcess:
    exe = shutil.which("sbatch")
    if exe is None:
        raise ConfigError("executor=slurm is invalid here: sbatch is not on PATH (is this a "
                          "Slurm login node? configs/slurm/start-local.sh starts a local one)")
    return subprocess.run([exe, *args], capture_output=True, text=True)


_FIELD_WORDS = (("partition", "partition"), ("account", "account"), ("qos", "qos"),
                ("time limit", "time"), ("memory", "mem"), ("node count", "nodes"),
                ("gres", "gpus_per_node"), ("gpu", "gpus_per_node"), ("cpu", "cpus_per_task"))


def test_submit(script: Path, where: str) -> None:
    """``sbatch --test-only``: the controller checks the script's resources without queueing
    it. A refusal is a ConfigError naming the ladder config's field where Slurm's message
    says which (partition, account, qos, time, mem, nodes, GPUs, CPUs)."""
    p = _sbatch(["--test-only", str(script)])
    if p.returncode == 0:
        return
    msg = " ".join((p.stderr or p.stdout).split()).replace("sbatch: error: ", "")
    low = msg.lower()
    name = next((f for w, f in _FIELD_WORDS if w in low), None)
    target = f"{where}.{name}" if name else where
    raise ConfigError(f"{target} is invalid: Slurm refused the job: {msg}")


def submit(script: Path) -> str:
    """Queue ``script``; its job id."""
    p = _sbatch(["--parsable", str(script)])
    if p.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout.strip().split(";")[0]


class SlurmUnavailable(RuntimeError):
    """The controller did not answer (squeue / scontrol failed for another reason than an
    unknown job): nothing may be concluded about any job."""


def job_states(job_ids: list[str], tries: int = 3) -> dict[str, str]:
    """Slurm's state of each job (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...), from
    squeue and, for jobs it no longer lists, ``scontrol show job``; jobs the controller has
    forgotten are absent. Raises :class:`SlurmUnavailable` when the controller does not
    answer ``tries`` times in a row (a busy controller times out: a missing answer must
    never read as "the job is gone", or a running job would be submitted twice)."""
    out: dict[str, str] = {}
    if not job_ids:
        return out
    p = _ask(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], tries,
             ok_errors=("Invalid job id",))
    for line in p.stdout.splitlines():
        jid, _, state = line.strip().partition(" ")
        if jid in job_ids:
            out[jid] = state
    for jid in job_ids:
        if jid in out:
            continue
        p = _ask(["scontrol", "show", "job", "-o", jid], tries, ok_errors=("Invalid job id",))
        m = re.search(r"JobState=(\S+)", p.stdout)
        if p.returncode == 0 and m:
            out[jid] = m.group(1)
    return out


def _ask(cmd: list[str], tries: int, ok_errors: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Run a Slurm query; retried while it fails with anything but ``ok_errors``."""
    for i in range(tries):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode == 0 or any(e in p.stderr for e in ok_errors):
            return p
        time.sleep(2.0 * (i + 1))
    raise SlurmUnavailable(f"{' '.join(cmd[:2])} failed {tries} times: "
                           f"{(p.stderr or p.stdout).strip()}")


class JobBook:
    """``<out>/slurm/jobs.json``: for each run, its jobs (newest last) with script and log."""

    def __init__(self, out: Path):
        self.dir = out / "slurm"
        self.path = self.dir / "jobs.json"
        try:
            self.jobs: dict[str, list[dict]] = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.jobs = {}

    def latest(self, run: str) -> Optional[dict]:
        return (self.jobs.get(run) or [None])[-1]

    def add(self, run: str, job_id: str, script: Path, log: str) -> None:
        self.jobs.setdefault(run, []).append(
            {"job_id": job_id, "script": str(script), "log": log,
             "submitted_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.jobs, indent=1) + "\n")


# --------------------------------------------------------------------------------------
# the executor
# --------------------------------------------------------------------------------------


class SlurmExecutor:
    """Submits each ladder run not yet done as its own job (module docstring); never one
    that is queued or running. ``workdir`` is where jobs start (the ladder command's
    working directory: config paths in the scripts are absolute anyway)."""

    name = "slurm"

    def __init__(self, cfg: SlurmConfig, ladder_name: str, out: Path, workdir: Path):
        self.cfg, self.ladder_name = cfg, ladder_name
        self.out, self.workdir = Path(out).resolve(), Path(workdir).resolve()
        self.book = JobBook(self.out)

    def latest_states(self, names: list[str]) -> dict[str, tuple[dict, Optional[str]]]:
        """run -> (its latest job record, Slurm's state of that job or None if the
        controller no longer knows it), for runs that were ever submitted."""
        latest = {n: self.book.latest(n) for n in names}
        latest = {n: j for n, j in latest.items() if j}
        states = job_states([j["job_id"] for j in latest.values()])
        return {n: (j, states.get(j["job_id"])) for n, j in latest.items()}

    def live(self, names: list[str]) -> dict[str, str]:
        """run -> job id for runs whose latest job is queued or running."""
        return {n: j["job_id"] for n, (j, st) in self.latest_states(names).items()
                if st in LIVE_STATES}

    def _where(self, size: str) -> str:
        return f"slurm.sizes.{size}" if size in self.cfg.sizes else "slurm"

    def write_script(self, name: str, size: str, run_dir: Path, train_args: list[str]) -> Path:
        script = self.out / "slurm" / f"{name}.sbatch"
        script.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(script, sbatch_script(f"{self.ladder_name}-{name}", run_dir, train_args,
                                           self.cfg.for_size(size), self.workdir))
        return script

    def submit(self, todo: list[tuple[str, str, Path, list[str]]]) -> list[tuple[str, str]]:
        """Submit ``todo`` ((name, size, run_dir, train args) each); [(name, job id)].
        Before anything is queued, the controller checks each size's resources once
        (``sbatch --test-only``): a refusal is a ConfigError naming the field."""
        scripts = [(name, size, run_dir, self.write_script(name, size, run_dir, args))
                   for name, size, run_dir, args in todo]
        checked: set[str] = set()
        for _, size, _, script in scripts:
            if size not in checked:
                test_submit(script, self._where(size))
                checked.add(size)
        out = []
        for name, _, run_dir, script in scripts:
            jid = submit(script)
            self.book.add(name, jid, script, str(run_dir / f"slurm-{jid}.log"))
            out.append((name, jid))
        return out

    def wait(self, names: list[str], poll_s: float, report=print) -> None:
        """Block until none of ``names`` has a queued or running job (requeued jobs
        count as queued), reporting each change of state."""
        seen: dict[str, str] = {}
        while True:
            try:
                states = self.latest_states(names)
            except SlurmUnavailable as exc:  # ask again later; never conclude "gone"
                report(f"  (Slurm did not answer: {exc}; asking again)")
                time.sleep(poll_s)
                continue
            for n, (j, st) in sorted(states.items()):
                if seen.get(n) != st:
                    report(f"  {n}: job {j['job_id']} {st or 'gone'}")
                    seen[n] = st
            if not any(st in LIVE_STATES for _, st in states.values()):
                return
            time.sleep(poll_s)


def check_sbatch() -> Optional[str]:
    """One line when this machine cannot submit jobs (no sbatch), else None."""
    if shutil.which("sbatch") is None:
        return ("--executor slurm needs Slurm's sbatch on PATH (run the ladder command on a "
                "login node; configs/slurm/start-local.sh starts a one-machine Slurm to try it)")
    return None
