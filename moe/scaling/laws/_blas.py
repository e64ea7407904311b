"""Run small fits with single-threaded BLAS.

scipy's L-BFGS-B calls BLAS/LAPACK on 3-5-dimensional problems thousands of times per
bootstrap. On this project's shared 2-core machines OpenBLAS's worker threads spin-wait on
those tiny calls: 100 three-parameter power-law fits measured 2.85 s with the default
thread pool and 0.43 s with one thread (same machine, minutes apart). threadpoolctl limits
every BLAS loaded in the process and restores the previous counts on exit.
"""
from __future__ import annotations

from threadpoolctl import threadpool_limits


def single_threaded_blas():
    """Context manager: BLAS at 1 thread inside, previous counts restored on exit."""
    return threadpool_limits(limits=1, user_api="blas")
