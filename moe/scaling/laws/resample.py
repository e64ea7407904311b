"""Bootstrap over whole runs: percentile intervals for fitted and derived quantities.

    python -c "from moe.scaling import *; print(bootstrap(lambda r: fit_chinchilla(*r), load_chinchilla_points(), n_boot=20)['params']['a'])"

Each replicate resamples RUNS with replacement (a run's N, D and loss stay together) and
re-runs the full multi-start fit, as Besiroglu et al. 2024 prescribe: resampling residuals
or reusing the point estimate as the only start understates the spread of a fit whose
optimum can jump between basins.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["bootstrap", "resample_rows"]


def _n_items(rows) -> int:
    if isinstance(rows, tuple):
        sizes = {len(np.asarray(a)) for a in rows}
        if len(sizes) != 1:
            raise ValueError(f"parallel arrays have different lengths: {sorted(sizes)}")
        return sizes.pop()
    return len(rows)


def resample_rows(rows, idx: np.ndarray):
    """Take runs `idx` from rows: a list (of dicts), an ndarray (axis 0), or a tuple of
    parallel arrays (each indexed the same way, e.g. (N, D, loss))."""
    if isinstance(rows, tuple):
        return tuple(np.asarray(a)[idx] for a in rows)
    if isinstance(rows, np.ndarray):
        return rows[idx]
    return [rows[i] for i in idx]


def _scalars(d: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (bool, np.bool_)) or k.startswith("_"):
            continue
        if isinstance(v, (int, float, np.integer, np.floating)):
            out[k] = float(v)
    return out


def _workers(workers: int | None, n_boot: int) -> int:
    import multiprocessing

    if workers is None:
        workers = min(4, os.cpu_count() or 1) if n_boot >= 20 else 1
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(int(workers), n_boot))


def _map_replicates(replicate: Callable[[int], Any], n_boot: int, workers: int,
                    progress: bool) -> list:
    """[replicate(b) for b in range(n_boot)], the work split over `workers` processes.

    Each forked child runs every workers-th replicate and sends back its (pickled) rows;
    the parent runs its own share meanwhile. Forked, not spawned: the fit closures need no
    pickling and the children start with the parent's imports. They run numpy/scipy only
    (no torch op, whose OpenMP pool is not fork-safe). Measured on the 2-core box: the 33
    runs of the CPU ladder fitted in ~1.5 min with 2 workers instead of ~3.
    """
    import multiprocessing

    mine = list(range(0, n_boot, workers))
    if workers == 1:
        it = mine
    else:
        ctx = multiprocessing.get_context("fork")
        procs = []
        for w in range(1, workers):
            recv, send = ctx.Pipe(duplex=False)

            def child(w=w, send=send):
                send.send([replicate(b) for b in range(w, n_boot, workers)])
                send.close()

            pr = ctx.Process(target=child, daemon=True)
            pr.start()
            send.close()
            procs.append((w, pr, recv))
        it = mine
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="bootstrap", leave=False)
    out: list = [None] * n_boot
    for b in it:
        out[b] = replicate(b)
    if workers > 1:
        for w, pr, recv in procs:
            try:
                part = recv.recv()
            except EOFError:
                pr.join()
                raise RuntimeError(f"bootstrap worker {w} died (exit code {pr.exitcode})") from None
            pr.join()
            for b, row in zip(range(w, n_boot, workers), part):
                out[b] = row
    return out


def bootstrap(fit_fn: Callable[[Any], Mapping[str, Any]], rows, *, n_boot: int = 200,
              seed: int | None = 0, derived: Mapping[str, Callable[[Mapping], float]] | None = None,
              level: float = 0.95, params: Sequence[str] | None = None,
              progress: bool | None = None, keep_samples: bool = True,
              replicate_fn: Callable[[Any], Mapping[str, Any]] | None = None,
              workers: int | None = None) -> dict:
    """Percentile bootstrap of `fit_fn` over whole runs.

    fit_fn(rows) -> dict of fitted values (numbers; non-numeric entries are ignored).
    rows: list of run dicts, ndarray (runs on axis 0) or tuple of parallel arrays.
    Each of n_boot replicates draws len(rows) runs with replacement from a
    numpy Generator seeded by `seed` and calls fit_fn on them (the full fit, every time).
    derived: name -> f(fitted dict) -> float, e.g. {"a": lambda p: p["beta"]/(p["alpha"]+p["beta"])}
    or a predicted loss at a held-out point; evaluated on the point fit and every replicate.
    params: which fitted keys to summarise (default every numeric key of the point fit).
    A replicate whose fit raises ValueError/RuntimeError/LinAlgError (e.g. too few distinct
    runs drawn) or returns non-finite values counts as failed and is left out (n_failed).
    progress: tqdm bar; default on only when n_boot >= 50 and stderr is a terminal.
    replicate_fn: the fit used for the replicates when it differs from the point fit's
    (e.g. fewer multi-start points, where measured to reach the same optimum).
    workers: processes sharing the replicates (forked, so fit_fn need not pickle); default
    the CPU count (at most 4) when n_boot >= 20 and fork exists, else 1. The resamples are
    drawn up front, so the result is the same for any number of workers.

    Returns {"point": fitted dict on all rows, "n_boot", "n_failed", "level",
             "params": {name: {"estimate", "median", "lo", "hi", "std"}},
             "derived": {name: {...same...}}, "samples": {name: array (n_boot,)}}.
    """
    from numpy.linalg import LinAlgError

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = _n_items(rows)
    if n < 2:
        raise ValueError(f"bootstrap needs at least 2 runs, got {n}")
    derived = dict(derived or {})
    point = fit_fn(rows)
    point_vals = _scalars(point)
    names = list(params) if params is not None else list(point_vals)
    for k, f in derived.items():
        point_vals[k] = float(f(point))
    keys = names + list(derived)
    rng = np.random.default_rng(seed)
    # All resamples drawn up front, in the order a serial loop draws them: the result does
    # not depend on how the replicates are shared among processes.
    idx_all = [rng.integers(0, n, size=n) for _ in range(n_boot)]
    if progress is None:
        progress = n_boot >= 50 and sys.stderr.isatty()
    fit_rep = replicate_fn or fit_fn

    def replicate(b):
        """Values of replicate b in `keys` order, or None when it failed."""
        try:
            fit = fit_rep(resample_rows(rows, idx_all[b]))
            vals = _scalars(fit)
            for k, f in derived.items():
                vals[k] = float(f(fit))
        except (ValueError, RuntimeError, ArithmeticError, LinAlgError):
            return None
        row = np.array([vals.get(k, np.nan) for k in keys], float)
        return row if np.all(np.isfinite(row)) else None

    results = _map_replicates(replicate, n_boot, _workers(workers, n_boot), progress)
    samples = {k: np.full(n_boot, np.nan) for k in keys}
    n_failed = 0
    for b, row in enumerate(results):
        if row is None:
            n_failed += 1
            continue
        for k, v in zip(keys, row):
            samples[k][b] = v
    q = 100.0 * (1.0 - level) / 2.0

    def summary(k):
        s = samples[k][np.isfinite(samples[k])]
        if s.size == 0:
            nan = float("nan")
            return {"estimate": point_vals.get(k, nan), "median": nan, "lo": nan, "hi": nan,
                    "std": nan}
        lo, med, hi = np.percentile(s, [q, 50.0, 100.0 - q])
        return {"estimate": point_vals.get(k, float("nan")), "median": float(med),
                "lo": float(lo), "hi": float(hi), "std": float(s.std(ddof=1)) if s.size > 1 else 0.0}

    out = {"point": point, "n_boot": int(n_boot), "n_failed": int(n_failed), "level": level,
           "params": {k: summary(k) for k in names},
           "derived": {k: summary(k) for k in derived}}
    if keep_samples:
        out["samples"] = samples
    return out
