"""Scaling-law fits: Chinchilla approach 3, Kaplan, L(C), per-sparsity power laws, MoE joint laws.

    python -c "from moe.scaling import fit_chinchilla, load_chinchilla_points as p; print(fit_chinchilla(*p()))"

Every nonlinear law here is a log-sum-exp of power-law terms, fitted the Chinchilla way:

    log L_hat = LSE(c_1 - alpha_1 log X_1, ..., c_K - alpha_K log X_K, e)
    objective = SUM_i Huber_delta(log L_hat_i - log L_i),   delta = 1e-3

with scipy's L-BFGS-B and an analytic numpy gradient, started from a grid. The grid is
scored in one vectorised pass and L-BFGS runs only from the best `n_starts` grid points
(`n_starts=None` runs from every point, as Hoffmann et al. and Besiroglu et al. did).
Measured on the 240 Chinchilla points (this file's fitter, 2 shared CPU cores): the full
4500-point grid takes ~15 s (34 s before BLAS was pinned to one thread, see _blas.py), and
every one of the 10 best-scoring grid points already reaches the full-grid optimum
(objective 1.01827e-3) to 1e-11, so the default of 32 starts costs ~0.3 s and is cheap
enough to re-run in every bootstrap replicate.

Tolerances. The summed objective is minimised with tight L-BFGS-B options (TIGHT_LBFGS:
ftol 1e-15, gtol 1e-11), and every fit records evidence that its point is the optimum
(`refit_gain`/`refit_ok`: a refit started from it; `starts_agree`/`starts_spread`:
multi-start agreement). scipy's defaults (ftol relative to max(|f|, 1), gtol absolute) are
effectively absolute for f << 1: on the CPU ladder's dense L(N) they stopped at E = 0.046,
alpha 0.225 (objective 8.2602e-5) on a valley whose floor is E ~ 1e-10, alpha 0.221
(8.2495e-5), and that early stop was reported as a converged E. Measured cost: ~2x the
iterations per fit (171 against 91 on that ladder's bootstrap resamples). The Chinchilla
replication's digits are unchanged (tests/test_scaling_identify.py).

`reduction="mean"` keeps scipy's defaults: with them, AVERAGING the Huber loss instead of
summing it stops the optimiser early, far from the optimum (summed objective 1.108e-3 from
the full grid, 1.29e-3 from the default 32 starts, instead of 1.018e-3; the 32-start mean
fit lands near Hoffmann et al.'s published E 1.66, beta 0.25, B 204), which is the
documented error in the original Chinchilla fit (Besiroglu et al. 2024): an objective 240x
smaller trips the effectively absolute stopping tests 240x sooner. It exists to reproduce
that error, not for results.

Profile likelihood (`lse_profile`, `law_profiles`): intervals for exponents and the
irreducible loss from the least-squares profile with an F(1, m - p) threshold, and the
exponents conditional on stated irreducible losses, for ladders that cannot determine E.

The MoE joint law of Clark et al. is linear in its coefficients and is fitted by ordinary
least squares in log loss (as in the paper); its saturation constants are fixed by default.
"""
from __future__ import annotations

import csv
import itertools
import math
from importlib import resources
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

from moe.scaling._blas import single_threaded_blas

__all__ = [
    "CHINCHILLA_PUBLISHED",
    "KAPLAN",
    "chinchilla_grid",
    "chinchilla_objective",
    "fit_chinchilla",
    "chinchilla_predict",
    "chinchilla_frontier",
    "load_chinchilla_points",
    "kaplan_loss_N",
    "kaplan_loss_D",
    "fit_power_law",
    "power_law_predict",
    "power_law_inverse",
    "fit_compute_law",
    "compute_law_predict",
    "clark_expert_transform",
    "fit_clark",
    "clark_predict",
    "fit_additive_moe",
    "additive_moe_predict",
    "compare_joint_laws",
    "size_groups",
    "efficiency_leverage",
    "huber",
]

#: Hoffmann et al. 2022, approach 3, as published (they fit the digitised points poorly).
CHINCHILLA_PUBLISHED = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}

#: Kaplan et al. 2020, L(N) = (N_c/N)^a_N and L(D) = (D_c/D)^a_D, N non-embedding params.
KAPLAN = {"a_N": 0.076, "N_c": 8.8e13, "a_D": 0.095, "D_c": 5.4e13}

HUBER_DELTA = 1e-3


# ----------------------------------------------------------------------------- core


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Elementwise Huber loss: r^2/2 inside |r| <= delta, delta (|r| - delta/2) outside."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _lse_terms(theta: np.ndarray, logX: Sequence[np.ndarray]) -> np.ndarray:
    """Stack the K+1 log-terms (c_k - alpha_k log X_k ..., e); theta may be (P,) or (G, P)."""
    K = len(logX)
    theta = np.asarray(theta, float)
    if theta.ndim == 1:
        c, e, al = theta[:K], theta[K], theta[K + 1:]
        terms = [c[k] - al[k] * logX[k] for k in range(K)]
        terms.append(np.full_like(logX[0], e))
    else:  # (G, P) -> terms (K+1, G, m), the whole grid in one pass
        c, e, al = theta[:, :K], theta[:, K:K + 1], theta[:, K + 1:]
        terms = [c[:, k:k + 1] - al[:, k:k + 1] * logX[k][None, :] for k in range(K)]
        terms.append(np.broadcast_to(e, terms[0].shape))
    return np.stack(terms)


def _lse0(T: np.ndarray) -> np.ndarray:
    """log-sum-exp over axis 0, max-shifted (same maths as scipy.special.logsumexp).

    Written out because it is the hot loop: scipy's logsumexp measured ~0.28 s on the
    (3, 4500, 240) Chinchilla grid stack against ~0.02 s for this, and its per-call overhead
    was ~55% of a whole 3-parameter power-law fit (profiled), which the bootstrap repeats.
    """
    m = T.max(axis=0)
    return m + np.log(np.exp(T - m).sum(axis=0))


def _lse_objective(theta, logX, logL, delta, reduction):
    """Summed (or averaged) Huber loss of log residuals, and its analytic gradient."""
    K = len(logX)
    T = _lse_terms(theta, logX)
    lse = _lse0(T)
    w = np.exp(T - lse)  # softmax weights = d lse / d term
    r = lse - logL
    f = float(huber(r, delta).sum())
    g = np.clip(r, -delta, delta)  # d Huber / d r
    grad = np.empty(2 * K + 1)
    for k in range(K):
        gw = g * w[k]
        grad[k] = gw.sum()
        grad[K + 1 + k] = -(gw @ logX[k])
    grad[K] = g @ w[K]
    if reduction == "mean":
        f /= r.size
        grad /= r.size
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return f, grad


#: elements of one (terms x grid rows x data rows) block scored at once: 2^22 float64 =
#: 32 MiB, so a grid pass peaks near 0.2 GB whatever the table size (the numpy temporaries
#: of _lse0 and huber are a few blocks). A fixed 2048 grid rows was 4.9 GB per block at
#: 100,000 rows and the fit peaked at 9.4 GB.
GRID_BLOCK_ELEMENTS = 1 << 22


