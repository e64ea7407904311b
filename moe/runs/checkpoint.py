"""Atomic, pickle-free training checkpoints.

Layout under ``RUN_DIR/checkpoints/``::

    step_00000100/          one checkpoint (a directory)
        meta.json           step, tokens, flops, world size, files, versions
        model.pt            module state dict (expert biases are buffers in it)   [rank 0]
        model_tpTT_epEEE.pt instead of model.pt when parallel.tp/ep > 1: one file per
                            (tensor-parallel rank, expert-parallel rank) shard  [its first
                            expert-data-parallel replica]
        rank00000.pt        optimizer + scheduler + data-loader + RNG state      [each rank]
    latest                  text file naming the newest complete checkpoint directory

Writing is atomic at the directory level: every rank writes into ``.tmp-step_...``; after
a barrier rank 0 fsyncs the files and the directory, renames it to ``step_...`` and only
then replaces ``latest`` (:func:`moe.runs.atomic.atomic_write`: temp file, fsync,
``os.replace``, directory fsync). A crash at any point leaves ``latest`` naming the
previous complete checkpoint; leftover ``.tmp-*`` directories are removed by the next save.
Model shard file names and their merging: :mod:`moe.runs.shards`.

Every file is ``torch.save``-d plain data (dicts, lists, numbers, strings, tensors) so it
loads with ``torch.load(weights_only=True)``: no pickle, no code execution from a
checkpoint. RNG states are stored as tensors for the same reason.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .atomic import atomic_write, fsync_dir

CKPT_DIR = "checkpoints"
LATEST = "latest"


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def rank_filename(rank: int) -> str:
    return f"rank{rank:05d}.pt"


# --------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` + flush + fsync (the bytes are on disk before any rename)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded as plain tensors and data."""


def load_file(path: Path) -> Any:
    """Load one checkpoint file safely (``weights_only=True``, onto CPU).

    Raises :class:`CheckpointError` ("untrusted or corrupt checkpoint FILE") when torch
    refuses it: it holds objects other than tensors and plain data, or is damaged.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        # torch's own message advises weights_only=False: never for a file we cannot trust
        raise CheckpointError(f"untrusted or corrupt checkpoint {path} ({type(e).__name__}: "
                              "it does not load as the plain tensors and data this trainer "
                              "writes)") from None


# --------------------------------------------------------------------------------------
# Save / find / load
# --------------------------------------------------------------------------------------


def _noop(*_args) -> None:
    return None


def save_checkpoint(run_dir: Path, step: int, rank_state: dict, *, model_state: Optional[dict],
                    meta: dict, rank: int = 0, world_size: int = 1,
                    model_file: str = "model.pt", model_files: Optional[list[str]] = None,
                    barrier: Callable[[], None] = _noop, keep_last: int = 2,
                    any_failed: Callable[[bool], bool] = bool,
                    _before_publish: Callable[[Path], None] = _noop) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; return its path.

    Collective: every rank calls it (``barrier`` synchronises them). ``model_state`` is
    passed by the ranks that write ``model_file``: rank 0 under data parallelism (all
    replicas are identical), one replica per (tp, ep) shard under model parallelism;
    ``model_files`` lists every shard's file (default ``[model_file]``). ``keep_last``
    older complete checkpoints are kept besides the new one. ``_before_publish`` is a test
    hook called with the temporary directory just before it is renamed into place.

    A write that fails (ENOSPC: disk full, EIO, ...) on any rank raises
    :class:`CheckpointWriteError` on every rank (``any_failed``: True on every rank when
    any rank passes True, e.g. an all-reduce; default: this rank only): the partial
    directory is removed and ``latest`` still names the previous complete checkpoint.
    """
    root = Path(run_dir) / CKPT_DIR
    name = step_dirname(step)
    tmp = root / f".tmp-{name}"
    error: Optional[OSError] = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # left by a crash mid-write
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    barrier()
    if error is None and tmp.is_dir():
        try:
            save_file(rank_state, tmp / rank_filename(rank))
            if model_state is not None:
                save_file(model_state, tmp / model_file)
        except OSError as e:
            error = e
    barrier()
    if any_failed(error is not None):
        _write_failed(run_dir, tmp, name, rank, error)
    final = root / name
    if rank == 0:
        try:
            _publish(run_dir, root, tmp, final, name, step, world_size, meta,
                     list(model_files or [model_file]), keep_last, _before_publish)
        except OSError as e:
            error = e
    barrier()
    if any_failed(error is not None):
        _write_failed(run_dir, tmp, name, rank, error)
    return final


