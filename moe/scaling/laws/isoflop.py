"""Chinchilla approach 2 (IsoFLOP profiles), done the way Porian et al. 2024 do it.

    python -c "from moe.scaling import *; N, D, L = load_chinchilla_points(0); print(fit_isoflop(6*N*D, N, L, D, nominal=CHINCHILLA_ISOFLOP_BUDGETS)['exponent'])"

Procedure (Porian et al. 2024, "Resolving discrepancies in compute-optimal scaling of
language models"; their code, formll/resolving-scaling-law-discrepancies, `interp_flop`):

1. Group runs by FLOP budget (`_group_runs`). Without `nominal` budgets: sort the log
   FLOPs and start a new budget wherever two neighbours differ by more than a factor
   (1 + rtol); budget value = geometric mean of its runs' FLOPs. With `nominal` budgets (as
   Porian et al. do): each run goes to the nearest nominal budget if within a factor
   (1 + rtol) of it (their `flop_tolerance`), else it is unassigned; budget value = nominal.
2. Per budget (`_budget_optimum`): runs of the same N collapse to the lowest loss (their
   `groupby_action="min"`); k = distinct N; a budget with k < 3 is dropped. Akima
   interpolation (scipy.interpolate.Akima1DInterpolator, method "akima") of ln loss against
   ln N, evaluated on a geometric grid of (k - 1) * 25 points from the budget's smallest to
   largest N; N* = the grid argmin, loss* = the interpolated loss there. A budget whose
   argmin is the grid's first or last point is dropped: its runs do not bracket a minimum.
3. Ordinary least squares of ln N* on ln C over the kept budgets (`_ols`), natural logs:
   ln N* = intercept + exponent ln C, i.e. N* = exp(intercept) C^exponent.
4. Uncertainty (`_bootstrap_budgets`): resample the KEPT budgets with replacement (whole
   budgets) and refit the OLS; a replicate with fewer than 2 distinct budgets fails and is
   counted; percentile interval at `level`. With fewer than MIN_BUDGETS_FOR_INTERVAL (4)
   kept budgets no interval is given (`interval_note` says why): with 2 every successful
   replicate is the same line, with 3 nearly all are, so the percentiles would only
   restate the point estimate (a CPU IsoFLOP ladder with 3 budgets gave [0.445, 0.449]).
   (Porian et al. instead add seed-level noise to every loss, redo each budget's Akima
   argmin 1000 times, and fit the medians with inverse-variance weights; that needs a
   per-run noise model this testbed does not have.)

D* (with `tokens`) is found the way Porian et al. find their t*: a second Akima
interpolation, of ln loss against ln D, on a geometric grid of the same size from the
budget's smallest to largest D; D* = its argmin; then OLS of ln D* on ln C. Not C / (6 N*):
that assumes C = 6 N D, which FLOP counts with the attention term or MoE active/total
parameters do not satisfy, and it hides the spread of C within a budget. Where C = 6 N D
holds exactly within a budget the two agree: Akima is symmetric under x -> -x, so the D
profile is the N profile mirrored and D* = C / (6 N*) to rounding (tested: 7e-15). Keeping
or dropping a budget is N*'s decision alone (as in Porian et al.); `d_edge` says whether
D*'s argmin was itself on an edge.

Measured (tests/test_scaling_isoflop.py, 2 CPU cores, ~0.2 s per fit with 1000 replicates):
- noise-free law L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28, D = C/(6N), nine budgets
  1e18..1e22, 16 sizes per budget from one global log grid (8 per decade) within 10x of each
  optimum: exponent 0.451693 vs beta/(alpha+beta) = 0.451613 (relative error 1.8e-4),
  d_exponent 0.548307 vs 0.548387 (-1.5e-4); every N* within 0.5% of the analytic
  optimum (the interpolation grid steps by 1.2% in N).
- the 245 digitised Chinchilla Figure-4 points with the nine nominal budgets
  (CHINCHILLA_ISOFLOP_BUDGETS) at the default rtol 0.1: all nine kept (121 runs assigned,
  124 outside every window), exponent 0.486, 95% budget-bootstrap interval (0.400, 0.537),
  80% (0.434, 0.518); d_exponent 0.502. Hoffmann et al. publish a = 0.49 (0.462, 0.534,
  10th-90th percentiles) and b = 0.51 (0.483, 0.529) for approach 2, from parabola fits.
  Clustering those points without nominal budgets does NOT recover the nine budgets: the
  figure also holds approach-1 runs at FLOPs between them, so neighbouring budgets chain
  (at rtol 0.1 one "budget" spans 1.6e19-1.5e20) and the exponent moves to 0.573.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.interpolate import Akima1DInterpolator

__all__ = ["CHINCHILLA_ISOFLOP_BUDGETS", "fit_isoflop", "isoflop_predict_n"]

#: Hoffmann et al. 2022, Figure 3: the nine IsoFLOP budgets of approach 2 (legend values).
CHINCHILLA_ISOFLOP_BUDGETS = (6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21)

#: grid points per gap between distinct sizes (Porian et al.'s interp_num_multiplier)
GRID_PER_GAP = 25

#: Default relative FLOP tolerance: Porian et al.'s default `flop_tolerance`. Wider windows
#: pull runs of other FLOPs into a profile: on the digitised Chinchilla points (which also
#: hold approach-1 runs between the nine budgets) the exponent measured 0.486 at 0.1,
#: 0.520 at 0.15, 0.605 at 0.2, 0.592 at 0.25. For clustering it merges runs whose FLOPs
#: differ by step rounding (< 1%) and splits ladders whose budgets are >= 1.1x apart.
DEFAULT_RTOL = 0.1

#: Sizes (N, or D for the D profile) closer than this relative gap are one model: the
#: digitised Chinchilla points repeat a model size with 2e-7..7e-7 relative differences
#: (SVG coordinates), and two runs that close make Akima's slopes explode (before this
#: merge the 6e19 profile's minimum fell to a loss of ~0, moving the exponent from 0.486 to
#: 0.502). Real distinct sizes differ by far more.
SAME_SIZE_RTOL = 1e-4


# ------------------------------------------------------------------------------ steps


def _as_pos(name: str, x, size: int | None = None) -> np.ndarray:
    x = np.asarray(x, float).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"{name} must be non-empty, finite and > 0")
    if size is not None and x.size != size:
        raise ValueError(f"{name} has {x.size} values, flops has {size}")
    return x


def _group_runs(flops: np.ndarray, rtol: float, nominal: np.ndarray | None):
    """Budget label per run (-1: no budget) and the budget values, ascending."""
    tol = math.log1p(rtol)
    logc = np.log(flops)
    if nominal is not None:
        logb = np.log(nominal)
        nearest = np.abs(logc[:, None] - logb[None, :]).argmin(axis=1)
        label = np.where(np.abs(logc - logb[nearest]) <= tol, nearest, -1)
        return label, nominal
    order = np.argsort(logc, kind="stable")
    starts = np.r_[True, np.diff(logc[order]) > tol]
    label = np.empty(flops.size, int)
    label[order] = np.cumsum(starts) - 1
    values = np.array([math.exp(logc[label == g].mean()) for g in range(label.max() + 1)])
    return label, values


def _one_run_per_size(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the lowest-loss run of each distinct x (x within SAME_SIZE_RTOL: same)."""
    order = np.lexsort((loss, x))
    lx = np.log(x[order])
    group = np.cumsum(np.r_[True, np.diff(lx) > math.log1p(SAME_SIZE_RTOL)])
    best = {}
    for i, g in zip(order, group):
        if g not in best or loss[i] < loss[best[g]]:
            best[g] = i
    return np.array(sorted(best.values(), key=lambda i: x[i]), int)


