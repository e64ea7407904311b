"""Refuse, before allocating anything, a model that cannot fit this machine (issue 16).

The bound is :func:`moe.accounting.train_memory_lower_bound` (the config's own parameter
accounting, optimistic); it is compared with the memory available to one rank: CPU, the
kernel's ``MemAvailable`` shared by the ranks on this host (``LOCAL_WORLD_SIZE``); CUDA,
the device's free memory. A run refused here would have died later (OOM kill, CUDA OOM,
or the machine swapping to a halt) after preparing data and building the model.
"""

from __future__ import annotations

import os
from typing import Optional


def available_bytes(device: str) -> Optional[tuple[float, str]]:
    """(bytes one rank may use, what was measured), or None when unknown."""
    if device == "cuda":
        import torch

        try:
            free, _ = torch.cuda.mem_get_info()
        except RuntimeError:
            return None
        return float(free), "free GPU memory"
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = float(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    what = "available RAM" + (f" / {local} local ranks" if local > 1 else "")
    return avail / local, what


def check_fits(cfg, device: str, world: int, tp: int = 1) -> Optional[str]:
    """None if ``cfg`` may fit, else one line saying why it cannot."""
    from ..accounting import GIB, TRAIN_BYTES_PER_PARAM, train_memory_lower_bound

    have = available_bytes(device)
    if have is None:
        return None
    avail, what = have
    need = train_memory_lower_bound(cfg, world, tp)
    if need["total"] <= avail:
        return None
    return (f"model {cfg.name!r} cannot fit this machine: it needs at least "
            f"{need['total'] / GIB:.1f} GiB per rank ({need['params']:,} parameters x "
            f"{TRAIN_BYTES_PER_PARAM} bytes for weights, gradients and AdamW state over "
            f"{world} rank(s) = {need['state'] / GIB:.1f} GiB, + activations >= "
            f"{need['activations'] / GIB:.1f} GiB), {what} is {avail / GIB:.1f} GiB; "
            "use smaller model.* / train.micro_batch_size or more ranks")