def _publish(run_dir: Path, root: Path, tmp: Path, final: Path, name: str, step: int,
             world_size: int, meta: dict, model_files: list[str], keep_last: int,
             before_publish: Callable[[Path], None]) -> None:
    """Rank 0: meta.json into ``tmp``, rename it to ``final``, point ``latest`` at it."""
    meta = dict(meta, step=step, world_size=world_size,
                files=model_files + [rank_filename(r) for r in range(world_size)])
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    before_publish(tmp)
    try:
        current = latest_checkpoint(run_dir)
    except RuntimeError:  # `latest` names a broken checkpoint: replaced below
        current = None
    if final.exists():
        if current is not None and current.resolve() == final.resolve() \
                and check_checkpoint(final) is None:
            # The same step is already the published checkpoint (a finished run
            # resumed and saved again): keep it rather than open a window in which
            # ``latest`` names a missing directory.
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(final)  # an unpublished leftover of the same step
    os.rename(tmp, final)
    fsync_dir(root)
    atomic_write(root / LATEST, name + "\n")
    _prune(root, keep_last, keep={name})


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous complete one is still ``latest``."""


def _write_failed(run_dir: Path, tmp: Path, name: str, rank: int,
                  error: Optional[OSError]) -> None:
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the partial files (and the space they hold)
    try:
        kept = latest_checkpoint(run_dir)
    except RuntimeError:
        kept = None
    why = (f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
           if error is not None else "another rank failed to write its part")
    keep = (f"the last good checkpoint {kept} is kept" if kept is not None
            else "there is no earlier checkpoint")
    raise CheckpointWriteError(f"cannot write checkpoint {name} in {Path(run_dir) / CKPT_DIR}: "
                               f"{why}; {keep}; free space and rerun with --resume")


def _prune(root: Path, keep_last: int, keep: set) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    old = [p for p in steps if p.name not in keep]
    for p in old[:max(0, len(old) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint directory ``latest`` names, or None when there is none (complete
    checkpoints only: ``latest`` is written after the directory is in place)."""
    root = Path(run_dir) / CKPT_DIR
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    if not name or not (path / "meta.json").is_file():
        raise RuntimeError(f"{root / LATEST} names {name!r}, which is not a complete checkpoint")
    return path


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def check_checkpoint(path: Path) -> Optional[str]:
    """None when checkpoint directory ``path`` looks usable, else what is wrong with it:
    meta.json missing or not JSON, a file it lists missing, empty or not a complete
    torch.save archive (its zip directory sits at the end, so a truncated file fails)."""
    import zipfile

    path = Path(path)
    try:
        meta = read_meta(path)
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable or not JSON ({e})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, list) or not files:
        return "meta.json lists no files"
    for name in files:
        f = path / str(name)
        if not f.is_file():
            return f"{name} is missing"
        try:
            with zipfile.ZipFile(f) as z:
                z.infolist()
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            return f"{name} is unreadable or truncated ({e})"
    return None


def usable_checkpoint(run_dir: Path) -> tuple[Optional[Path], list[str]]:
    """(checkpoint to resume from, problems of the newer ones skipped).

    The one ``latest`` names if :func:`check_checkpoint` finds it usable, else the newest
    older complete one. (None, []) when there is no ``latest`` (no checkpoint was ever
    published); (None, problems) when none is usable.
    """
    root = Path(run_dir) / CKPT_DIR
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None, []
    except (OSError, UnicodeDecodeError) as e:
        name, problems = "", [f"{root / LATEST} is unreadable ({e})"]
    else:
        problems = []
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    if name.startswith("step_"):
        named = root / name
        cands = [named] + [p for p in steps if p.name < name]
        if not named.is_dir():
            problems.append(f"{root / LATEST} names {name}, which is missing")
            cands = cands[1:]
    else:
        if name:
            problems.append(f"{root / LATEST} names {name!r}, not a checkpoint")
        cands = steps
    for c in cands:
        bad = check_checkpoint(c)
        if bad is None:
            return c, problems
        problems.append(f"checkpoint {c} is unusable: {bad}")
    return None, problems


# --------------------------------------------------------------------------------------
# RNG state as tensors / plain data
# --------------------------------------------------------------------------------------


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states, weights_only-loadable."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
