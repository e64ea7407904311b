"""Profile likelihood (`lse_profile`, `law_profiles`): intervals for exponents and the
irreducible loss of a log-sum-exp law from the least-squares profile with an F(1, m - p)
threshold, and the exponents conditional on stated irreducible losses, for ladders that
cannot determine E.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

from moe.scaling.laws.lse import TIGHT_LBFGS
from moe.scaling.laws.objective import lse_objective


#: Huber delta that makes `lse_objective` plain least squares (sum of r^2 / 2): residuals
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
        f, g = lse_objective(t, logX, logL, _LS_DELTA, "sum")
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


class _ProfileWalk:
    """The least-squares profile of parameter ``index``: F at a fixed value (`stat`, each
    fit started from a given point, the optimum and `e_starts`), every point profiled so
    far (`path`: starts for stated values), and the walk from the optimum outward to the
    F threshold (`walk`)."""

    def __init__(self, logX, logL, theta_ls, index, to_int, bounds, rss_min, s2, crit, v_hat,
                 limits):
        self.logX, self.logL, self.theta_ls, self.index = logX, logL, theta_ls, index
        self.to_int, self.bounds, self.rss_min, self.s2 = to_int, bounds, rss_min, s2
        self.crit, self.v_hat, (self.lo_lim, self.hi_lim) = crit, v_hat, limits
        self.e_starts = _e_starts(logX, logL, theta_ls, index)
        self.path = [(v_hat, theta_ls)]  # every profiled point: starts for the stated values

    def stat(self, v, start):
        rss, t = _fixed_fit(self.logX, self.logL, self.theta_ls, self.index, self.to_int(v),
                            self.bounds, [start, self.theta_ls, *self.e_starts])
        self.path.append((v, t))
        return (rss - self.rss_min) / self.s2, t

    def walk(self, sign):
        """(the last value inside the threshold on this side, whether that is the limit):
        doubling steps outward, then bisection to 1e-4 of the bracket."""
        lo_lim, hi_lim, crit = self.lo_lim, self.hi_lim, self.crit
        width = hi_lim - lo_lim
        step = max(0.02 * abs(self.v_hat), 1e-3 * width, 1e-12)
        inside, t_in = self.v_hat, self.theta_ls
        while True:
            v = min(max(inside + sign * step, lo_lim), hi_lim)
            F, t = self.stat(v, t_in)
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
            F, t = self.stat(mid, t_in)
            if F > crit:
                outside = mid
            else:
                inside, t_in = mid, t
        return inside, False


def _e_starts(logX, logL, theta_ls, index) -> list:
    """Extra starts with the irreducible term at 0.3, 0.6, 0.9 of the smallest loss.

    The irreducible term's gradient vanishes once it has collapsed (e = -25: exp(e) ~
    1e-11), so a fit started there never leaves E = 0: every fixed fit is also started
    with E at several fractions of the smallest loss."""
    K = len(logX)
    e_starts = []
    if index != K:
        for frac in (0.3, 0.6, 0.9):
            t = theta_ls.copy()
            t[K] = math.log(frac * math.exp(float(logL.min())))
            e_starts.append(t)
    return e_starts


def lse_profile(logX, logL, theta, *, index: int, limits: tuple[float, float],
                log_param: bool = False, bounds=None, level: float = 0.95,
                stated: Sequence[float] = (), intervals: bool = True) -> dict | None:
    """Profile-likelihood interval of one parameter of an LSE law (`lse_terms` layout).

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
    res = minimize(lse_objective, np.asarray(theta, float),
                   args=(logX, logL, _LS_DELTA, "sum"), jac=True, method="L-BFGS-B",
                   bounds=bounds, options=TIGHT_LBFGS)
    theta_ls, rss_min = res.x.copy(), 2.0 * float(res.fun)
    s2 = max(rss_min, 1e-300) / dof
    crit = float(f_dist.ppf(level, 1, dof))
    to_int = (lambda v: math.log(v) if v > 0 else -700.0) if log_param else (lambda v: v)
    v_hat = math.exp(theta_ls[index]) if log_param else float(theta_ls[index])
    lo_lim, hi_lim = limits
    v_hat = min(max(v_hat, lo_lim), hi_lim)

    pw = _ProfileWalk(logX, logL, theta_ls, index, to_int, bounds, rss_min, s2, crit, v_hat,
                      (lo_lim, hi_lim))
    lo = hi = lo_open = hi_open = None
    if intervals:
        lo, lo_open = pw.walk(-1.0) if v_hat > lo_lim else (lo_lim, True)
        hi, hi_open = pw.walk(+1.0) if v_hat < hi_lim else (hi_lim, True)
    if callable(stated):
        stated = stated(lo, hi, v_hat)
    cond = []
    for v in stated:
        # started from the nearest profiled point as well: near the edge of the interval
        # the fit can need exponents far from the optimum's (continuation found them)
        near = min(pw.path, key=lambda pt: abs(pt[0] - v))[1]
        F, t = pw.stat(float(v), near)
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
    fitted without one, gets it here, as its at-bound rule in analysis/kinds.py treats an
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
