"""Keep freed memory inside the process on CPU (glibc malloc), so large tensors reuse it.

Why: PyTorch's CPU allocator is plain ``posix_memalign``/``free``. glibc serves blocks
above its mmap threshold (at most 32 MiB, usually less) with a fresh ``mmap`` and unmaps
them on ``free``, so every large activation of every step is page-faulted in and zeroed
by the kernel again. Measured on the project's 2-core Xeon (torch 2.13): allocating and
filling a 32 MiB tensor took 7.6 ms against 0.65 ms for filling a kept one; a MoE layer's
forward+backward at T=4096, E=64, k=8 makes a dozen such (T*k, d_model) tensors and took
169 ms instead of 122 ms; the README's tiny-moe training ran 91 s (33 s of it system
time) instead of 79 s (1.6 s).
The CUDA side has PyTorch's caching allocator; on CPU the usual remedies are an allocator
preloaded with ``LD_PRELOAD`` (jemalloc/tcmalloc, as ``torch.backends.xeon.run_cpu``
does) or glibc's own tunables, which is what :func:`keep_freed_memory` sets, at run time
through ``mallopt`` (the ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` environment
variables do the same but must be set before the process starts).

Cost: the process keeps its peak heap (as a caching allocator keeps its pool) instead of
handing memory back to the OS between steps. Only glibc is tuned; elsewhere (macOS,
musl) this is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_state: str | None = None  # "kept" once applied, or why it was not


def _libc():
    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name) if name else ctypes.CDLL(None)
    if not hasattr(lib, "mallopt") or not hasattr(lib, "gnu_get_libc_version"):
        return None
    return lib


def keep_freed_memory() -> bool:
    """Tell glibc malloc to never ``mmap`` a block and to never trim the heap below 2 GiB
    of free top memory: freed tensors stay mapped and the next allocation reuses them.

    Idempotent; returns True when the setting is in force (False on a non-glibc libc).
    """
    global _state
    if _state == "kept":
        return True
    lib = _libc()
    if lib is None:
        _state = "not glibc: malloc left as is"
        log.info("cpu malloc: %s", _state)
        return False
    ok = lib.mallopt(_M_MMAP_MAX, 0) == 1 and lib.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    _state = "kept" if ok else "mallopt refused the settings"
    return ok


def malloc_mode() -> str:
    """'keep-freed' when :func:`keep_freed_memory` is in force, else 'system' (for records)."""
    return "keep-freed" if _state == "kept" else "system"