def grid_chunk(n_rows: int, n_terms: int, cap: int = 2048) -> int:
    """Grid rows per block so that a block holds <= GRID_BLOCK_ELEMENTS values (>= 1,
    <= ``cap``: small tables keep the old 2048-row blocks). Scores do not depend on it:
    each grid row is reduced on its own."""
    return max(1, min(cap, GRID_BLOCK_ELEMENTS // max(1, n_rows * n_terms)))


def grid_huber_scores(grid, terms, n_terms: int, logL, delta, chunk=None) -> np.ndarray:
    """Summed Huber loss of (LSE of ``terms(grid rows)`` - log L) at every grid row, in
    blocks of ``chunk`` rows (default :func:`grid_chunk`: bounded memory). ``terms`` maps
    (rows, params) to the (n_terms, rows, data) stack of log-terms."""
    out = np.empty(len(grid))
    chunk = chunk or grid_chunk(len(logL), n_terms)
    for s in range(0, len(grid), chunk):
        r = _lse0(terms(grid[s:s + chunk])) - logL[None, :]
        out[s:s + chunk] = huber(r, delta).sum(axis=1)
    return out


def _lse_grid_objective(grid, logX, logL, delta, chunk=None):
    """Summed Huber objective of the LSE law at every grid row."""
    return grid_huber_scores(grid, lambda g: _lse_terms(g, logX), len(logX) + 1, logL, delta,
                             chunk)


def _fit_lse_law(logX, logL, grid, *, delta, reduction, n_starts, bounds=None):
    """Multi-start L-BFGS-B on the LSE law; returns (best theta, best result, diagnostics).

    The grid is scored with the summed objective (ranking is the same for mean). Starts are
    the `n_starts` best-scoring grid points (all of them when n_starts is None).
    """
    with single_threaded_blas():  # see moe/scaling/_blas.py: ~6x faster on shared cores
        return _fit_lse_law_inner(logX, logL, grid, delta=delta, reduction=reduction,
                                  n_starts=n_starts, bounds=bounds)


#: L-BFGS-B options for the summed objective: tight enough that the reported point is the
#: optimum. scipy's defaults (ftol 2.2e-9 relative to max(|f|, 1), gtol 1e-5) are
#: effectively absolute for objectives << 1 and stopped the CPU ladder's dense L(N) at
#: E = 0.046 (objective 8.2602e-5) on a valley whose floor is E = 1.2e-11 (8.2495e-5).
TIGHT_LBFGS = {"ftol": 1e-15, "gtol": 1e-11, "maxiter": 15000, "maxfun": 30000}

#: A refit from the reported point (tight options again) may lower the summed objective by
#: at most this, relative to max(objective, 1e-12): `refit_gain` records what it did.
REFIT_RTOL = 1e-7

#: Starts "agree" when their final objectives are within this relative distance of the best.
AGREE_RTOL = 1e-6


def _fit_lse_law_inner(logX, logL, grid, *, delta, reduction, n_starts, bounds):
    grid = np.asarray(grid, float)
    logL = np.asarray(logL, float)
    if n_starts is None or n_starts >= len(grid):
        starts = grid
    else:
        score = _lse_grid_objective(grid, logX, logL, delta)
        score = np.where(np.isfinite(score), score, np.inf)
        starts = grid[np.argsort(score, kind="stable")[: max(1, int(n_starts))]]
    # reduction "mean" keeps scipy's default tolerances: it exists to reproduce the
    # documented early stop of the original Chinchilla fit (module docstring).
    options = TIGHT_LBFGS if reduction == "sum" else None
    best, finals = None, []
    for x0 in starts:
        res = minimize(_lse_objective, x0, args=(logX, logL, delta, reduction), jac=True,
                       method="L-BFGS-B", bounds=bounds, options=options)
        if not np.all(np.isfinite(res.x)) or not np.isfinite(res.fun):
            continue
        finals.append((float(res.fun), res.x.copy()))
        # Pick the best start by the objective that was minimised (sum or mean), as the
        # original procedure did; for "mean" that is just the sum scaled by 1/m.
        if best is None or res.fun < best.fun:
            best = res
    if best is None:
        raise RuntimeError("every L-BFGS start diverged")
    theta = best.x.copy()
    f_sum = _lse_objective(theta, logX, logL, delta, "sum")[0]
    diag = {"objective": float(best.fun), "objective_sum": float(f_sum),
            "converged": bool(best.success), "nit": int(best.nit),
            "n_starts": int(len(starts)), "n_grid": int(len(grid)),
            "stop": str(best.message)}
    if reduction == "sum":
        diag.update(_optimum_checks(theta, float(best.fun), finals, logX, logL, delta, bounds))
        # At ftol 1e-15 L-BFGS-B often ends with "ABNORMAL_TERMINATION_IN_LNSRCH": the line
        # search found no lower point in float64. That is convergence when a refit from the
        # point confirms it (refit_ok), not a failure.
        diag["converged"] = bool(best.success or ("ABNORMAL" in diag["stop"]
                                                  and diag["refit_ok"]))
    return theta, best, diag


def _optimum_checks(theta, f, finals, logX, logL, delta, bounds) -> dict:
    """Evidence that the reported point is the optimum: a refit started from it
    (`refit_gain`, how much it lowered the objective; `refit_ok`: at most REFIT_RTOL
    relative), and multi-start agreement (`starts_agree`: how many starts ended within
    AGREE_RTOL of the best objective, of `starts_finished`; `starts_spread`: the largest
    range of any parameter over those agreeing starts, in the fit's internal units; a flat
    valley shows as agreeing objectives with spread parameters)."""
    res = minimize(_lse_objective, theta, args=(logX, logL, delta, "sum"), jac=True,
                   method="L-BFGS-B", bounds=bounds, options=TIGHT_LBFGS)
    gain = max(0.0, f - float(res.fun)) if np.isfinite(res.fun) else 0.0
    tol = AGREE_RTOL * max(abs(f), 1e-12)
    agree = np.array([x for v, x in finals if v - f <= tol])
    spread = float(np.max(np.ptp(agree, axis=0))) if len(agree) > 1 else 0.0
    return {"refit_gain": gain, "refit_ok": bool(gain <= REFIT_RTOL * max(abs(f), 1e-12)),
            "starts_agree": int(len(agree)), "starts_finished": int(len(finals)),
            "starts_spread": spread}


# ------------------------------------------------------------ profile likelihood

#: Huber delta that makes `_lse_objective` plain least squares (sum of r^2 / 2): residuals
#: are << 1e30, so the quadratic branch always applies.
_LS_DELTA = 1e30


def _fixed_fit(logX, logL, theta, index, value, bounds, starts):
    """Least squares of the LSE law with parameter `index` held at `value` (internal
    units): the best of L-BFGS-B runs from each start; returns (rss, theta)."""
    free = [j for j in range(len(theta)) if j != index]
    fb = None if bounds is None else [bounds[j] for j in free]

    def obj(z):
        t = np.empty(len(theta))
        t[free], t[index] = z, value
        f, g = _lse_objective(t, logX, logL, _LS_DELTA, "sum")
        return f, g[free]

    best = None
    for x0 in starts:
        z0 = np.asarray(x0, float)[free]
        if fb is not None:
            z0 = np.clip(z0, [b[0] for b in fb], [b[1] for b in fb])
        res = minimize(obj, z0, jac=True, method="L-BFGS-B", bounds=fb, options=TIGHT_LBFGS)
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    t = np.empty(len(theta))
    t[free], t[index] = best.x, value
    return 2.0 * float(best.fun), t


def lse_profile(logX, logL, theta, *, index: int, limits: tuple[float, float],
                log_param: bool = False, bounds=None, level: float = 0.95,
                stated: Sequence[float] = (), intervals: bool = True) -> dict | None:
    """Profile-likelihood interval of one parameter of an LSE law (`_lse_terms` layout).

    Errors in log loss are taken as Gaussian with unknown variance, so the profile is a
    least-squares one: RSS(v) = min over the other parameters with parameter `index` held
    at v, and the interval is {v : F(v) <= F_(1, m-p)(level)} with F(v) = (RSS(v) -
    RSS_min) / (RSS_min / (m - p)), the small-sample profile-t form of Bates & Watts
    (1988, "Nonlinear regression analysis", ch. 6) for m runs and p parameters. (The point
    fits minimise Huber; its least-squares optimum is returned as `value` beside the
    interval, and the two agree closely when no run is an outlier.)

    v is in reported units: with `log_param` the internal parameter is log v (an
    irreducible loss E = exp(e)), so v = 0 can be profiled (internal -700). The walk steps
    outward from the least-squares optimum on each side (doubling steps, each fit started
    from its neighbour's solution: continuation) until F exceeds the threshold, then
    bisects to 1e-4 of the bracket; an end that reaches `limits` with F still below the
    threshold is reported `lo_open`/`hi_open` (the data do not bound it there).

    `stated`: values of the parameter at which to also return the conditional fit (the
    other parameters' values and F), e.g. exponents at a stated irreducible loss, or a
    function (lo, hi, value) -> such values, called once the interval is known;
    `intervals=False` computes only those (lo/hi are then None).
    Returns {value, lo, hi, lo_open, hi_open, rss_min, dof, f_crit, level, conditional:
    [{value, F, theta}]}, or None when m <= p (no residual degree of freedom).
    """
    from scipy.stats import f as f_dist

    logL = np.asarray(logL, float)
    m, p = logL.size, len(theta)
    dof = m - p
    if dof < 1:
        return None
    res = minimize(_lse_objective, np.asarray(theta, float),
                   args=(logX, logL, _LS_DELTA, "sum"), jac=True, method="L-BFGS-B",
                   bounds=bounds, options=TIGHT_LBFGS)
    theta_ls, rss_min = res.x.copy(), 2.0 * float(res.fun)
    s2 = max(rss_min, 1e-300) / dof
    crit = float(f_dist.ppf(level, 1, dof))
    to_int = (lambda v: math.log(v) if v > 0 else -700.0) if log_param else (lambda v: v)
    v_hat = math.exp(theta_ls[index]) if log_param else float(theta_ls[index])
    lo_lim, hi_lim = limits
    v_hat = min(max(v_hat, lo_lim), hi_lim)

    # The irreducible term's gradient vanishes once it has collapsed (e = -25: exp(e) ~
    # 1e-11), so a fit started there never leaves E = 0: every fixed fit is also started
    # with E at several fractions of the smallest loss.
    K = len(logX)
    e_starts = []
    if index != K:
        for frac in (0.3, 0.6, 0.9):
            t = theta_ls.copy()
            t[K] = math.log(frac * math.exp(float(logL.min())))
            e_starts.append(t)

    path = [(v_hat, theta_ls)]  # every profiled point: starts for the stated values

    def stat(v, start):
        rss, t = _fixed_fit(logX, logL, theta_ls, index, to_int(v), bounds,
                            [start, theta_ls, *e_starts])
        path.append((v, t))
        return (rss - rss_min) / s2, t

    def walk(sign):
        width = hi_lim - lo_lim
        step = max(0.02 * abs(v_hat), 1e-3 * width, 1e-12)
        inside, t_in = v_hat, theta_ls
        while True:
            v = min(max(inside + sign * step, lo_lim), hi_lim)
            F, t = stat(v, t_in)
            if F > crit:
                break
            inside, t_in = v, t
            if v in (lo_lim, hi_lim):
                return v, True
            step *= 2.0
        outside = v
        for _ in range(40):
            if abs(outside - inside) <= 1e-4 * max(abs(outside), abs(inside), 1e-12):
                break
            mid = 0.5 * (inside + outside)
            F, t = stat(mid, t_in)
            if F > crit:
                outside = mid
            else:
                inside, t_in = mid, t
        return inside, False

    lo = hi = lo_open = hi_open = None
    if intervals:
        lo, lo_open = walk(-1.0) if v_hat > lo_lim else (lo_lim, True)
        hi, hi_open = walk(+1.0) if v_hat < hi_lim else (hi_lim, True)
    if callable(stated):
        stated = stated(lo, hi, v_hat)
    cond = []
    for v in stated:
        # started from the nearest profiled point as well: near the edge of the interval
        # the fit can need exponents far from the optimum's (continuation found them)
        near = min(path, key=lambda pt: abs(pt[0] - v))[1]
        F, t = stat(float(v), near)
        cond.append({"value": float(v), "F": float(F), "theta": t})
    return {"value": v_hat, "lo": lo, "hi": hi, "lo_open": lo_open,
            "hi_open": hi_open, "rss_min": rss_min, "dof": int(dof), "f_crit": crit,
            "level": float(level), "theta_ls": theta_ls, "conditional": cond}


PROFILE_METHOD = ("profile likelihood, Gaussian errors in log loss (least squares), "
                  "F(1, m - p) threshold (Bates & Watts 1988)")


def law_profiles(p: dict, *, exponents: dict, irreducible: str, level: float = 0.95,
                 max_exponent: float = 5.0, stated_fracs=(0.25, 0.5, 0.75)) -> dict | None:
    """Profile-likelihood intervals (`lse_profile`) of an LSE law's exponents and its
    irreducible loss, from a fit dict that carries `_problem` (fit_power_law,
    fit_chinchilla, fit_additive_moe), plus the exponents conditional on stated values of
    the irreducible loss: 0, each end of its interval and `stated_fracs` of the smallest
    loss that lie inside the interval (what a reader needs when E is not identified).

    exponents: {name: (theta index, sign)}: reported value = sign x internal (a compute
    law's b is -alpha). Exponents are profiled over [0, max_exponent] (internal units) and
    held in that box while other parameters are profiled (the fitters' box; approach 3,
    fitted without one, gets it here, as its at-bound rule in analysis.py treats an
    exponent above it as degenerate), the irreducible loss over [0, smallest loss). Returns {method, level, dof, rss_min,
    <name>: {value, lo, hi, lo_open, hi_open} for each exponent and the irreducible loss,
    conditional: {on, rows: [{<irreducible>, F, <exponent>...}]}}, or None when the law has
    no residual degree of freedom.
    """
    prob = p["_problem"]
    logX, logL, theta, bounds = prob["logX"], prob["logL"], prob["theta"], prob["bounds"]
    K = len(logX)
    lmin = float(np.exp(np.min(logL)))
    out = {"method": PROFILE_METHOD, "level": float(level)}

    def interval(pr, sign=1.0):
        lo, hi = sorted((sign * pr["lo"], sign * pr["hi"]))
        lo_open, hi_open = ((pr["lo_open"], pr["hi_open"]) if sign > 0 else
                            (pr["hi_open"], pr["lo_open"]))
        return {"value": sign * pr["value"], "lo": lo, "hi": hi, "lo_open": lo_open,
                "hi_open": hi_open}

    if bounds is None:  # approach 3 fits unbounded; its profile keeps exponents in the box
        bounds = [(-np.inf, np.inf)] * (K + 1) + [(0.0, max_exponent)] * K

    def stated(lo, hi, value):
        vals = sorted({0.0, lo, hi, value}
                      | {f * lmin for f in stated_fracs if lo <= f * lmin <= hi})
        # one row per distinct value: a collapsed E (1e-10) is the row at 0
        return [v for i, v in enumerate(vals) if i == 0 or v - vals[i - 1] > 1e-6 * lmin]

    pe = lse_profile(logX, logL, theta, index=K, limits=(0.0, lmin * (1 - 1e-9)),
                     log_param=True, bounds=bounds, level=level, stated=stated)
    if pe is None:
        return None
    out.update({"dof": pe["dof"], "rss_min": pe["rss_min"], irreducible: interval(pe)})
    for name, (idx, sign) in exponents.items():
        # started at the least-squares optimum the first profile found: its refit is
        # then a check of a few iterations, not the whole least-squares fit again
        pr = lse_profile(logX, logL, pe["theta_ls"], index=idx, limits=(0.0, max_exponent),
                         bounds=bounds, level=level)
        out[name] = interval(pr, sign)
    out["conditional"] = {"on": irreducible, "rows": [
        {irreducible: c["value"], "F": c["F"],
         **{name: sign * float(c["theta"][idx]) for name, (idx, sign) in exponents.items()}}
        for c in pe["conditional"]]}
    return out


def _as_pos_array(name, x):
    x = np.asarray(x, float).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"{name} must be finite and > 0 (got {x.size} values)")
    return x


# ------------------------------------------------------------------------ Chinchilla


def chinchilla_grid() -> np.ndarray:
    """The Chinchilla initialisation grid as rows (a, b, e, alpha, beta): 6*6*5*5*5 = 4500.

    alpha, beta in {0, 0.5, ..., 2}; e in {-1, -0.5, ..., 1}; a, b in {0, 5, ..., 25}.
    """
    ab = np.arange(0.0, 26.0, 5.0)
    e = np.arange(-1.0, 1.01, 0.5)
    ex = np.arange(0.0, 2.01, 0.5)
    return np.array(list(itertools.product(ab, ab, e, ex, ex)), float)


def chinchilla_objective(theta, N, D, loss, *, delta=HUBER_DELTA, reduction="sum"):
    """Approach-3 objective and gradient at theta = (a, b, e, alpha, beta) (raw logs)."""
    return _lse_objective(np.asarray(theta, float), [np.log(N), np.log(D)], np.log(loss),
                          delta, reduction)


def fit_chinchilla(N, D, loss, *, delta: float = HUBER_DELTA, reduction: str = "sum",
                   grid=None, n_starts: int | None = 32) -> dict:
    """Chinchilla approach 3: fit L(N, D) = E + A/N^alpha + B/D^beta.

    Minimises SUM_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) with
    L-BFGS-B (analytic gradient, TIGHT_LBFGS; scipy defaults for "mean") from the Chinchilla grid
    (`chinchilla_grid()`, or `grid` as an (G, 5) array of (a, b, e, alpha, beta)) and keeps
    the best start. `n_starts=None` starts from every grid point (exact original procedure,
    ~34 s on the 240 points); an int starts from that many best-scoring grid points after one
    vectorised scoring pass (see the module docstring for why 32 is enough).

    `reduction="mean"` averages instead of summing; it exists only to demonstrate the
    documented error (L-BFGS stops early) and should not be used for results.

    Returns a dict: E, A, B, alpha, beta; a = beta/(alpha+beta) (N_opt ~ C^a) and
    b = alpha/(alpha+beta) (D_opt ~ C^b); objective (as minimised), objective_sum,
    converged, nit, n_starts, n_grid, and the raw a_log, b_log, e_log (A = exp(a_log), ...).
    """
    N = _as_pos_array("N", N)
    D = _as_pos_array("D", D)
    loss = _as_pos_array("loss", loss)
    if not (N.size == D.size == loss.size):
        raise ValueError(f"N, D, loss lengths differ: {N.size}, {D.size}, {loss.size}")
    if np.unique(np.column_stack([N, D]), axis=0).shape[0] < 5:
        raise ValueError("approach 3 has 5 parameters; got fewer than 5 distinct (N, D) runs")
    grid = chinchilla_grid() if grid is None else np.asarray(grid, float).reshape(-1, 5)
    theta, _, diag = _fit_lse_law([np.log(N), np.log(D)], np.log(loss), grid, delta=delta,
                                  reduction=reduction, n_starts=n_starts)
    a_log, b_log, e_log, alpha, beta = (float(v) for v in theta)
    out = {"E": math.exp(e_log), "A": math.exp(a_log), "B": math.exp(b_log),
           "alpha": alpha, "beta": beta,
           "_problem": {"logX": [np.log(N), np.log(D)], "logL": np.log(loss), "theta": theta,
                        "bounds": None}}
    s = alpha + beta
    out["a"] = beta / s if s != 0 else float("nan")
    out["b"] = alpha / s if s != 0 else float("nan")
    out.update(diag)
    out.update({"a_log": a_log, "b_log": b_log, "e_log": e_log, "delta": delta,
                "reduction": reduction})
    return out


def chinchilla_predict(params: dict, N, D) -> np.ndarray:
    """L(N, D) = E + A/N^alpha + B/D^beta for a dict with E, A, B, alpha, beta."""
    N = np.asarray(N, float)
    D = np.asarray(D, float)
    return params["E"] + params["A"] / N ** params["alpha"] + params["B"] / D ** params["beta"]


def chinchilla_frontier(params: dict, C) -> tuple:
    """Compute-optimal (N_opt, D_opt, L_opt) at compute C under C = 6 N D.

    N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)); L_opt = L(N_opt, D_opt).
    Check: published E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28 at C = 1e21 give
    N* = 1.824e9, D* = 9.136e10, L* = 2.3289. Scalars in, floats out; arrays in, arrays out.
    """
    A, B, al, be = params["A"], params["B"], params["alpha"], params["beta"]
    C = np.asarray(C, float)
    G = (al * A / (be * B)) ** (1.0 / (al + be))
    n_opt = G * (C / 6.0) ** (be / (al + be))
    d_opt = (C / 6.0) ** (al / (al + be)) / G
    l_opt = chinchilla_predict(params, n_opt, d_opt)
    if C.ndim == 0:
        return float(n_opt), float(d_opt), float(l_opt)
    return n_opt, d_opt, l_opt


def load_chinchilla_points(drop_highest: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 245 digitised Chinchilla Figure-4 points (Epoch AI), as arrays (N, D, loss).

    D = C / (6 N). The `drop_highest` highest-loss points are dropped (the replication drops
    5, leaving 240). Order: the file's order with those rows removed.
    """
    path = resources.files("moe.scaling").joinpath("data/chinchilla_svg_extracted_data.csv")
    with path.open("r", newline="") as fh:
        rows = list(csv.DictReader(fh))
    N = np.array([float(r["Model Size"]) for r in rows])
    C = np.array([float(r["Training FLOP"]) for r in rows])
    L = np.array([float(r["loss"]) for r in rows])
    keep = np.ones(len(L), bool)
    if drop_highest > 0:
        keep[np.argsort(L, kind="stable")[-drop_highest:]] = False
    N, C, L = N[keep], C[keep], L[keep]
    return N, C / (6.0 * N), L


# ---------------------------------------------------------------------------- Kaplan


def kaplan_loss_N(N) -> np.ndarray | float:
    """Kaplan et al. L(N) = (N_c / N)^a_N, a_N 0.076, N_c 8.8e13, N non-embedding params.

    Checks: L(1e8) = 2.8300, L(1e9) = 2.3756.
    """
    out = (KAPLAN["N_c"] / np.asarray(N, float)) ** KAPLAN["a_N"]
    return float(out) if np.ndim(out) == 0 else out


def kaplan_loss_D(D) -> np.ndarray | float:
    """Kaplan et al. L(D) = (D_c / D)^a_D, a_D 0.095, D_c 5.4e13 tokens."""
    out = (KAPLAN["D_c"] / np.asarray(D, float)) ** KAPLAN["a_D"]
    return float(out) if np.ndim(out) == 0 else out


# ------------------------------------------------------------------ 1-D power laws


def _power_grid(x_log, logL, alphas=(0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5),
                e_fracs=(0.02, 0.3, 0.6, 0.85, 0.97)):
    """Data-driven starts (a, e, alpha) for log L = LSE(a - alpha log x, e).

    For each (alpha, E = frac * min L) the amplitude is set so the curve passes through the
    median of (L - E) x^alpha: a grid in a would waste starts far from the data.
    """
    L = np.exp(logL)
    rows = []
    for al, fr in itertools.product(alphas, e_fracs):
        E = fr * L.min()
        amp = np.median(np.log(np.maximum(L - E, 1e-12 * L)) + al * x_log)
        rows.append((amp, math.log(E), al))
    return np.array(rows)


def fit_power_law(x, loss, *, delta: float = HUBER_DELTA, n_starts: int | None = 6,
                  x_ref: float | None = None, max_alpha: float = 5.0) -> dict:
    """Fit L = E + A / x^alpha (E >= 0, A > 0): per-sparsity law over active params, etc.

    Same robust objective as approach 3 (summed Huber, delta 1e-3, on log loss, L-BFGS-B
    with analytic gradient) from a 40-point data-driven grid scored in one pass, keeping the
    best of `n_starts` starts. x is rescaled by x_ref (default: geometric mean of x) inside
    the fit so the amplitude is O(1) whatever the units; A is returned in raw units of x.
    alpha is bounded to [0, max_alpha] because with few points a free exponent can run off
    to a near-step function that no ladder supports.

    Returns dict: E, A, alpha, objective, objective_sum, converged, nit, n, x_ref,
    a_log (log of A in x_ref units), e_log.
    """
    x = _as_pos_array("x", x)
    loss = _as_pos_array("loss", loss)
    if x.size != loss.size:
        raise ValueError(f"x and loss lengths differ: {x.size} vs {loss.size}")
    if x.size < 3:
        raise ValueError(f"a power law E + A/x^alpha has 3 parameters; got {x.size} points")
    if np.unique(x).size < 3:
        # With 2 distinct sizes, 3 parameters have a whole curve of exact solutions; a
        # bootstrap replicate that drew so few distinct runs must count as failed, not
        # contribute an arbitrary point of that curve.
        raise ValueError(f"a power law needs at least 3 distinct x values; got {np.unique(x).size}")
    x_ref = float(np.exp(np.mean(np.log(x)))) if x_ref is None else float(x_ref)
    lx = np.log(x / x_ref)
    lL = np.log(loss)
    grid = _power_grid(lx, lL)
    bounds = [(-50.0, 50.0), (float(lL.min()) - 30.0, float(lL.max()) + 1.0), (0.0, max_alpha)]
    theta, _, diag = _fit_lse_law([lx], lL, grid, delta=delta, reduction="sum",
                                  n_starts=n_starts, bounds=bounds)
    a_log, e_log, alpha = (float(v) for v in theta)
    out = {"E": math.exp(e_log), "A": math.exp(a_log) * x_ref ** alpha, "alpha": alpha,
           "x_ref": x_ref, "a_log": a_log, "e_log": e_log, "n": int(x.size),
           "_problem": {"logX": [lx], "logL": lL, "theta": theta, "bounds": bounds}}
    out.update(diag)
    return out


def power_law_predict(params: dict, x) -> np.ndarray:
    """E + A / x^alpha. Uses the x_ref-scaled amplitude when present (no overflow)."""
    x = np.asarray(x, float)
    if "x_ref" in params and "a_log" in params:
        return params["E"] + np.exp(params["a_log"] - params["alpha"] * np.log(x / params["x_ref"]))
    return params["E"] + params["A"] / x ** params["alpha"]


def power_law_inverse(params: dict, loss) -> np.ndarray:
    """x such that E + A/x^alpha = loss; NaN where loss <= E (unreachable) or alpha == 0."""
    loss = np.asarray(loss, float)
    gap = loss - params["E"]
    with np.errstate(divide="ignore", invalid="ignore"):
        if "x_ref" in params and "a_log" in params:
            lx = (params["a_log"] - np.log(gap)) / params["alpha"]
            out = params["x_ref"] * np.exp(lx)
        else:
            out = (params["A"] / gap) ** (1.0 / params["alpha"])
    return np.where((gap > 0) & (params["alpha"] > 0), out, np.nan)


def fit_compute_law(C, loss, **kw) -> dict:
    """GPT-4-report style L(C) = a C^b + c (b < 0, c irreducible); C in FLOPs.

    Fitted as the power law E + A/C^alpha (`fit_power_law`, keyword args passed through), so
    a = A, b = -alpha, c = E; those keys are kept too.
    """
    p = fit_power_law(C, loss, **kw)
    p.update({"a": p["A"], "b": -p["alpha"], "c": p["E"]})
    return p


def compute_law_predict(params: dict, C) -> np.ndarray:
    """a C^b + c for a dict from `fit_compute_law`."""
    return power_law_predict(params, C)


# -------------------------------------------------------------------- MoE joint laws


def clark_expert_transform(E, e_start: float = 2.0, e_max: float = 256.0) -> np.ndarray:
    """Saturating expert count E' of Clark et al. 2022 (as written in this project's brief):

        1/E' = 1 / (E - 1 + (1/(E_start - 1) - 1/E_max)^-1) + 1/E_max

    E' grows like E for E_start << E << E_max and saturates at E_max (more experts stop
    helping). At E = 1 (dense) it gives E' = E_start - 1 exactly, for any E_max.
    Default E_start = 2 makes E'(1) = 1, so log E' = 0 for dense runs and the joint law
    reduces to the dense power law log L = a log N + d: dense and MoE runs share one fit.
    (Clark et al. write (1/E_start - 1/E_max)^-1, giving E'(1) = E_start; that is the same
    family with E_start shifted by one. Their fitted constants are per routing method; the
    default E_max = 256 is a choice, not a measurement: it only bends the law above ~64
    experts. Pass e_max=np.inf for the plain bilinear law in log E.)
    Needs E >= 1, E_start > 1, E_max > E_start - 1.
    """
    E = np.asarray(E, float)
    if np.any(E < 1):
        raise ValueError("expert count must be >= 1 (use 1 for dense runs)")
    if not e_start > 1 or not e_max > e_start - 1:
        raise ValueError(f"need e_start > 1 and e_max > e_start - 1; got {e_start}, {e_max}")
    shift = 1.0 / (1.0 / (e_start - 1.0) - 1.0 / e_max)
    return 1.0 / (1.0 / (E - 1.0 + shift) + 1.0 / e_max)


def _clark_design(N, E, e_start, e_max):
    lN = np.log(np.asarray(N, float))
    lE = np.log(clark_expert_transform(E, e_start, e_max))
    return np.column_stack([lN, lE, lN * lE, np.ones_like(lN)])


def fit_clark(N, E, loss, *, e_start: float = 2.0, e_max: float = 256.0,
              fit_saturation: bool = False) -> dict:
    """Clark et al. 2022: log L = a log N + b log E' + c log N log E' + d (natural logs).

    N is the active (dense-equivalent) parameter count, E the number of experts (1 for dense
    runs), E' = clark_expert_transform(E, e_start, e_max). Linear in (a, b, c, d), so it is
    fitted by least squares in log loss. With fit_saturation=True, E_start and E_max are
    fitted too (outer L-BFGS-B over log(E_start-1), log E_max; needs >= 3 distinct expert
    counts). Returns dict a, b, c, d, e_start, e_max, rmse_log (in-sample), n.
    """
    N = _as_pos_array("N", N)
    E = np.asarray(E, float).ravel()
    loss = _as_pos_array("loss", loss)
    if not (N.size == E.size == loss.size):
        raise ValueError("N, E, loss lengths differ")
    if N.size < 4:
        raise ValueError(f"the Clark law has 4 coefficients; got {N.size} points")
    if np.unique(E).size < 2:
        raise ValueError("the Clark law needs at least two expert counts (e.g. dense and MoE)")
    y = np.log(loss)

    def solve(es, em):
        X = _clark_design(N, E, es, em)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        r = X @ coef - y
        return coef, float(np.sqrt(np.mean(r * r)))

    if fit_saturation:
        if np.unique(E).size < 3:
            raise ValueError("fitting E_start/E_max needs at least 3 distinct expert counts")

        def rmse(z):
            es, em = 1.0 + math.exp(z[0]), math.exp(z[1])
            if em <= es - 1:
                return 1e3
            return solve(es, em)[1]

        z0 = np.array([math.log(e_start - 1.0), math.log(e_max)])
        res = minimize(rmse, z0, method="L-BFGS-B", bounds=[(-5.0, 5.0), (0.0, 12.0)])
        e_start, e_max = 1.0 + math.exp(res.x[0]), math.exp(res.x[1])
    coef, r = solve(e_start, e_max)
    if np.linalg.matrix_rank(_clark_design(N, E, e_start, e_max)) < 4:
        raise ValueError("the Clark law is not identifiable from these runs "
                         "(need several sizes at more than one expert count)")
    a, b, c, d = (float(v) for v in coef)
    return {"a": a, "b": b, "c": c, "d": d, "e_start": float(e_start), "e_max": float(e_max),
            "rmse_log": r, "n": int(N.size)}


def clark_predict(params: dict, N, E) -> np.ndarray:
    """Loss predicted by a Clark fit for active params N and expert count E."""
    X = _clark_design(np.atleast_1d(N), np.atleast_1d(E), params["e_start"], params["e_max"])
    return np.exp(X @ np.array([params["a"], params["b"], params["c"], params["d"]]))


def fit_additive_moe(N_active, N_total, loss, *, delta: float = HUBER_DELTA,
                     n_starts: int | None = 16) -> dict:
    """L = E0 + A / N_active^alpha + B / N_total^beta, fitted like Chinchilla approach 3.

    Dense runs have N_total = N_active; MoE runs separate the two terms, so the fit needs MoE
    runs whose total/active ratio varies (raises ValueError otherwise). Inputs are scaled by
    their geometric means inside the fit; A and B are returned in raw units.
    Returns dict E0, A, alpha, B, beta, objective, objective_sum, converged, n.
    """
    Na = _as_pos_array("N_active", N_active)
    Nt = _as_pos_array("N_total", N_total)
    loss = _as_pos_array("loss", loss)
    if not (Na.size == Nt.size == loss.size):
        raise ValueError("N_active, N_total, loss lengths differ")
    if np.unique(np.column_stack([Na, Nt]), axis=0).shape[0] < 6:
        raise ValueError("the additive law has 5 parameters; need >= 6 distinct (N_active, "
                         "N_total) runs")
    ratio = np.log(Nt / Na)
    if np.ptp(ratio) < 1e-6:
        raise ValueError("N_total/N_active is the same for every run: the additive law's two "
                         "terms cannot be told apart (need dense and MoE runs, or several "
                         "sparsities)")
    ra, rt = float(np.exp(np.log(Na).mean())), float(np.exp(np.log(Nt).mean()))
    la, lt, lL = np.log(Na / ra), np.log(Nt / rt), np.log(loss)
    Lmin = float(loss.min())
    amps = np.log(Lmin * np.array([0.03, 0.1, 0.3, 1.0]))
    es = np.log(Lmin * np.array([0.1, 0.5, 0.8, 0.95]))
    exps = np.array([0.1, 0.3, 0.6, 1.0])
    grid = np.array(list(itertools.product(amps, amps, es, exps, exps)), float)
    bounds = [(-50, 50), (-50, 50), (float(lL.min()) - 30.0, float(lL.max()) + 1.0),
              (0.0, 5.0), (0.0, 5.0)]
    theta, _, diag = _fit_lse_law([la, lt], lL, grid, delta=delta, reduction="sum",
                                  n_starts=n_starts, bounds=bounds)
    a_log, b_log, e_log, alpha, beta = (float(v) for v in theta)
    out = {"E0": math.exp(e_log), "A": math.exp(a_log) * ra ** alpha, "alpha": alpha,
           "B": math.exp(b_log) * rt ** beta, "beta": beta, "n": int(Na.size),
           "_scaled": (a_log, b_log, ra, rt),
           "_problem": {"logX": [la, lt], "logL": lL, "theta": theta, "bounds": bounds}}
    out.update(diag)
    return out


def additive_moe_predict(params: dict, N_active, N_total) -> np.ndarray:
    """E0 + A/N_active^alpha + B/N_total^beta (scaled internally: no overflow)."""
    Na = np.asarray(N_active, float)
    Nt = np.asarray(N_total, float)
    if "_scaled" in params:
        a_log, b_log, ra, rt = params["_scaled"]
        return (params["E0"] + np.exp(a_log - params["alpha"] * np.log(Na / ra))
                + np.exp(b_log - params["beta"] * np.log(Nt / rt)))
    return params["E0"] + params["A"] / Na ** params["alpha"] + params["B"] / Nt ** params["beta"]


def _col(rows, key):
    return np.array([float(r[key]) for r in rows], float)


def _experts(rows):
    """Expert count per row; dense rows count as 1 whatever their n_experts field says."""
    return np.array([1.0 if r.get("kind") == "dense" else max(1.0, float(r["n_experts"]))
                     for r in rows])


def _tokens(rows):
    """Training tokens per row; a missing "tokens" is a ValueError (reported, not raised)."""
    if any(r.get("tokens") is None for r in rows):
        raise ValueError("rows have no 'tokens': the joint MoE law needs each run's training "
                         "tokens")
    return _col(rows, "tokens")


#: Parameters of each joint law (a fold whose training runs hold no more distinct runs than
#: this interpolates them and is not scored).
JOINT_N_PARAMS = {"clark": 4, "additive": 5, "joint": 9}


def size_groups(rows: Sequence[dict], rtol: float = 0.05) -> list[tuple[str, list[int]]]:
    """Rows grouped by model size, smallest first: [(label, row indices)].

    The table's `size` label when every row has one (a ladder writes it; an IsoFLOP ladder
    trains one size at several budgets and they are one size), else runs whose
    params_active agree within `rtol` (MoE runs of one ladder size differ by a few % in
    active params: the router), greedy from the smallest, no chaining. Groups are ordered
    by their smallest params_active.
    """
    rows = list(rows)
    if not rows:
        return []
    na = np.array([float(r["params_active"]) for r in rows])
    if all(str(r.get("size") or "").strip() for r in rows):
        labels: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            labels.setdefault(str(r["size"]).strip(), []).append(i)
        out = list(labels.items())
    else:
        order = np.argsort(na, kind="stable")
        out, cur = [], [int(order[0])]
        for j in order[1:]:
            if math.log(na[j] / na[cur[0]]) <= math.log1p(rtol):
                cur.append(int(j))
            else:
                out.append(cur)
                cur = [int(j)]
        out.append(cur)
        out = [(f"{na[idx[0]]:.3g}", idx) for idx in out]
    return sorted(out, key=lambda kv: float(na[kv[1]].min()))


def _distinct_runs(rows, active_key, total_key) -> int:
    return len({(float(r[active_key]), float(r[total_key]), r.get("tokens"),
                 float(_experts([r])[0])) for r in rows})


def compare_joint_laws(train_rows: Sequence[dict], heldout_rows: Sequence[dict], *,
                       active_key: str = "params_active", total_key: str = "params_total",
                       e_start: float = 2.0, e_max: float = 256.0, n_folds: int = 3) -> dict:
    """Fit the Clark, the additive and the joint MoE law on train_rows, choose one by
    cross-validation on train_rows alone, and score every law on heldout_rows.

    "joint" is Ludziejewski et al. 2025 (`moe.scaling.joint_moe.fit_joint_moe`: active
    params, training tokens from each row's "tokens", experts; same e_start/e_max as Clark).
    It needs >= 10 runs and token budgets that vary at fixed size; when a table cannot
    identify it (e.g. a fixed tokens/param ladder, or rows without "tokens") its entry holds
    the error and the other laws are compared as before.

    Selection never sees heldout_rows. The candidates are the laws fitted on all of
    train_rows. Cross-validation is forward-chaining over model size (`size_groups`): fold
    j leaves out the j-th largest size among train_rows (j = 1..n_folds, only while >= 2
    smaller sizes remain), fits each law on every training run of a smaller size, and
    scores RMSE of log loss on the left-out size. A law gets no score in a fold where its
    fit raises or its training runs are no more than its parameters (it would interpolate
    them); the fold's entry says why. `better` is the candidate with the lowest mean CV
    RMSE over the folds where every candidate has a score; when no fold has them all, the
    candidate scored in the fewest folds is dropped until one does. Held-out RMSE is
    computed for every fitted law as information and does not enter the choice.

    Score: RMSE of log loss (natural log), which is scale-free and is what every fit sees.
    Returns {"clark": {...}, "additive": {...}, "joint": {...}, "better": name or None,
    "reason": str, "selected_by": str, "cv_folds_used": [size labels]}; each law entry has
    params (or error), train_rmse_log, heldout_rmse_log, cv_rmse_log (mean over the folds
    used for the choice, NaN when not a candidate or not scored there), cv_folds
    [{left_out, params_active, n_train, n_test, rmse_log (NaN when not scored), error}],
    and per-row predictions on the held-out rows.
    """
    from moe.scaling.joint_moe import fit_joint_moe, joint_moe_predict  # (imports this module)

    train_rows, heldout_rows = list(train_rows), list(heldout_rows)
    out: dict = {}
    y_tr = np.log(_col(train_rows, "final_eval_loss"))
    y_ho = np.log(_col(heldout_rows, "final_eval_loss")) if heldout_rows else np.empty(0)

    def rmse(pred, y):
        return float(np.sqrt(np.mean((np.log(pred) - y) ** 2))) if y.size else float("nan")

    laws = {
        "clark": (lambda rows: fit_clark(_col(rows, active_key), _experts(rows),
                                         _col(rows, "final_eval_loss"),
                                         e_start=e_start, e_max=e_max),
                  lambda p, rows: clark_predict(p, _col(rows, active_key), _experts(rows))),
        "additive": (lambda rows: fit_additive_moe(_col(rows, active_key), _col(rows, total_key),
                                                   _col(rows, "final_eval_loss")),
                     lambda p, rows: additive_moe_predict(p, _col(rows, active_key),
                                                          _col(rows, total_key))),
        "joint": (lambda rows: fit_joint_moe(_col(rows, active_key), _tokens(rows),
                                             _experts(rows), _col(rows, "final_eval_loss"),
                                             e_start=e_start, e_max=e_max),
                  lambda p, rows: joint_moe_predict(p, _col(rows, active_key), _tokens(rows),
                                                    _experts(rows))),
    }
    errors = (ValueError, RuntimeError, np.linalg.LinAlgError)
    for name, (fit, pred) in laws.items():
        try:  # predictions too: held-out rows can lack a column the fit had (e.g. tokens)
            p = fit(train_rows)
            tr_pred = pred(p, train_rows)
            ho_pred = pred(p, heldout_rows) if heldout_rows else np.empty(0)
        except errors as exc:
            out[name] = {"params": None, "error": str(exc), "train_rmse_log": float("nan"),
                         "heldout_rmse_log": float("nan"), "predictions": []}
            continue
        out[name] = {
            # without the fit's internal problem (arrays): params are the law's values
            "params": {k: v for k, v in p.items() if k != "_problem"}, "error": None,
            "train_rmse_log": rmse(tr_pred, y_tr),
            "heldout_rmse_log": rmse(ho_pred, y_ho),
            "predictions": [{"name": r.get("name"), "actual": float(r["final_eval_loss"]),
                             "predicted": float(v)} for r, v in zip(heldout_rows, ho_pred)],
        }

    # Cross-validation over sizes, on train_rows only.
    groups = size_groups(train_rows)
    folds = []
    for j in range(1, n_folds + 1):
        if len(groups) - j < 2:
            break
        label, test_idx = groups[-j]
        fit_rows = [train_rows[i] for _, idx in groups[:-j] for i in idx]
        folds.append((label, fit_rows, [train_rows[i] for i in test_idx]))
    candidates = [k for k in laws if out[k]["params"] is not None]
    for name, (fit, pred) in laws.items():
        cv = []
        for label, fit_rows, test in folds:
            rec = {"left_out": label,
                   "params_active": float(min(r[active_key] for r in test)),
                   "n_train": len(fit_rows), "n_test": len(test), "rmse_log": float("nan"),
                   "error": None}
            d = _distinct_runs(fit_rows, active_key, total_key)
            if d <= JOINT_N_PARAMS[name]:
                rec["error"] = (f"{d} distinct training runs for {JOINT_N_PARAMS[name]} "
                                "parameters: the fit would interpolate them")
            else:
                try:
                    with np.errstate(all="ignore"):
                        rec["rmse_log"] = rmse(pred(fit(fit_rows), test),
                                               np.log(_col(test, "final_eval_loss")))
                    if not math.isfinite(rec["rmse_log"]):
                        rec["error"] = "prediction on the left-out size is not finite"
                except errors as exc:
                    rec["error"] = str(exc)
            cv.append(rec)
        out[name]["cv_folds"] = cv

    def scored(k):
        return {f["left_out"] for f in out[k]["cv_folds"] if math.isfinite(f["rmse_log"])}

    cands = [k for k in candidates if scored(k)]
    dropped = [k for k in candidates if k not in cands]
    used: list = []
    while cands:
        common = set.intersection(*(scored(k) for k in cands))
        used = [lab for lab, _, _ in folds if lab in common]
        if used:
            break
        worst = min(cands, key=lambda k: (len(scored(k)), -candidates.index(k)))
        dropped.append(worst)
        cands.remove(worst)
    for k in laws:
        fs = [f["rmse_log"] for f in out[k]["cv_folds"] if f["left_out"] in used]
        out[k]["cv_rmse_log"] = (float(np.mean(fs)) if k in cands and fs
                                 else float("nan"))
    sizes = ", ".join(lab for lab, _, _ in folds) or "none"
    out["cv_folds_used"] = used
    out["selected_by"] = (
        "cross-validation on fitted runs (leave the largest remaining active size out in "
        f"turn: {len(folds)} fold(s), left out {sizes}; mean RMSE(log L) over the "
        f"{len(used)} fold(s) where every candidate law was fitted: "
        f"{', '.join(used) or 'none'}); held-out runs not used")
    held_info = ", ".join(f"{k} held-out RMSE(log L) {out[k]['heldout_rmse_log']:.4g}"
                          for k in laws if np.isfinite(out[k]["heldout_rmse_log"]))
    if not candidates:
        out["better"], out["reason"] = None, "no law could be fitted"
        return out
    if not cands:
        out["better"] = None
        out["reason"] = ("no law could be cross-validated: "
                         + ("fewer than 3 distinct sizes among the fitted runs" if not folds
                            else "no candidate was fitted in any fold")
                         + (f"; for information, {held_info}" if held_info else ""))
        return out
    best = min(cands, key=lambda k: out[k]["cv_rmse_log"])
    out["better"] = best
    out["reason"] = ("CV RMSE(log L) " + ", ".join(f"{k} {out[k]['cv_rmse_log']:.4g}"
                                                   for k in cands)
                     + (f"; not cross-validated in a common fold: {', '.join(dropped)}"
                        if dropped else "")
                     + (f"; for information, not used to choose: {held_info}"
                        if held_info else "; no held-out runs"))
    return out


# ------------------------------------------------------------- efficiency leverage


def efficiency_leverage(rows: Sequence[dict], dense_fit: dict | None = None, *,
                        by: str = "params", key: str | None = None) -> list[dict]:
    """Efficiency leverage of each run against the dense power law.

    by="params": EL = N_dense(L) / N_run, N_dense(L) the size (in `key`, default
    params_active) at which the dense fit L(N) = E + A/N^alpha reaches the run's loss.
    by="compute": the same with training FLOPs (key default "flops") and a dense L(C) fit,
    i.e. Ant Group's "dense compute / MoE compute at equal loss".
    `dense_fit` is a `fit_power_law` dict over that key; when None it is fitted on the dense
    rows among `rows` (needs >= 3). A run whose loss is at or below the dense fit's
    irreducible E has no dense equivalent: leverage NaN with the reason. Dense runs come out
    at ~1 (exactly 1 on noise-free data), which checks the fit.
    Returns one dict per row: name, kind, n_experts, top_k, sparsity, loss, x, x_dense_equiv,
    leverage, reason.
    """
    if by not in ("params", "compute"):
        raise ValueError(f"by must be 'params' or 'compute', got {by!r}")
    key = key or ("params_active" if by == "params" else "flops")
    rows = list(rows)
    if dense_fit is None:
        dense = [r for r in rows if r.get("kind") == "dense"]
        if len(dense) < 3:
            raise ValueError(f"efficiency leverage needs a dense fit: {len(dense)} dense runs, "
                             "need >= 3")
        dense_fit = fit_power_law(_col(dense, key), _col(dense, "final_eval_loss"))
    out = []
    for r in rows:
        L = float(r["final_eval_loss"])
        x = float(r[key])
        xe = float(power_law_inverse(dense_fit, L))
        if L <= dense_fit["E"]:
            lev, reason = float("nan"), (f"loss {L:.4g} is at or below the dense fit's "
                                         f"irreducible E = {dense_fit['E']:.4g}")
        elif not np.isfinite(xe):
            lev, reason = float("nan"), "dense fit cannot be inverted (alpha = 0)"
        else:
            lev, reason = xe / x, ""
        out.append({"name": r.get("name"), "kind": r.get("kind"),
                    "n_experts": r.get("n_experts"), "top_k": r.get("top_k"),
                    "sparsity": r.get("sparsity"), "loss": L, "x": x, "x_dense_equiv": xe,
                    "leverage": lev, "reason": reason})
    return out
