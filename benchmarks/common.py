"""Shared helpers for benchmark scripts: environment record and result rows."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                        text=True, stderr=subprocess.DEVNULL).strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "commit": git_commit(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    for mod in ("triton", "deepspeed"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
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
