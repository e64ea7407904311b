"""Run-directory logging: metrics.jsonl (append-safe across resumes), optional TensorBoard,
and the matmul peak used for MFU.

``metrics.jsonl`` holds one JSON object per line; both kinds carry ``step`` (optimizer
steps done) and ``tokens`` (training tokens seen, all ranks):

* ``"kind": "train"`` (every ``train.log_every`` steps and the last): ``flops``, ``lr``
  (of that step), ``mtp_weight`` (lambda), ``loss`` (what was backpropagated),
  ``lm_loss``, ``mtp_loss_1..D``, ``balance_loss`` (sum over MoE layers) and, when
  non-zero, ``seq_aux`` / ``switch_aux`` / ``z_loss`` -- all means over the step's
  micro-batches and ranks; ``grad_norm`` (before clipping); ``tokens_per_s``,
  ``flops_per_s`` and ``mfu`` over the steps since the previous row (training time only,
  evaluation and checkpointing excluded); ``maxvio``: per MoE layer (main-model layers in
  order, then MTP blocks) the MaxVio of the step's token counts summed over micro-batches
  and ranks.
* ``"kind": "eval"`` (step 0, every ``train.eval_every`` steps, the end): ``lm_loss``,
  ``mtp_loss_1..D`` (token-weighted means over the first ``train.eval_batches`` global
  batches of the val split), ``eval_tokens`` and ``maxvio_global`` (per MoE layer, MaxVio
  of the counts summed over the whole eval set).

Non-finite floats are written as strings ("nan", "inf"). On resume every row with
``step`` beyond the checkpoint is dropped first (and a torn last line is ignored), so a
run killed between a checkpoint and its next rows and then resumed has each step once.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..runs import atomic_open

METRICS = "metrics.jsonl"


def _clean(v):
    # JSON has no NaN/inf; write them as strings so a diverged row is still valid JSON.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def read_rows(path: Path, skipped: Optional[list] = None,
              missing_ok: bool = True) -> list[dict]:
    """All complete rows of a metrics file (a torn last line from a crash is skipped;
    ``skipped`` gets the number of non-empty lines that are not JSON appended). A missing
    file has no rows, or raises FileNotFoundError without ``missing_ok``."""
    rows, bad = [], 0
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
    except FileNotFoundError:
        if not missing_ok:
            raise
    if skipped is not None:
        skipped.append(bad)
    return rows


class MetricsLog:
    """Writes metrics rows (rank 0 only; other ranks get a no-op instance)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                warnings.warn("train.tensorboard=true but tensorboard is not installed "
                              "(pip install tensorboard); logging to metrics.jsonl only")

    def truncate_after(self, step: int) -> None:
        """Drop rows with ``step > step`` (atomic rewrite); called once on resume."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_rows(self.path) if int(r.get("step", 0)) <= step]
        with atomic_open(self.path) as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")
            f.flush()
        if self.tb is not None:
            prefix = row.get("kind", "train")
            for k, v in row.items():
                if k in ("kind", "step"):
                    continue
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, row["step"])
                elif isinstance(v, list):
                    for i, x in enumerate(v):
                        if isinstance(x, (int, float)) and math.isfinite(float(x)):
                            self.tb.add_scalar(f"{prefix}/{k}/{i}", x, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# A peak measured once by the process that starts many CPU runs (the ladder's local
# executor): "FLOPS@THREADS", e.g. "8.3e10@1". Each run would otherwise spend ~2.4 s of a
# 1-thread core re-measuring the same number (33 runs: ~40 s of a 15-minute ladder).
PEAK_ENV = "MOE_TESTBED_CPU_FP32_PEAK"


def cpu_fp32_peak_env(threads: int) -> str:
    """The :data:`PEAK_ENV` value for runs with ``threads`` torch threads, measured here
    now (2048^3 fp32 matmuls at that thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return f"{measure_matmul_peak('cpu', torch.float32):.6e}@{threads}"
    finally:
        torch.set_num_threads(before)


def matmul_peak(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): :data:`PEAK_ENV` when it holds an fp32 CPU peak
    measured at this process's thread count, else :func:`measure_matmul_peak` now."""
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    given = os.environ.get(PEAK_ENV, "")
    if device == "cpu" and dtype == torch.float32 and "@" in given:
        value, threads = given.split("@", 1)
        try:
            if int(threads) == torch.get_num_threads():
                return float(value), f"measured fp32 matmul ({threads} threads, once per ladder)"
        except ValueError:
            pass
    return measure_matmul_peak(device, dtype), f"measured {name} matmul"


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32,
                        n: Optional[int] = None, repeats: int = 10) -> float:
    """Best observed FLOP/s of an n x n x n matmul (the MFU denominator when
    ``train.peak_flops`` is unset). Best-of-``repeats`` because the box is shared: the
    fastest repeat is the closest to what the hardware can do right now. Cached per
    process (~1 s on a 2-core CPU)."""
    if n is None:
        # CPU: 1024 already reaches the plateau on an idle 2-core Xeon (~420 GFLOP/s at
        # 1024-4096), but under load from other processes 1024 fell to 134 while 2048 gave
        # 200: the larger size is the more robust estimate. A peak measured on a busy box is
        # still low (MFU then overstated); it is recorded in summary.json.
        n = 2048 if device == "cpu" else 8192
    # a private generator: measuring must not advance the global RNG (exact resume)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm-up (thread pools, cuBLAS handles)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
