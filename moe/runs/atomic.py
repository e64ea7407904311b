"""Atomic file replacement: the one way this project writes a file that a reader (or a
resumed run) may open while, or after, the writer dies.

The bytes go to a temporary sibling ``.NAME.tmp-<pid>-<random>`` in the same directory,
are flushed and fsynced, and ``os.replace`` renames it over ``NAME`` (atomic on POSIX
within one file system). With ``durable=True`` the directory is fsynced as well, so the
rename itself survives a power loss. A reader sees the old file or the new one, never a
half-written one; a crash leaves at most a stray temporary, which the next write does not
trip over (its name is unique).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(path: PathLike) -> None:
    """fsync a directory (makes a rename inside it durable); a no-op where the platform or
    file system refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(path: PathLike) -> Path:
    """A unique temporary name beside ``path`` (same directory, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path; when the block ends without an exception, rename it over
    ``path``. For writers that want a path (``torch.save``, ``tokenizer.save``). The writer
    should fsync its own bytes when ``durable`` matters (:func:`atomic_open` does)."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", *, durable: bool = True,
                **open_kwargs) -> Iterator[IO]:
    """``open`` a temporary file for writing; on a clean exit flush, fsync (``durable``) and
    rename it over ``path``. On an exception ``path`` is left as it was."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open writes a new file; mode {mode!r} is not a write mode")
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())


def atomic_write(path: PathLike, data: Union[str, bytes], *, durable: bool = True) -> Path:
    """Replace ``path`` with ``data`` (text or bytes) atomically; returns the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", durable=durable) as f:
        f.write(data)
    return Path(path)
