"""Run-directory ownership and child-process lifetime (standard library only).

A run directory (``train --out``) or a ladder directory (``ladder --out``) is held by one
live process through an OS file lock: :func:`lock_dir` takes ``fcntl.flock`` on
``DIR/.lock`` and writes the holder's pid into it. The kernel drops the lock when the
process dies, however it dies (kill -9 included), so a lock is never stale; a second
process on the same directory is refused with a :class:`RunDirError` naming the holder's
pid (the CLIs print it as one ``error:`` line, exit 2).

:func:`child_preexec` / :func:`watch_parent` make a child trainer die with the ladder that
started it (own process group, ``PR_SET_PDEATHSIG``, or a watch on the parent's pid).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
from pathlib import Path
from typing import Optional

LOCK_NAME = ".lock"


class RunDirError(RuntimeError):
    """A run directory cannot be used (not a directory, not writable, held by another
    process). The message names the directory (and the holder's pid)."""


class DirLock:
    """A held ``flock`` on ``DIR/.lock``; :meth:`release` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


_KERNEL_FS = ("/proc", "/sys")


def _kernel_fs(path: Path) -> Optional[str]:
    """The kernel file system (/proc, /sys) that ``path`` resolves into, or None."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return None
    for root in _KERNEL_FS:
        if real == root or real.startswith(root + "/"):
            return root
    return None


def check_dir(path: Path, what: str = "run directory") -> None:
    """RunDirError unless ``path`` is (or can be created as) a writable directory."""
    path = Path(path)
    kernel_fs = _kernel_fs(path)
    if kernel_fs is not None:
        raise RunDirError(f"{what} {path} is under {kernel_fs}, a kernel file system, not a "
                          "place for files; pass a directory on a disk")
    try:
        is_other = path.exists() and not path.is_dir()
    except OSError as e:
        raise RunDirError(f"{what} {path} is not accessible: {e.strerror or e}") from None
    if is_other:
        raise RunDirError(f"{what} {path} exists and is not a directory; pass a new or "
                          "existing directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{what} {path} cannot be created: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"{what} {path} is not writable")


def lock_dir(path: Path, what: str = "run directory") -> DirLock:
    """Create ``path`` if needed and hold ``path/.lock`` for this process.

    Raises :class:`RunDirError` when the directory is unusable or another live process
    holds it (the message names that process's pid).
    """
    import fcntl

    path = Path(path)
    check_dir(path, what)
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunDirError(f"{what} {path} is not writable ({lock_path}: "
                          f"{e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            holder = lock_holder(fd)
        finally:
            os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirError(f"{what} {path} is in use by process {holder} (lock "
                              f"{lock_path}); wait for it to finish or stop it") from None
        raise RunDirError(f"{what} {path}: cannot lock {lock_path}: {e.strerror or e}") from None
    stamp_holder(fd)
    return DirLock(lock_path, fd)


def lock_holder(fd: int, unknown: str = "unknown") -> str:
    """The pid written in a lock file by :func:`stamp_holder` (``unknown`` if none)."""
    try:
        return os.pread(fd, 64, 0).decode("ascii", "replace").strip() or unknown
    except OSError:
        return unknown


def stamp_holder(fd: int) -> None:
    """Write this process's pid into the lock file it has just locked."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


# --------------------------------------------------------------------------------------
# Children that die with their parent
# --------------------------------------------------------------------------------------

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