def _akima_argmin(x: np.ndarray, loss: np.ndarray):
    """Grid argmin of the Akima interpolant of ln loss vs ln x: (x*, loss*, index, grid size)."""
    order = np.argsort(x)
    lx, ll = np.log(x[order]), np.log(loss[order])
    m = (x.size - 1) * GRID_PER_GAP
    grid = np.linspace(lx[0], lx[-1], m)  # = ln of np.geomspace(x.min(), x.max(), m)
    vals = Akima1DInterpolator(lx, ll)(grid)
    i = int(np.argmin(vals))
    return math.exp(grid[i]), math.exp(vals[i]), i, m


def _budget_optimum(c: float, flops, n, loss, tokens):
    """One budget: (kept dict, None) or (None, dropped dict)."""
    n_runs = int(n.size)
    span = [float(flops.min()), float(flops.max())] if n_runs else []

    def drop(reason):
        return None, {"flops": c, "reason": reason, "n_runs": n_runs, "flops_range": span}

    keep = _one_run_per_size(n, loss)
    n, loss = n[keep], loss[keep]
    tokens = tokens[keep] if tokens is not None else None
    k = int(n.size)
    if k < 3:
        return drop(f"fewer than 3 distinct N ({k} distinct in {n_runs} runs)")
    n_opt, loss_opt, i, m = _akima_argmin(n, loss)
    if i == 0:
        return drop(f"edge argmin: interpolated minimum at the smallest N ({n.min():.4g})")
    if i == m - 1:
        return drop(f"edge argmin: interpolated minimum at the largest N ({n.max():.4g})")
    out = {"flops": c, "flops_range": span, "n_opt": n_opt, "loss_opt": loss_opt,
           "n_runs": n_runs, "n_sizes": k}
    if tokens is not None:
        first = _one_run_per_size(tokens, loss)
        if first.size < 3:
            return drop(f"fewer than 3 distinct D ({first.size})")
        d_opt, _, j, md = _akima_argmin(tokens[first], loss[first])
        out["d_opt"] = d_opt
        out["d_edge"] = bool(j == 0 or j == md - 1)
    return out, None


