"""What every benchmark script shares: the environment record of a result row, the row
files, and the CPU malloc option.

The environment record (:func:`environment`) is the one rule for every row written under
benchmarks/results/ and for gpu_check's env.json:

- ``commit``: ``git rev-parse HEAD`` of this repository, with ``-dirty`` appended when a
  tracked file differs from HEAD (``git status --porcelain --untracked-files=no``: new,
  untracked files do not count); ``"unknown"`` where git or the repository is missing.
- ``python``, ``torch``, ``cuda`` (torch's CUDA version, None on a CPU build), ``triton``
  and ``deepspeed`` (the installed distributions' versions, None when not installed;
  read from their metadata, so nothing is imported: the GPU image has no deepspeed);
- ``device``: the GPU's name (with ``sm_count`` and ``memory_gib``), else
  ``"cpu: <model> (<cores> cores, <threads> threads)"``;
- ``time_utc``: when the record was made.

This module imports only the standard library at load time (torch when a record is made),
so the GPU image without deepspeed or megatron-core can run the kernel scripts.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def git_commit() -> str:
    """HEAD's hash, ``-dirty`` when a tracked file has changes, ``"unknown"`` without git
    (see the module docstring)."""
    def git(*args: str) -> str:
        return subprocess.check_output(["git", *args], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except Exception:
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dist_version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist`` (None when not installed)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """The machine and software a row was measured on (see the module docstring)."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "triton": dist_version("triton"),
           "deepspeed": dist_version("deepspeed"), "commit": git_commit(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(), sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
    else:
        env["device"] = f"cpu: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return env


def add_malloc_option(p) -> None:
    """``--malloc keep-freed|system`` for CPU benchmarks (moe/cpu_malloc.py); the default,
    kept freed memory, is what ``moe-testbed train`` does on CPU."""
    p.add_argument("--malloc", choices=["keep-freed", "system"], default="keep-freed",
                   help="glibc malloc keeps freed memory (the trainer's CPU default) or "
                        "returns large blocks to the OS on free (the process default)")


def apply_malloc_option(p, args) -> str:
    """Apply ``args.malloc`` to this process (an argparse error off glibc); returns the mode
    to record per row."""
    from moe.cpu_malloc import keep_freed_memory, malloc_mode

    if args.malloc == "keep-freed" and not keep_freed_memory():
        p.error("--malloc keep-freed needs glibc; pass --malloc system")
    return malloc_mode()


def append_rows(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
