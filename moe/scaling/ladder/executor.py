"""Training runs on this machine: the local executor (`--executor local`, `--jobs N`).

`LocalExecutor` is a context manager (while open, SIGTERM/SIGINT to the ladder take the
running runs' process groups down first: each trainer checkpoints and stops) whose
``run(args, log_path)`` trains one run, ``command(args)`` being the full command line it
stands for (for failure records), and returns its exit code (128 + the signal number for a
run killed by a signal, as a shell reports it). A run is forked from a warm server (same
isolation as a subprocess, without ~7 s of imports per run) when no launcher or custom
command is given, else run as a subprocess. ``jobs`` runs train at once, each with
``cores // jobs`` torch threads. The Slurm executor (one job per run) is
:mod:`moe.scaling.ladder.slurm`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from moe.scaling.ladder.design import LadderConfig


def default_train_cmd(cfg: LadderConfig) -> list[str]:
    """``python -m moe.cli train``, or ``<launcher> -m moe.cli train`` (torchrun/srun take
    ``-m``); $VARS in the launcher are expanded from the environment (e.g. SLURM_NNODES)."""
    if not cfg.launcher:
        return [sys.executable, "-m", "moe.cli", "train"]
    return shlex.split(os.path.expandvars(cfg.launcher)) + ["-m", "moe.cli", "train"]


def _can_fork() -> bool:
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods() and \
        os.environ.get("MOE_TESTBED_LADDER_FORK", "1") != "0"


_FORK_CTX = None


def _forkserver():
    """The multiprocessing context whose server has moe.train.preload imported."""
    global _FORK_CTX
    if _FORK_CTX is None:
        import multiprocessing

        _FORK_CTX = multiprocessing.get_context("forkserver")
        _FORK_CTX.set_forkserver_preload(["moe.train.preload"])
    return _FORK_CTX


class ChildReaper:
    """The ladder's child trainers run in their own process groups; on SIGTERM / SIGINT
    the ladder takes every running group down (SIGTERM: each trainer checkpoints and stops;
    SIGKILL after ``grace_s``) before it exits itself (SIGINT: KeyboardInterrupt; SIGTERM:
    exit 143). Handlers are installed only in the main thread and restored on exit."""

    def __init__(self, grace_s: float = 60.0):
        self.grace_s = grace_s
        self.children: dict[int, object] = {}  # pgid -> wait(timeout) -> bool (True: gone)
        self._lock = threading.Lock()
        self._old: dict = {}

    def __enter__(self):
        import signal

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old.clear()

    def track(self, pgid: int, wait) -> None:
        with self._lock:
            self.children[pgid] = wait

    def untrack(self, pgid: int) -> None:
        with self._lock:
            self.children.pop(pgid, None)

    def stop_children(self) -> None:
        import signal
        import time

        with self._lock:
            children, self.children = dict(self.children), {}

        def send(pgid, sig) -> bool:
            for kill in (os.killpg, os.kill):  # the group may not exist yet (just forked)
                try:
                    kill(pgid, sig)
                    return True
                except ProcessLookupError:
                    continue
            return False

        alive = {pgid: wait for pgid, wait in children.items() if send(pgid, signal.SIGTERM)}
        deadline = time.monotonic() + self.grace_s
        for pgid, wait in alive.items():
            if not wait(max(0.0, deadline - time.monotonic())):
                send(pgid, signal.SIGKILL)

    def _on_signal(self, signum, frame) -> None:
        import signal

        print(f"ladder: {signal.Signals(signum).name}: stopping run process group(s) "
              f"{sorted(self.children)}", file=sys.stderr)
        self.stop_children()
        self.__exit__()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


def _train_subprocess(cmd: list[str], log, reaper: ChildReaper,
                      threads: Optional[int] = None) -> int:
    """Run ``cmd`` in its own process group, dying with the ladder (PR_SET_PDEATHSIG),
    with ``threads`` intra-op threads when given; its exit code (128 + signal for a
    signal, as a shell reports it)."""
    from moe.runs.process import child_preexec

    env = None
    if threads is not None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=child_preexec(os.getpid()))

    def wait(timeout):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    return _wait_tracked(reaper, proc.pid, wait, lambda: proc.returncode)


def _wait_tracked(reaper: ChildReaper, pid: int, wait, exit_code) -> int:
    """Wait for child ``pid`` while ``reaper`` can stop it on a signal (``wait(timeout)``:
    True once it ended); its exit code, 128 + the signal number for a signal, as a shell
    reports it."""
    reaper.track(pid, wait)
    try:
        wait(None)
    finally:
        reaper.untrack(pid)
    rc = exit_code()
    return rc if rc >= 0 else 128 - rc


def _train_child(argv: list[str], log_path: str, parent_pid: Optional[int] = None,
                 threads: Optional[int] = None, env: Optional[dict] = None) -> None:
    # runs in the forked process: own process group, ends when the ladder process is gone
    # (its OS parent is the fork server, so PR_SET_PDEATHSIG alone would not see it)
    from moe.runs.process import watch_parent

    os.setpgid(0, 0)
    os.environ.update(env or {})
    if parent_pid is not None:
        watch_parent(parent_pid)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from moe.config import ConfigError
    from moe.train.cli import train_main

    try:
        rc = train_main(list(argv))
    except ConfigError as exc:  # as `moe-testbed train` reports it (moe.cli.main)
        print(f"error: {exc}", file=sys.stderr)
        rc = 2
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report like an interpreter would, then exit 1
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc or 0))


def _train_forked(argv: list[str], log_path: Path, reaper: ChildReaper,
                  threads: Optional[int] = None, env: Optional[dict] = None) -> int:
    """`moe-testbed train ARGV` in a process forked from the warm server (``env`` added to
    its environment); its exit code. A run killed by a signal returns 128 + the signal
    number, as a shell reports it."""
    p = _forkserver().Process(target=_train_child,
                              args=(list(argv), str(log_path), os.getpid(), threads, env))
    p.start()

    def wait(timeout):
        p.join(timeout)
        return p.exitcode is not None

    return _wait_tracked(reaper, p.pid, wait, lambda: p.exitcode)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; os.cpu_count() elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LocalExecutor:
    """Trains the ladder's runs on this machine, ``jobs`` at a time (module docstring).

    ``prefix`` is the training command (`default_train_cmd`, or a custom one); with
    ``fork`` a run is forked from the warm server with only its arguments, else
    ``prefix + args`` runs as a subprocess, its output appended to the log. With
    ``jobs`` > 1 each run gets its share of the cores as torch threads (cores // jobs);
    ``jobs`` 1 leaves torch's default (every core). :meth:`run` may be called from
    ``jobs`` threads at once."""

    name = "local"

    def __init__(self, prefix: list[str], fork: bool, jobs: int = 1):
        if jobs < 1:
            raise ValueError(f"jobs={jobs} is invalid: at least 1")
        self.prefix, self.fork, self.jobs = list(prefix), fork, jobs
        self.threads = max(1, usable_cores() // jobs) if jobs > 1 else None
        self._reaper = ChildReaper()
        self._peak_lock = threading.Lock()
        self._peak_env: Optional[dict] = None

    @classmethod
    def for_ladder(cls, cfg: LadderConfig, train_cmd: Optional[list[str]] = None,
                   jobs: int = 1):
        """The default command forked locally; a launcher (torchrun, srun) or a custom
        command runs as given."""
        prefix = list(train_cmd) if train_cmd is not None else default_train_cmd(cfg)
        return cls(prefix, train_cmd is None and not cfg.launcher and _can_fork(), jobs)

    def __enter__(self) -> "LocalExecutor":
        self._reaper.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._reaper.__exit__(*exc)

    def command(self, args: list[str]) -> list[str]:
        """The full command line that trains a run with ``args``."""
        return self.prefix + list(args)

    def peak_env(self) -> dict:
        """The environment that hands every forked run one fp32 matmul peak (its MFU
        denominator), measured here at the runs' thread count before the first run starts
        instead of by each run (moe.train.metrics.PEAK_ENV); empty on a CUDA machine and
        for a launcher or custom command (those measure their own)."""
        with self._peak_lock:
            if self._peak_env is None:
                import torch

                from moe.train.metrics import PEAK_ENV, cpu_fp32_peak_env

                cpu_forks = self.fork and not torch.cuda.is_available()
                self._peak_env = {PEAK_ENV: cpu_fp32_peak_env(
                    self.threads or torch.get_num_threads())} if cpu_forks else {}
            return self._peak_env

    def run(self, args: list[str], log_path: Path) -> int:
        """Train one run (``args``: config, overrides, --out ...) with its output appended
        to ``log_path``; its exit code."""
        if self.fork:
            return _train_forked(list(args), log_path, self._reaper, self.threads,
                                 self.peak_env())
        with open(log_path, "ab") as log:
            return _train_subprocess(self.command(args), log, self._reaper, self.threads)
