"""Process lifetime (standard library only): children that die with their parent, and one
stop path for the signals a cluster sends.

:func:`child_preexec` / :func:`watch_parent` make a child trainer die with the ladder that
started it (own process group, ``PR_SET_PDEATHSIG``, or a watch on the parent's pid).

:class:`StopSignals` turns SIGTERM (preemption, ``scancel``, ``scontrol requeue``),
SIGUSR1 (Slurm's warning before a time limit, as the ladder's jobs ask for it) and SIGINT
(Ctrl-C) into a request that the trainer reads between steps: it checkpoints at the
current step, writes its summary (status ``stopped``) and exits with
:data:`EXIT_STOPPED`, so that a resume equals an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from typing import Optional

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Linux: deliver ``sig`` to this process when its parent dies. False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def child_preexec(parent_pid: int):
    """A ``subprocess`` ``preexec_fn``: own process group, SIGTERM when the parent dies
    (inherited across exec), and exit at once if the parent is already gone."""

    def preexec() -> None:
        os.setpgid(0, 0)
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(128 + signal.SIGTERM)

    return preexec


def watch_parent(parent_pid: int, poll_s: float = 1.0) -> Optional[threading.Thread]:
    """A daemon thread that ends this process (SIGTERM to its process group) once
    ``parent_pid`` has exited. Used by children forked from a server (their OS parent is
    the server, not the ladder). None when ``parent_pid`` is already gone (then this
    process is terminated right away)."""

    def gone() -> None:
        try:
            os.killpg(os.getpgid(0), signal.SIGTERM)
        finally:
            threading.Event().wait(5.0)
            os._exit(128 + signal.SIGTERM)

    def alive() -> bool:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(parent_pid)
        except ProcessLookupError:
            gone()
        except OSError:
            pidfd = None

    def run() -> None:
        if pidfd is not None:
            import select

            select.select([pidfd], [], [])  # readable once the process has exited
            gone()
        else:
            while alive():
                threading.Event().wait(poll_s)
            gone()

    t = threading.Thread(target=run, name="moe-parent-watch", daemon=True)
    t.start()
    return t


#: exit code of a run that stopped on a signal after writing a checkpoint at its current
#: step (sysexits' EX_TEMPFAIL, "try again later"): resume it with --resume. The ladder's
#: Slurm jobs requeue themselves on it.
EXIT_STOPPED = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """While entered, SIGTERM / SIGINT / SIGUSR1 only record themselves (:attr:`signum`,
    the first one received); the previous handlers come back on exit. A second SIGINT
    raises KeyboardInterrupt (a user who insists). Outside the main thread, where Python
    cannot install handlers, it records nothing."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum: Optional[int] = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _record(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