def _ols(logc: np.ndarray, logy: np.ndarray) -> dict:
    """ln y = intercept + exponent ln C; r2 (None if every y is equal) and residual std
    (ddof 2; None for 2 budgets)."""
    X = np.column_stack([np.ones_like(logc), logc])
    (b0, b1), *_ = np.linalg.lstsq(X, logy, rcond=None)
    resid = logy - (b0 + b1 * logc)
    ss_tot = float(np.sum((logy - logy.mean()) ** 2))
    r2 = 1.0 - float(resid @ resid) / ss_tot if ss_tot > 0 else None
    dof = logc.size - 2
    return {"exponent": float(b1), "intercept": float(b0), "r2": r2,
            "resid_std": float(math.sqrt(resid @ resid / dof)) if dof > 0 else None,
            "exponent_se": (float(math.sqrt(resid @ resid / dof / np.sum((logc - logc.mean())
                                                                         ** 2)))
                            if dof > 0 else None), "dof": dof}


def _profile_interval(fit: dict, level: float) -> dict | None:
    """Profile-likelihood interval of the OLS slope under Gaussian errors in ln N*: for a
    linear model it is exactly the t interval, exponent +- t_(dof, (1+level)/2) x se.
    None below MIN_BUDGETS_FOR_INTERVAL budgets, as for the bootstrap: with 3 the one
    residual degree of freedom makes the width itself a single draw (the committed CPU
    IsoFLOP ladder's 3 budgets gave +-0.002 around a = 0.445, where three points that
    happen to lie on a line say nothing of how far a fourth would)."""
    from scipy.stats import t as t_dist

    if fit["exponent_se"] is None or fit["dof"] + 2 < MIN_BUDGETS_FOR_INTERVAL:
        return None
    half = float(t_dist.ppf(0.5 + level / 2.0, fit["dof"])) * fit["exponent_se"]
    return {"lo": fit["exponent"] - half, "hi": fit["exponent"] + half, "dof": fit["dof"]}


#: kept budgets below which fit_isoflop gives no exponent interval (see step 4 above)
MIN_BUDGETS_FOR_INTERVAL = 4


def _bootstrap_budgets(logc, logys, n_boot, seed, level):
    """Whole-budget bootstrap of the OLS for each y in logys (same draws for all)."""
    rng = np.random.default_rng(seed)
    nb = logc.size
    reps = [[] for _ in logys]
    failed = 0
    for _ in range(n_boot):
        idx = rng.integers(0, nb, size=nb)
        if np.unique(idx).size < 2:
            failed += 1
            continue
        for r, logy in zip(reps, logys):
            f = _ols(logc[idx], logy[idx])
            r.append((f["intercept"], f["exponent"]))
    q = 100.0 * (1.0 - level) / 2.0

    def interval(r):
        if not r:
            return None
        lo, hi = np.percentile([e for _, e in r], [q, 100.0 - q])
        return {"lo": float(lo), "hi": float(hi)}

    return [{"interval": interval(r), "exponents": [float(e) for _, e in r],
             "intercepts": [float(b) for b, _ in r]} for r in reps], failed


# ----------------------------------------------------------------------------- public


