"""DeepSpeed's first-use C++ op build, made safe against an interrupted build.

On a CPU box every multi-process ``train`` loads DeepSpeed's shared-memory comm op
(``ShareMemCommBuilder``, built on first use by ``torch.utils.cpp_extension.load``; ~20 s
on a 2-core box). torch guards the build with a ``lock`` file in the op's build directory
(``FileBaton``: created with O_EXCL, removed when the build ends) and every other process
spins, without a message and without a timeout, while that file exists. A build killed
with ``kill -9`` never removes it, so every later run on the machine hung.

:func:`ensure_deepspeed_ops` builds or loads the op before DeepSpeed asks for it (DeepSpeed
then finds it loaded):

* Unless the user set ``TORCH_EXTENSIONS_DIR``, the build directory is private to the
  project's cache (``<cache>/torch_extensions/<pyXY>_<accelerator>``, cache as in
  :func:`moe.data.prepare.resolve_cache_dir`), and every build there runs under an
  ``fcntl`` lock of ours (``.moe-build.lock``), which the kernel drops when its process
  dies. Holding that lock proves no live builder of ours is inside torch's baton, so a
  torch ``lock`` file found then is stale: it is removed, with one warning line naming it.
* In a directory the user chose (which other programs may share) a torch ``lock`` file may
  belong to a live build that is not ours. It is waited for up to
  ``$MOE_TESTBED_OP_BUILD_TIMEOUT_S`` seconds (default 600), then the run stops with one
  line naming the file to delete.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..runs.lock import lock_holder, stamp_holder

#: the DeepSpeed op builders the trainer loads (the comm backend asks for this one)
OPS = ("ShareMemCommBuilder",)
OUR_LOCK = ".moe-build.lock"
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton, in each op's build directory
TIMEOUT_ENV = "MOE_TESTBED_OP_BUILD_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


class OpBuildError(RuntimeError):
    """The op build cannot proceed; the message is one line naming the file to act on."""


def _build_tag() -> str:
    import torch

    if getattr(torch.version, "hip", None):
        accel = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda:
        accel = "cu" + torch.version.cuda.replace(".", "")
    else:
        accel = "cpu"
    return f"py{sys.version_info.major}{sys.version_info.minor}_{accel}"


def extensions_dir(cache_dir=None) -> tuple[Path, bool]:
    """(root of the op build directories, whether it is private to this project).

    Sets ``TORCH_EXTENSIONS_DIR`` to the private directory when the user has not set it,
    so that torch builds there."""
    from ..data.prepare import resolve_cache_dir

    root = resolve_cache_dir(cache_dir) / "torch_extensions" / _build_tag()
    user = os.environ.get("TORCH_EXTENSIONS_DIR")
    if user and Path(user) != root:  # the user's (a child inherits ours: still ours)
        return Path(user), False
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    return root, True


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        raise OpBuildError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


@contextlib.contextmanager
def build_lock(root: Path, timeout_s: float):
    """Hold ``root/.moe-build.lock`` (fcntl; dropped by the kernel when we die)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / OUR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OpBuildError(f"DeepSpeed op build directory {root} is not usable: "
                           f"{e.strerror or e}") from None
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own baton only
        os.close(fd)
        yield
        return
    try:
        deadline, said = time.monotonic() + timeout_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OpBuildError(
                        f"DeepSpeed op build in {root} is held by pid "
                        f"{lock_holder(fd, '?')} for "
                        f"more than {timeout_s:g} s ({root / OUR_LOCK}); wait for it or "
                        f"stop that process (${TIMEOUT_ENV} sets the wait)") from None
                if not said:
                    print(f"waiting for the DeepSpeed op build of pid "
                          f"{lock_holder(fd, '?')} in "
                          f"{root}", file=sys.stderr, flush=True)
                    said = True
                time.sleep(0.2)
        stamp_holder(fd)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _wait_foreign_lock(lock: Path, timeout_s: float) -> None:
    """Wait for a torch lock file in a shared directory to go, or fail naming it."""
    if not lock.exists():
        return
    print(f"waiting for DeepSpeed op build lock {lock} (another build in progress?)",
          file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout_s
    while lock.exists():
        if time.monotonic() >= deadline:
            raise OpBuildError(
                f"DeepSpeed op build lock {lock} is still there after {timeout_s:g} s; if "
                "no build is running (an interrupted one leaves it behind), delete that "
                "file and rerun")
        time.sleep(0.2)


def _builders() -> list:
    """The op builders to load on this accelerator (as deepspeed.comm.torch.build_shm_op
    decides: present and compatible)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    out = []
    for name in OPS:
        b = get_accelerator().create_op_builder(name)
        if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False):
            out.append(b)
    return out


def _load(builder):
    return builder.load()


def skip_comm_op_for_one_process(world_size: int) -> bool:
    """Leave DeepSpeed's shared-memory all-reduce op unbuilt where nothing is reduced.

    ``deepspeed.comm.torch`` builds the op (``ShareMemCommBuilder``) for every CPU process,
    world size 1 included: a C++ build of ~45 s on a fresh cache (measured: the first run of
    a CPU ladder from a fresh clone, 50 s of wall time for 6 s of training), ~0.3 s to load
    after. For a world of one on CPU its builder is replaced by one returning None, which
    DeepSpeed reads as "op unavailable" (torch.distributed's collectives, here no-ops).
    True when it did; then :func:`ensure_deepspeed_ops` has nothing to do."""
    from deepspeed.accelerator import get_accelerator

    # the module itself: `import deepspeed.comm.torch as m` would bind the attribute
    # deepspeed.comm.torch, which is the torch package (deepspeed.comm imports it)
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    if world_size != 1 or get_accelerator().device_name() != "cpu":
        return False
    ds_torch.build_shm_op = lambda: None
    return True


def ensure_deepspeed_ops(cache_dir=None, *, builders: Optional[list] = None,
                         load: Optional[Callable] = None) -> None:
    """Build or load DeepSpeed's ops (see the module doc). Call after importing deepspeed
    (:func:`moe.parallel.topology.import_deepspeed`) and before ``deepspeed.init_distributed``.
    Raises :class:`OpBuildError` (one line naming the file) instead of hanging."""
    builders = _builders() if builders is None else builders
    if not builders:
        return
    load = load or _load
    root, private = extensions_dir(cache_dir)
    timeout = _timeout_s()
    with build_lock(root, timeout):
        for b in builders:
            lock = root / b.name / TORCH_LOCK
            if private:
                if lock.exists():
                    # we hold the build lock, so no builder of ours is inside torch's baton
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
                    print(f"warning: removed stale DeepSpeed op build lock {lock} (left by "
                          "an interrupted build)", file=sys.stderr, flush=True)
            else:
                _wait_foreign_lock(lock, timeout)
            load(b)
