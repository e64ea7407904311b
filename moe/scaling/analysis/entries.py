"""One law's LAW entry: its point fit, whole-run bootstrap, status and reason.

`boot_law` is the procedure every bootstrapped law of the analysis goes through (the
statuses and the rules behind them are in the schema, `schema.py`); the rest are its
parts and the readers of a finished entry (`params_of`, `replicate_params`, `band`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from moe.scaling.analysis.kinds import FIT_ERRORS, num
from moe.scaling.laws.profile import law_profiles
from moe.scaling.laws.resample import bootstrap


def estimates(point: dict, samples: dict, names: Sequence[str], level: float) -> dict:
    q = 100.0 * (1.0 - level) / 2.0
    out = {}
    for k in names:
        s = np.asarray(samples.get(k, []), float)
        s = s[np.isfinite(s)]
        if s.size:
            lo, med, hi = np.percentile(s, [q, 50.0, 100.0 - q])
        else:
            lo = med = hi = math.nan
        out[k] = {"value": num(point[k]), "lo": num(lo), "hi": num(hi), "median": num(med)}
    return out


#: An irreducible term (E, E0, c) below this fraction of the smallest fitted loss has
#: collapsed: the law is then a pure power law and the data did not determine E.
COLLAPSE_FRAC = 1e-3


#: Bootstrap replicates "split into modes" (status unidentified) when a kernel density of
#: one parameter's replicates (Silverman's bandwidth, which over-smooths multimodal data)
#: has a valley below MODE_VALLEY of the lower of the peaks either side, with at least
#: MODE_MIN_MASS of the replicates on each side. Checked with >= MODE_MIN_REPLICATES.
MODE_VALLEY = 0.5

MODE_MIN_MASS = 0.1

MODE_MIN_REPLICATES = 20


def replicate_modes(values, *, log: bool = False) -> dict | None:
    """Two separated modes in one parameter's bootstrap replicates, or None.

    A Gaussian kernel density (scipy.stats.gaussian_kde, Silverman's rule) of the finite
    replicates (their logs with `log`, for amplitudes spanning decades) is evaluated on 512
    points; every interior local minimum is a candidate valley, and the deepest one with
    >= MODE_MIN_MASS of the replicates on each side and density < MODE_VALLEY x the lower
    of the highest peaks on its two sides is returned as {valley, masses [left, right],
    medians [left, right], depth (valley / lower peak)} in the parameter's own units.
    Checked on unimodal draws (normal, log-normal, Student t3, uniform; n 50-400):
    no split found in 200 draws of each (tests/test_scaling_identify.py).
    """
    from scipy.stats import gaussian_kde

    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    if log:
        x = np.log(x[x > 0])
    if x.size < MODE_MIN_REPLICATES or np.ptp(x) <= 1e-9 * max(1.0, float(np.abs(x).max())):
        return None
    try:
        kde = gaussian_kde(x, bw_method="silverman")
    except (np.linalg.LinAlgError, ValueError):
        return None  # (nearly) all replicates equal
    grid = np.linspace(x.min(), x.max(), 512)
    d = kde(grid)
    best = None
    for i in range(1, len(grid) - 1):
        if not (d[i] <= d[i - 1] and d[i] < d[i + 1]):
            continue
        depth = d[i] / min(d[:i].max(), d[i + 1:].max())
        left = float(np.mean(x < grid[i]))
        if depth < MODE_VALLEY and min(left, 1.0 - left) >= MODE_MIN_MASS:
            if best is None or depth < best[0]:
                best = (depth, i, left)
    if best is None:
        return None
    depth, i, left = best
    back = np.exp if log else (lambda v: v)
    return {"valley": float(back(grid[i])), "masses": [left, 1.0 - left],
            "medians": [float(back(np.median(x[x < grid[i]]))),
                        float(back(np.median(x[x >= grid[i]])))],
            "depth": float(depth)}


#: An irreducible term's replicates split when at least MODE_MIN_MASS of them collapsed
#: (< COLLAPSE_FRAC of the smallest loss) and at least MODE_MIN_MASS are above AWAY_FRAC
#: of it: a point mass at 0 beside a spread of real values, which a kernel density
#: smooths into one broad mode (the committed CPU ladder's dense E: 11% collapsed, 61%
#: above 0.25, a density valley only 0.81 of the lower peak).
AWAY_FRAC = 0.1


def collapse_split(values, smallest_loss: float) -> dict | None:
    """{kind: "collapse", masses [collapsed, away], medians [...], floors [collapse, away]}
    when an irreducible term's replicates fall both at 0 and well above it, else None."""
    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    if x.size < MODE_MIN_REPLICATES:
        return None
    lo, hi = COLLAPSE_FRAC * smallest_loss, AWAY_FRAC * smallest_loss
    down, up = x[x < lo], x[x > hi]
    if min(down.size, up.size) < MODE_MIN_MASS * x.size:
        return None
    return {"kind": "collapse", "masses": [down.size / x.size, up.size / x.size],
            "medians": [float(np.median(down)), float(np.median(up))], "floors": [lo, hi]}


def split_reason(k: str, m: dict) -> str:
    if m.get("kind") == "collapse":
        return (f"{k} collapsed to 0 in {100 * m['masses'][0]:.0f}% of the bootstrap "
                f"replicates and is above {m['floors'][1]:.2g} in {100 * m['masses'][1]:.0f}%")
    return (f"{k}'s bootstrap replicates split into two modes ({100 * m['masses'][0]:.0f}% "
            f"near {m['medians'][0]:.3g}, {100 * m['masses'][1]:.0f}% near "
            f"{m['medians'][1]:.3g})")


def modes_of(reps: dict, names, irreducible, log_scale, smallest_loss) -> dict:
    """Parameters whose replicates split (the irreducible term first): {param: split}."""
    out = {}
    for k in ([irreducible] if irreducible else []) + [k for k in names if k != irreducible]:
        if k not in reps:
            continue
        m = (collapse_split(reps[k], smallest_loss) if k == irreducible else None) \
            or replicate_modes(reps[k], log=k in log_scale)
        if m is not None:
            out[k] = m
    return out


def boot_law(fit: Callable, rows: list, names: Sequence[str], *, n_params: int,
             key: Callable, at_bound: Callable, n_boot: int, seed: int, level: float,
             law: str, progress, replicate_fit: Callable | None = None,
             objective_name: str = "", irreducible: str | None = None,
             log_scale: Sequence[str] = (), profile: Callable | None = None) -> dict:
    """Point fit + whole-run bootstrap of one law -> a LAW entry (see module docstring), or
    a not-fitted entry with the reason when the point fit raises.

    key(run) -> what makes runs distinct for this law (its inputs). A replicate that drew
    no more distinct runs than the law has parameters fails: its fit interpolates the
    drawn points exactly, so any curve through them is as good as the one the optimiser
    happened to stop on (with 4 sizes of a 3-parameter law, 85% of whole-run resamples
    hold only 3 distinct sizes, and those replicates were what spread the CPU ladder's
    dense A over 24 decades).

    at_bound(params) -> '' or the reason the fit sits on a box bound / degenerate exponent.
    irreducible: the parameter that is the law's irreducible loss (checked for collapse,
    COLLAPSE_FRAC); log_scale: parameters whose replicates are checked for modes in log
    units (amplitudes); profile(point, rows) -> the entry's `profile` (profile-likelihood
    intervals), run on the point fit only. Status, first that applies: not_converged,
    degenerate, unidentified, unbounded, ok (module docstring).
    """
    n_distinct = len({key(r) for r in rows})
    try:
        bs = _bootstrapped(fit, replicate_fit or fit, rows, names, key=key, n_params=n_params,
                           n_distinct=n_distinct, at_bound=at_bound, n_boot=n_boot, seed=seed,
                           level=level, progress=progress)
    except FIT_ERRORS as exc:  # the point fit itself: the law is not fitted, and why
        return not_fitted(law, len(rows), str(exc))
    point = bs["point"]
    ok = np.isfinite(bs["samples"][names[0]])
    reps = {k: [float(v) for v in bs["samples"][k][ok]] for k in names}
    n_ok = int(ok.sum())
    frac_bound = float(np.mean(bs["samples"]["at_bound"][ok])) if n_ok else 1.0
    entry = _entry_head(law, rows, n_boot, bs, objective_name)
    entry.update(estimates(point, bs["samples"], names, level))
    degenerate = _degenerate(point, rows, irreducible, at_bound)
    # unidentified: replicates in separate modes (the irreducible term, then the rest)
    modes = modes_of(reps, names, irreducible, log_scale,
                     min(float(r["final_eval_loss"]) for r in rows)) if n_ok else {}
    if modes:
        entry["modes"] = modes
    reasons = []
    if n_distinct <= n_params:
        reasons.append(f"{n_distinct} distinct runs for {n_params} parameters: the curve "
                       "interpolates them, no residual to estimate an interval from")
    if n_ok < n_boot / 2:
        reasons.append(f"{n_boot - n_ok}/{n_boot} bootstrap replicates failed (too few "
                       "distinct runs drawn)")
    if frac_bound > (1.0 - level) / 2:
        reasons.append(f"{100 * frac_bound:.0f}% of replicates end on a bound or a degenerate "
                       "exponent (the interval edge is the optimiser's box, not the data)")
    # a point on a bound or a collapsed term makes the percentile interval no confidence
    # statement either (its edge is the box), so such a law is not "bounded"
    entry["bounded"] = not reasons and not modes and not degenerate
    _set_status(entry, point, degenerate, modes, reasons)
    if profile is not None:
        try:
            entry["profile"] = profile(point, rows)
        except FIT_ERRORS as exc:
            entry["profile"] = {"error": str(exc)}
    entry["replicates"] = reps
    return entry


def _bootstrapped(fit: Callable, replicate_fit: Callable, rows: list, names, *, key,
                  n_params: int, n_distinct: int, at_bound, n_boot, seed, level,
                  progress) -> dict:
    """`bootstrap` of the law with every fit flagged: a replicate that drew no more distinct
    runs than the law has parameters raises (counts as failed), and each fit records
    whether it sits on a bound (`at_bound` 0/1)."""
    def flagged(f):
        def fit_flagged(rs):
            d = len({key(r) for r in rs})
            if d <= n_params and d < n_distinct:
                raise ValueError(f"replicate drew {d} distinct runs for {n_params} parameters")
            p = dict(f(rs))
            p["at_bound"] = float(bool(at_bound(p)))
            return p
        return fit_flagged

    return bootstrap(flagged(fit), rows, n_boot=n_boot, seed=seed, level=level,
                     params=list(names) + ["at_bound"], keep_samples=True,
                     progress=progress, replicate_fn=flagged(replicate_fit))


def _entry_head(law: str, rows: list, n_boot: int, bs: dict, objective_name: str) -> dict:
    """The entry's law, counts, objective, convergence and optimum evidence."""
    point = bs["point"]
    entry = {"law": law, "n_runs": len(rows), "n_boot": int(n_boot),
             "failed_replicates": int(bs["n_failed"]),
             "objective": num(point.get("objective_sum", point.get("objective",
                                                                   point.get("rmse_log")))),
             "converged": bool(point.get("converged", True))}
    if "refit_gain" in point:
        entry["optimum"] = {k: point[k] for k in ("refit_gain", "refit_ok", "starts_agree",
                                                  "starts_finished", "starts_spread")}
    if objective_name:
        entry["objective_name"] = objective_name
    return entry


def _degenerate(point: dict, rows: list, irreducible, at_bound) -> list[str]:
    """Why the point fit itself is degenerate: a collapsed irreducible term, a bound."""
    degenerate = []
    if irreducible is not None:
        floor = COLLAPSE_FRAC * min(float(r["final_eval_loss"]) for r in rows)
        if float(point[irreducible]) < floor:
            degenerate.append(
                f"{irreducible} = {float(point[irreducible]):.2g} has collapsed to 0 (below "
                f"{COLLAPSE_FRAC:g} of the smallest fitted loss): the irreducible loss is not "
                "determined by these runs")
    why_bound = at_bound(point)
    if why_bound:
        degenerate.append(why_bound)
    return degenerate


def _set_status(entry: dict, point: dict, degenerate: list, modes: dict, reasons: list) -> None:
    """status and reason, the first that applies: not_converged, degenerate, unidentified,
    unbounded, ok."""
    split = [split_reason(k, m) for k, m in modes.items()]
    if not entry["converged"]:
        entry["status"] = "not_converged"
        reasons.insert(0, "the point fit's optimiser did not report convergence")
    elif "refit_ok" in point and not point["refit_ok"]:
        entry["status"] = "not_converged"
        reasons.insert(0, f"a refit from the reported point lowered the objective by "
                          f"{point['refit_gain']:.2g}: it is not the optimum")
    elif degenerate:
        entry["status"] = "degenerate"
    elif modes:
        entry["status"] = "unidentified"
    else:
        entry["status"] = "ok" if not reasons else "unbounded"
    entry["reason"] = "; ".join(degenerate + split[:1] + reasons)


def not_fitted(law: str, n_runs: int, reason: str) -> dict:
    return {"law": law, "status": "not_fitted", "reason": reason, "n_runs": int(n_runs)}


def params_of(entry: dict, names: Sequence[str]) -> dict:
    return {k: entry[k]["value"] for k in names}


def replicate_params(entry: dict, names: Sequence[str]) -> list[dict]:
    reps = entry.get("replicates") or {}
    n = len(reps.get(names[0], []))
    return [{k: reps[k][i] for k in names} for i in range(n)]


def band(entry: dict, names, predict, xs: np.ndarray, level: float) -> dict:
    q = 100.0 * (1.0 - level) / 2.0
    point = predict(params_of(entry, names), xs)
    reps = replicate_params(entry, names)
    if reps:
        with np.errstate(over="ignore", invalid="ignore"):
            m = np.array([predict(p, xs) for p in reps])
        lo, hi = np.nanpercentile(m, [q, 100 - q], axis=0)
    else:
        lo = hi = np.full_like(xs, np.nan)
    return {"x": [float(v) for v in xs], "value": [num(v) for v in point],
            "lo": [num(v) for v in lo], "hi": [num(v) for v in hi]}


def profiler(exponents: dict, irreducible: str, level: float) -> Callable:
    """profile(point, rows) for boot_law: fits.law_profiles on the point fit."""
    return lambda point, rows: law_profiles(point, exponents=exponents,
                                            irreducible=irreducible, level=level)