def fit_isoflop(flops, n, loss, tokens=None, *, nominal: Sequence[float] | None = None,
                rtol: float = DEFAULT_RTOL, n_boot: int = 1000, seed: int | None = 0,
                level: float = 0.95) -> dict:
    """Chinchilla approach 2: per-budget Akima argmin N*, then OLS of ln N* on ln C.

    flops, n, loss (and optionally tokens): one value per run. nominal: budget values to
    assign runs to (nearest within a factor 1 + rtol; others are unassigned); None clusters
    the runs' FLOPs (neighbours within a factor 1 + rtol share a budget; the chain can span
    more). See the module docstring for the full procedure.

    Returns a plain, JSON-serialisable dict:
      exponent, intercept: ln N* = intercept + exponent ln C (natural log), C in FLOPs;
      exponent_interval: {lo, hi} percentile interval at `level` (None if every replicate
        failed, n_boot = 0 or fewer than MIN_BUDGETS_FOR_INTERVAL budgets were kept;
        interval_note then says which); exponent_profile_interval: {lo, hi, dof}, the
        profile-likelihood (= t) interval of the slope at `level` (None below
        MIN_BUDGETS_FOR_INTERVAL kept budgets); r2, resid_std (ddof 2; None with 2 budgets) of that OLS;
      n_budgets; budgets: one dict per KEPT budget, ascending C, {flops, flops_range
        ([min, max] of its runs' FLOPs), n_opt, loss_opt (at N*), n_runs, n_sizes (distinct
        N)} (+ d_opt, d_edge with tokens);
      dropped: [{flops, reason, n_runs, flops_range}], reason "fewer than 3 distinct N ..."
        or "edge argmin: ..." (or "fewer than 3 distinct D" with tokens);
      unassigned_runs: runs further than rtol from every nominal budget (0 when clustering);
      n_boot, failed_replicates, seed, level, rtol;
      exponent_replicates, intercept_replicates: the successful replicates, paired by index
        (so a caller can propagate the joint uncertainty of N*(C));
      with tokens: d_exponent, d_intercept, d_exponent_interval,
        d_exponent_profile_interval, d_r2, d_resid_std, d_exponent_replicates,
        d_intercept_replicates, for ln D* = d_intercept + d_exponent ln C.
    Raises ValueError (one line) on bad input or when fewer than 2 budgets are kept.
    """
    flops = _as_pos("flops", flops)
    n = _as_pos("n", n, flops.size)
    loss = _as_pos("loss", loss, flops.size)
    tokens = None if tokens is None else _as_pos("tokens", tokens, flops.size)
    if not (rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be > 0, got {rtol}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot}")
    if nominal is not None:
        nominal = np.unique(_as_pos("nominal", nominal))

    label, values = _group_runs(flops, rtol, nominal)
    kept, dropped = [], []
    for g, c in enumerate(values):
        m = label == g
        sub_tokens = tokens[m] if tokens is not None else None
        b, d = _budget_optimum(float(c), flops[m], n[m], loss[m], sub_tokens)
        (kept if b is not None else dropped).append(b if b is not None else d)
    if len(kept) < 2:
        why = "; ".join(f"{d['flops']:.3g}: {d['reason']}" for d in dropped) or "none dropped"
        raise ValueError(f"IsoFLOP fit needs >= 2 kept budgets, got {len(kept)} "
                         f"({len(values)} budgets; dropped {why})")

    logc = np.log([b["flops"] for b in kept])
    logys = [np.log([b["n_opt"] for b in kept])]
    if tokens is not None:
        logys.append(np.log([b["d_opt"] for b in kept]))
    fits = [_ols(logc, y) for y in logys]
    boots, failed = _bootstrap_budgets(logc, logys, int(n_boot), seed, level)
    note = ""
    if len(kept) < MIN_BUDGETS_FOR_INTERVAL:
        note = (f"no interval: {len(kept)} kept budgets; a whole-budget bootstrap needs >= "
                f"{MIN_BUDGETS_FOR_INTERVAL} for its replicates to differ from the point fit")
        for b in boots:
            b["interval"] = None
    elif int(n_boot) == 0:
        note = "no interval: n_boot = 0"
    elif boots[0]["interval"] is None:
        note = "no interval: every bootstrap replicate failed"

    out = {"interval_note": note,
           "exponent": fits[0]["exponent"], "intercept": fits[0]["intercept"],
           "exponent_interval": boots[0]["interval"],
           "exponent_profile_interval": _profile_interval(fits[0], level),
           "r2": fits[0]["r2"],
           "resid_std": fits[0]["resid_std"], "n_budgets": len(kept), "budgets": kept,
           "dropped": dropped, "unassigned_runs": int(np.sum(label < 0)),
           "n_boot": int(n_boot), "failed_replicates": int(failed),
           "seed": None if seed is None else int(seed),
           "level": float(level), "rtol": float(rtol),
           "exponent_replicates": boots[0]["exponents"],
           "intercept_replicates": boots[0]["intercepts"]}
    if tokens is not None:
        out.update({"d_exponent": fits[1]["exponent"], "d_intercept": fits[1]["intercept"],
                    "d_exponent_interval": boots[1]["interval"],
                    "d_exponent_profile_interval": _profile_interval(fits[1], level),
                    "d_r2": fits[1]["r2"],
                    "d_resid_std": fits[1]["resid_std"],
                    "d_exponent_replicates": boots[1]["exponents"],
                    "d_intercept_replicates": boots[1]["intercepts"]})
    return out


def isoflop_predict_n(params: dict, C):
    """N* = exp(intercept) * C^exponent from a fit_isoflop result (scalar in, float out)."""
    C = np.asarray(C, float)
    n = np.exp(params["intercept"] + params["exponent"] * np.log(C))
    return float(n) if n.ndim == 0 else n

