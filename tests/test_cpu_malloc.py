"""moe.cpu_malloc: with glibc tuned, re-allocating a large tensor reuses kept memory
instead of page-faulting fresh pages in (the cause of ~28% of the CPU MoE layer's time).
Each case runs in its own interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import torch
if sys.argv[1] == "keep":
    from moe.cpu_malloc import keep_freed_memory, malloc_mode
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
    mode = malloc_mode()
else:
    mode = "system"
for _ in range(3):                          # grow the heap (if kept) to its working size
    torch.empty(16 * 2**20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(16 * 2**20).fill_(1.0)      # allocate, touch every page, free
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"mode": mode, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    # 5 x 64 MiB = 81,920 4-KiB pages touched. The system default maps and unmaps each
    # block (a fault per page, or per 2 MiB with transparent huge pages: >= 160);
    # kept, the heap's pages stay mapped. (The first allocations after the setting may
    # still fault while the heap grows to its working size: hence three warm-ups.)
    system, kept = _probe("system"), _probe("keep")
    assert system["mode"] == "system" and kept["mode"] == "keep-freed"
    assert system["faults"] >= 160, system
    assert kept["faults"] < 100, kept
    assert kept["faults"] * 10 < system["faults"]
