"""Run-directory ownership (standard library only).

A run directory (``train --out``) or a ladder directory (``ladder --out``) is held by one
live process through an OS file lock: :func:`lock_dir` takes ``fcntl.flock`` on
``DIR/.lock`` and writes the holder's pid into it. The kernel drops the lock when the
process dies, however it dies (kill -9 included), so a lock is never stale; a second
process on the same directory is refused with a :class:`RunDirError` naming the holder's
pid (the CLIs print it as one ``error:`` line, exit 2).
"""

from __future__ import annotations

import errno
import os
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


def held_by(path: Path) -> Optional[str]:
    """The pid of the live process that holds ``path/.lock`` (``"unknown"`` when it wrote
    none), or None when nobody holds it. Takes and drops the lock to look: read-only."""
    import fcntl

    try:
        fd = os.open(Path(path) / LOCK_NAME, os.O_RDWR)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return lock_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
