"""Scaling analysis as data: every fit, interval and prediction in one JSON-ready object.

    python -c "from moe.scaling import analyse, chinchilla_rows; a = analyse(chinchilla_rows(), n_boot=8); print(a['chinchilla']['alpha'])"

`analyse(rows)` runs every law the table supports and returns one dict; `write_fits`
saves it as `fits.json` and `read_fits` loads it back (checking the schema version).
report.md and every figure are rendered from that file alone (moe/scaling/report.py), so
other tools (dashboards, `moe-testbed plan`, a notebook) read the same numbers the report
prints, and a report can be re-rendered without refitting.

Schema, `schema_version: 2` (NaN and inf are written as null; all keys always present
unless marked "v2": those are absent from version-1 files, which read_fits still reads):

    schema_version  1
    source          the table the runs came from
    settings        {n_boot, level, seed, holdout, huber_delta}
    counting        {params: what params_active counts, conventions: [...], flops: ...}
    notes           [str]: runs skipped and why, defaults filled in
    runs            [{name, level, kind, n_experts, top_k, sparsity, params_active,
                      params_total, params_active_nonembed, params_total_nonembed, tokens,
                      flops, loss, error, maxvio, held_out}]   (fitted and held-out runs)
    power_laws      {<level>: LAW}, L(N_active) = E + A / N^alpha per sparsity level, with
                    `x`, `selection` (which runs: one token budget or tokens/param ratio),
                    `recipe` {by: tokens | tokens_per_param | tokens_per_nonembed_param,
                    value, rtol}, `conventions`
                    {params_active | params_active_nonembed: {E, alpha, objective,
                    converged}} (point fits) and `band` {x, value, lo, hi}
    compute_laws    {<level>: LAW}, L(C) = a C^b + c (a, b, c), same selection and band
    chinchilla      LAW over the dense runs: L(N, D) = E + A/N^alpha + B/D^beta, with
                    derived `a` (N_opt ~ C^a) and `b` (D_opt ~ C^b) as {value, lo, hi} and
                    `fitted` [{run, predicted}]
    chinchilla_levels  {<MoE level>: LAW}, the same approach 3 over one MoE level's runs
                    (with its derived a, b, n_opt_at_c_ref, loss_opt_at_c_ref); `moe-testbed
                    plan` uses it when no joint law is fitted. Absent from fits.json files
                    written before it existed (readers treat a missing key as {}).
    isoflop         {<level>: approach 2 (Porian et al. 2024) as `fit_isoflop` returns it,
                    plus status/reason; v2: exponent_profile_interval (and
                    d_exponent_profile_interval), the t interval of the OLS slope}
    overtraining    LAW, Gadre et al. 2024: L(N, M) = E + a N^b + beta 6^(b/2) (M N)^b,
                    N total params, M tokens per parameter (a, b, beta, E)
    downstream      LAW, Gadre et al. 2024: Err(L) = eps - k exp(-gamma L) (eps, k, gamma)
    joint_laws      {clark, additive, joint: LAW + {fixed (e_start, e_max), train_rmse_log,
                    heldout_rmse_log, cv_rmse_log, cv_folds [{left_out (size label),
                    params_active, n_train, n_test, rmse_log, error}]}, better, reason,
                    selected_by, cv_folds_used [size labels]}: `better` is chosen by
                    cross-validation on the fitted runs only (fits.compare_joint_laws:
                    leave the largest remaining size out in turn, lowest mean RMSE of log
                    loss over the folds where every candidate law was fitted; a law not
                    fitted in a fold has rmse_log null and the fold's error); held-out
                    RMSE is recorded for every law and never enters the choice.
                    Clark et al. 2022 (a, b, c, d), the additive law (E0, A, alpha, B,
                    beta), Ludziejewski et al. 2025 (a, alpha, gamma, delta, b, beta, zeta,
                    omega, c; exponents signed as in the paper, negative for a falling law)
    efficiency_leverage  [{run, level, el_params, el_params_lo, el_params_hi, el_compute,
                    el_compute_lo, el_compute_hi, basis, reason, interval_note}]; basis:
                    the dense curve used (dense L(N)/L(C) when ok, else Chinchilla L(N, D)
                    at the run's tokens), null with a reason when none is usable. lo/hi:
                    the `level` percentile interval of EL recomputed from each bootstrap
                    replicate of the basis law: the uncertainty of the dense curve only,
                    not the MoE run's own seed noise; null when there is no replicate, or
                    (hi) when the edge falls among replicates whose dense curve never
                    reaches the run's loss (interval_note counts them)
    holdout         [{run, quantity (loss|error), law, predicted, lo, hi, actual,
                      rel_error, bounded}]; rel_error = predicted / actual - 1
    seed_noise      {runs: [{run, n, losses, mean, std}], std, rel_std} or null
    sparsity_comparison  [{size, params_active, losses {level: loss}, runs, gaps: [{from,
                    to, gap (loss of `to` - loss of `from`, levels in sparsity order, grid
                    runs), paired, test}]}]: `paired` {n, seeds, diffs, mean, se, lo, hi,
                    level, df, t, p} is a paired t-test of the two levels' losses over the
                    seeds both ran (the `seed` column; grid run and its seed repeats), null
                    with fewer than two common seeds; `test` says which in words ("one run
                    per level: no paired test"). (Replaces within_noise, which judged the
                    gap of two single runs against the pooled seed std.)
    compare         [{run, loss, maxvio, tokens_per_s, flops}] or null (the ladder's
                    fixed-size comparison variants)

A LAW entry: `law` (formula), `status`, `reason`, each parameter as {value, lo, hi,
median} (95% percentile bootstrap over whole runs by default), `n_runs`, `n_boot`,
`failed_replicates`, `objective` (summed Huber of log residuals unless `objective_name`
says otherwise), `converged` (the point fit reached its optimum: the optimiser reported
success, or stopped in a line search that a refit from the point confirms), `bounded`,
and `replicates` {param: [value per successful replicate]} so later tools propagate
uncertainty without refitting. A not-fitted law has status, reason, law and n_runs only.
v2 adds:
    optimum   {refit_gain, refit_ok, starts_agree, starts_finished, starts_spread} for the
              LSE laws (fits._optimum_checks): how much a refit from the reported point
              lowered the objective (refit_ok: at most fits.REFIT_RTOL relative), and how
              many multi-start runs reached the best objective and how far apart their
              parameters ended (a flat valley: agreeing objectives, spread parameters)
    modes     {param: split} for parameters whose replicates split into two modes:
              {valley, masses, medians, depth} (`replicate_modes`), or for the irreducible
              term {kind: collapse, masses, medians, floors} (`collapse_split`: some
              replicates at 0, others well above it)
    profile   (L(N), L(C), approach 3, the additive law) profile-likelihood intervals
              (fits.law_profiles): {method, level, dof, rss_min, <exponent> and
              <irreducible>: {value, lo, hi, lo_open, hi_open}, conditional: {on, rows:
              [{<irreducible>, F, <exponents>}]}}: the exponents at stated values of the
              irreducible loss (0, its interval's ends, fractions of the smallest loss).
              `value` is the least-squares optimum the profile is taken around. Absent
              where the law has no residual degree of freedom; {error} if it failed.

`status`, the first that applies:
    not_fitted     the table cannot identify the law (reason says why)
    not_converged  the point fit is not the optimum (optimiser, or a refit improved it)
    degenerate     the point fit's irreducible term (E, c, E0) is below COLLAPSE_FRAC
                   (1e-3) of the smallest fitted loss, or a parameter is on its bound
                   (reason names it): the law did not determine that parameter
    unidentified   some parameter's bootstrap replicates split into two modes, or the
                   irreducible term's into collapsed and not (reason names it): the runs
                   are consistent with different laws
    unbounded      the interval is not a confidence statement (below)
    ok             none of these
Only ok laws are printed as numbers in report.md; the others read "not determined (why)",
with the profile-likelihood intervals and conditional exponents beside them.
`moe-testbed plan` plans only from ok and unbounded laws.

When an interval is unbounded (`bounded: false`, status "unbounded"): the law has no
residual degree of freedom (as many distinct runs as parameters: the curve interpolates),
more than half the replicates failed (the interval would describe a minority of
resamples), or more than (1 - level)/2 of the successful replicates ended on a box bound
or a degenerate exponent (an exponent at 0 or its cap, an amplitude at its cap): then the
interval's edge is set by the optimiser's box, not by the data. Degenerate and
unidentified laws are not `bounded` either.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from moe.scaling.fits import (HUBER_DELTA, chinchilla_frontier, chinchilla_predict,
                              clark_predict, compare_joint_laws, fit_additive_moe,
                              fit_chinchilla, fit_clark, fit_compute_law, fit_power_law,
                              law_profiles)
from moe.scaling.resample import bootstrap
from moe.scaling.results import ResultsError, run_group, validate_rows

__all__ = ["SCHEMA_VERSION", "analyse", "read_fits", "split_holdout", "write_fits",
           "law_predict"]

SCHEMA_VERSION = 2
#: fits.json versions read_fits accepts: 1 lacks the keys version 2 added (module docstring)
READABLE_VERSIONS = (1, 2)
_FIT_ERRORS = (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError)
# fit_power_law's box: exponent in [0, max_alpha], log-amplitude in [-50, 50] (x_ref units).
_MAX_ALPHA = 5.0
_AMP_BOUND = 50.0
_CURVE_FIT_OBJECTIVE = "sum of squared residuals (curve_fit least squares, as Gadre et al.)"


# ----------------------------------------------------------------------------- laws
#
# Each law the analysis bootstraps is described once: how to fit it on rows, which
# parameters to keep, how to predict from a parameter dict (point or replicate), and when
# a fit sits on a box bound. Predictions and bands come from stored parameters only.


def _col(rows, key):
    return np.array([float(r[key]) for r in rows], float)


def _pl_predict(p, x):
    """E + A / x^alpha in log form (A can be ~1e60 in FLOP units)."""
    x = np.asarray(x, float)
    return p["E"] + np.exp(math.log(p["A"]) - p["alpha"] * np.log(x))


def _cl_predict(p, c):
    return p["c"] + np.exp(math.log(p["a"]) + p["b"] * np.log(np.asarray(c, float)))


def _exponents_in_box(p, names, sign=1.0, cap=_MAX_ALPHA) -> str:
    """'' when every exponent sign * p[k] lies strictly inside (0, cap), else a reason
    naming the first one that does not (at 0 the law stops falling; at the cap it is a step
    the data cannot support)."""
    for k in names:
        v = sign * float(p[k])
        if not v > 1e-6:
            return f"{k} = {p[k]:.3g} is at its bound 0 (the law does not fall)"
        if not v < cap * (1 - 1e-6):
            return f"{k} = {p[k]:.3g} is at its cap {sign * cap:g}"
    return ""


def _pl_at_bound(p, exponent="alpha", sign=1.0):
    """Why a 1-D power-law fit sits on fit_power_law's box ('' when it does not)."""
    why = _exponents_in_box({exponent: sign * p["alpha"]}, (exponent,), sign)
    if not why and abs(p.get("a_log", 0.0)) >= _AMP_BOUND * (1 - 1e-6):
        why = f"the amplitude's log is at its box edge +-{_AMP_BOUND:g}"
    return why


def _cl_at_bound(p):
    return _pl_at_bound(p, "b", -1.0)


def _chin_at_bound(p):
    # approach 3 is unbounded in the optimiser; a non-positive exponent is a degenerate
    # (non-decreasing) law, and an exponent above 5 a step the data cannot support.
    return _exponents_in_box(p, ("alpha", "beta"))


def law_predict(kind: str, params: dict, run: dict) -> float:
    """Loss (or error, for "downstream") predicted by one law entry's parameters for a run.

    kind: power | compute | chinchilla | overtraining | downstream | clark | additive |
    joint. `run` is a row of fits.json["runs"] (for downstream, its `loss` is the input).
    For clark and joint, params must carry e_start and e_max (their entries' `fixed`).
    Used by the analysis for held-out predictions and by later tools to propagate
    replicates.
    """
    if kind == "power":
        return float(_pl_predict(params, run["params_active"]))
    if kind == "compute":
        return float(_cl_predict(params, run["flops"]))
    if kind == "chinchilla":
        return float(chinchilla_predict(params, run["params_active"], run["tokens"]))
    if kind == "overtraining":
        from moe.scaling.overtraining import overtraining_predict

        n = run["params_total"]
        return float(overtraining_predict(params, n, run["tokens"] / n))
    if kind == "downstream":
        from moe.scaling.overtraining import downstream_predict

        return float(downstream_predict(params, run["loss"]))
    experts = 1.0 if run["kind"] == "dense" else float(run["n_experts"])
    if kind == "clark":
        return float(clark_predict(params, run["params_active"], experts)[0])
    if kind == "additive":
        return float(params["E0"] + math.exp(math.log(params["A"]) - params["alpha"]
                                             * math.log(run["params_active"]))
                     + math.exp(math.log(params["B"]) - params["beta"]
                                * math.log(run["params_total"])))
    if kind == "joint":
        from moe.scaling.joint_moe import joint_moe_predict

        return float(joint_moe_predict(params, run["params_active"], run["tokens"], experts))
    raise ValueError(f"unknown law kind {kind!r}")


# ------------------------------------------------------------------------- helpers


def split_holdout(rows: Sequence[dict], holdout: str | None) -> tuple[list, list]:
    """Split rows into (train, held_out).

    holdout="none": nothing held out. "flag": rows with held_out true. None: "flag" if any
    row is flagged, else "largest".

    "largest" (the GPT-4-report check): in each sparsity level (`run_group`, so dense is a
    level like any MoE one) with >= 4 runs, ONE run is held out, so >= 3 remain to fit the
    3-parameter law. It is the run with the largest training budget: the `flop_budget`
    column when the row has one (an IsoFLOP ladder trains several sizes at one nominal
    budget, whose actual FLOPs differ by rounding), else `flops`; ties go to the largest
    params_active. On a size ladder that is each level's top size (dense included); on an
    IsoFLOP ladder, each level's largest size at its top budget. A level with < 4 runs
    keeps all of them.
    """
    rows = list(rows)
    if holdout is None:
        holdout = "flag" if any(r.get("held_out") for r in rows) else "largest"
    if holdout == "none":
        return rows, []
    if holdout == "flag":
        return ([r for r in rows if not r.get("held_out")], [r for r in rows if r.get("held_out")])
    if holdout != "largest":
        raise ValueError(f"holdout must be largest, none or flag; got {holdout!r}")
    held = set()
    for g in _groups(rows).values():
        if len(g) >= 4:
            held.add(id(max(g, key=lambda r: (r.get("flop_budget") or r["flops"],
                                              r["params_active"]))))
    return [r for r in rows if id(r) not in held], [r for r in rows if id(r) in held]


def _groups(rows) -> "OrderedDict[str, list]":
    g: dict[str, list] = {}
    for r in rows:
        g.setdefault(run_group(r), []).append(r)
    return OrderedDict(sorted(g.items(), key=lambda kv: (kv[1][0].get("sparsity", 0.0), kv[0])))


def _num(v):
    """A float for JSON (None for NaN/inf/None)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _clusters(values: np.ndarray, rtol: float) -> list[np.ndarray]:
    """Index groups of values agreeing within rtol: greedy in ascending order, a group
    spans at most a factor (1 + rtol) from its smallest value (no chaining: 8.2, 9.0, ...,
    13.5 in 10% steps are several groups, not one)."""
    order = np.argsort(values, kind="stable")
    lv = np.log(values[order])
    out, cur, start = [], [order[0]], lv[0]
    for j in range(1, len(order)):
        if lv[j] - start <= math.log1p(rtol):
            cur.append(order[j])
        else:
            out.append(np.array(cur))
            cur, start = [order[j]], lv[j]
    out.append(np.array(cur))
    return out


_RECIPES = {"tokens": "token budget", "tokens_per_param": "tokens/param ratio",
            "tokens_per_nonembed_param": "tokens per non-embedding param"}


def _recipe_value(r: dict, by: str) -> float:
    if by == "tokens":
        return r["tokens"]
    if by == "tokens_per_nonembed_param":
        return r["tokens"] / r["params_active_nonembed"]
    return r["tokens"] / r["params_active"]


def on_recipe(r: dict, recipe: dict) -> bool:
    """Whether a run was trained on `recipe` (a 1-D law's {by, value, rtol})."""
    return abs(math.log(_recipe_value(r, recipe["by"]) / recipe["value"])) <= math.log1p(
        recipe["rtol"])


def one_recipe_subset(rows: Sequence[dict], held: Sequence[dict] = (),
                      rtol: float = 0.1) -> tuple[list, str, dict]:
    """The runs a 1-D law over size may be fitted on, a sentence saying which, the recipe.

    L(N) is a law of size along ONE training recipe: every run at one token budget, or
    every run at one tokens-per-parameter ratio. When neither holds for the whole level
    (e.g. an IsoFLOP ladder, or Gadre et al.'s over-training grid) the recipe with the most
    distinct sizes (held-out runs counted, ties to the one holding more of them) is used and
    the sentence says so: mixing budgets would fit a law of the budgets, not of size. The
    recipe {by: tokens | tokens_per_param | tokens_per_nonembed_param, value, rtol} also
    decides which held-out runs the law may predict (`on_recipe`). Ties between recipes
    that hold the same runs go to the first in that order.
    """
    rows, held = list(rows), list(held)
    allr = rows + held
    best = None
    bys = ["tokens", "tokens_per_param"]
    if all(r.get("params_active_nonembed") for r in allr):  # Kaplan's N: a ladder's rule
        bys.append("tokens_per_nonembed_param")
    for by in bys:
        vals = np.array([_recipe_value(r, by) for r in allr])
        for idx in _clusters(vals, rtol):
            sizes = len({allr[i]["params_active"] for i in idx})
            n_held = int(np.sum(idx >= len(rows)))
            gm = float(np.exp(np.mean(np.log(vals[idx]))))
            score = (sizes, n_held, len(idx))
            if best is None or score > best[0]:
                best = (score, {"by": by, "value": gm, "rtol": rtol})
    recipe = best[1]
    sub = [r for r in rows if on_recipe(r, recipe)]
    label = f"{_RECIPES[recipe['by']]} ~ {recipe['value']:.3g}"
    if len(sub) == len(rows):
        return rows, f"all {len(rows)} runs ({label})", recipe
    return (sub, f"{len(sub)} of {len(rows)} runs, those at one {label} (the rest vary the "
            "training recipe, which L(N) does not model)", recipe)


# ----------------------------------------------------------------------- bootstrap


def _estimates(point: dict, samples: dict, names: Sequence[str], level: float) -> dict:
    q = 100.0 * (1.0 - level) / 2.0
    out = {}
    for k in names:
        s = np.asarray(samples.get(k, []), float)
        s = s[np.isfinite(s)]
        if s.size:
            lo, med, hi = np.percentile(s, [q, 50.0, 100.0 - q])
        else:
            lo = med = hi = math.nan
        out[k] = {"value": _num(point[k]), "lo": _num(lo), "hi": _num(hi), "median": _num(med)}
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


def _split_reason(k: str, m: dict) -> str:
    if m.get("kind") == "collapse":
        return (f"{k} collapsed to 0 in {100 * m['masses'][0]:.0f}% of the bootstrap "
                f"replicates and is above {m['floors'][1]:.2g} in {100 * m['masses'][1]:.0f}%")
    return (f"{k}'s bootstrap replicates split into two modes ({100 * m['masses'][0]:.0f}% "
            f"near {m['medians'][0]:.3g}, {100 * m['masses'][1]:.0f}% near "
            f"{m['medians'][1]:.3g})")


def _modes_of(reps: dict, names, irreducible, log_scale, smallest_loss) -> dict:
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


def _boot_law(fit: Callable, rows: list, names: Sequence[str], *, n_params: int,
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

    def flagged(f):
        def fit_flagged(rs):
            d = len({key(r) for r in rs})
            if d <= n_params and d < n_distinct:
                raise ValueError(f"replicate drew {d} distinct runs for {n_params} parameters")
            p = dict(f(rs))
            p["at_bound"] = float(bool(at_bound(p)))
            return p
        return fit_flagged

    try:
        bs = bootstrap(flagged(fit), rows, n_boot=n_boot, seed=seed, level=level,
                       params=list(names) + ["at_bound"], keep_samples=True,
                       progress=progress, replicate_fn=flagged(replicate_fit or fit))
    except _FIT_ERRORS as exc:  # the point fit itself: the law is not fitted, and why
        return _not_fitted(law, len(rows), str(exc))
    point = bs["point"]
    ok = np.isfinite(bs["samples"][names[0]])
    reps = {k: [float(v) for v in bs["samples"][k][ok]] for k in names}
    n_ok = int(ok.sum())
    frac_bound = float(np.mean(bs["samples"]["at_bound"][ok])) if n_ok else 1.0
    entry = {"law": law, "n_runs": len(rows), "n_boot": int(n_boot),
             "failed_replicates": int(bs["n_failed"]),
             "objective": _num(point.get("objective_sum", point.get("objective",
                                                                     point.get("rmse_log")))),
             "converged": bool(point.get("converged", True))}
    if "refit_gain" in point:
        entry["optimum"] = {k: point[k] for k in ("refit_gain", "refit_ok", "starts_agree",
                                                  "starts_finished", "starts_spread")}
    if objective_name:
        entry["objective_name"] = objective_name
    entry.update(_estimates(point, bs["samples"], names, level))
    # degenerate: the point fit itself has a collapsed term or sits on a bound
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
    # unidentified: replicates in separate modes (the irreducible term, then the rest)
    modes = _modes_of(reps, names, irreducible, log_scale,
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
    split = [_split_reason(k, m) for k, m in modes.items()]
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
    if profile is not None:
        try:
            entry["profile"] = profile(point, rows)
        except _FIT_ERRORS as exc:
            entry["profile"] = {"error": str(exc)}
    entry["replicates"] = reps
    return entry


def _not_fitted(law: str, n_runs: int, reason: str) -> dict:
    return {"law": law, "status": "not_fitted", "reason": reason, "n_runs": int(n_runs)}


def _params_of(entry: dict, names: Sequence[str]) -> dict:
    return {k: entry[k]["value"] for k in names}


def _replicate_params(entry: dict, names: Sequence[str]) -> list[dict]:
    reps = entry.get("replicates") or {}
    n = len(reps.get(names[0], []))
    return [{k: reps[k][i] for k in names} for i in range(n)]


def _band(entry: dict, names, predict, xs: np.ndarray, level: float) -> dict:
    q = 100.0 * (1.0 - level) / 2.0
    point = predict(_params_of(entry, names), xs)
    reps = _replicate_params(entry, names)
    if reps:
        with np.errstate(over="ignore", invalid="ignore"):
            m = np.array([predict(p, xs) for p in reps])
        lo, hi = np.nanpercentile(m, [q, 100 - q], axis=0)
    else:
        lo = hi = np.full_like(xs, np.nan)
    return {"x": [float(v) for v in xs], "value": [_num(v) for v in point],
            "lo": [_num(v) for v in lo], "hi": [_num(v) for v in hi]}


# ------------------------------------------------------------------------ sections

POWER = ("E", "A", "alpha")
COMPUTE = ("a", "b", "c")
CHIN = ("E", "A", "B", "alpha", "beta")
OVERTRAIN = ("E", "a", "b", "beta")
DOWNSTREAM = ("eps", "k", "gamma")


def _one_d_laws(groups, held_groups, n_boot, seed, level, progress):
    """Per sparsity level: L(N_active) and L(C) on one recipe, bootstrapped, with bands."""
    power, compute = {}, {}
    for gi, (g, gr) in enumerate(groups.items()):
        sub, selection, recipe = one_recipe_subset(gr, held_groups.get(g, []))
        distinct = len({r["params_active"] for r in sub})
        xs_all = gr + held_groups.get(g, [])
        for key, out, law, names, fit, predict, xkey, seed_off, at_bound, irr, amp in (
                ("power", power, "L = E + A / N_active^alpha", POWER, fit_power_law,
                 _pl_predict, "params_active", 0, _pl_at_bound, "E", "A"),
                ("compute", compute, "L = a C^b + c", COMPUTE, fit_compute_law, _cl_predict,
                 "flops", 100, _cl_at_bound, "c", "a")):
            # the exponent is theta[2] of fit_power_law (a compute law's b is -alpha)
            expo = {"alpha": (2, 1.0)} if key == "power" else {"b": (2, -1.0)}
            if distinct < 3:
                out[g] = _not_fitted(law, len(gr), f"{distinct} distinct size(s) along one "
                                     "recipe; a 3-parameter law needs >= 3 (" + selection + ")")
                out[g]["selection"] = selection
                continue
            entry = _boot_law(
                lambda rs, f=fit, k=xkey: f(_col(rs, k), _col(rs, "final_eval_loss")),
                sub, names, n_params=3, key=lambda r, k=xkey: r[k], at_bound=at_bound,
                n_boot=n_boot, seed=seed + seed_off + gi, level=level, law=law,
                progress=progress, irreducible=irr, log_scale=(amp,),
                profile=_profiler(expo, irr, level))
            out[g] = entry
            entry["selection"] = selection
            if entry["status"] == "not_fitted":
                continue
            entry["x"] = xkey
            entry["recipe"] = recipe
            x = _col(xs_all, xkey)
            grid = np.logspace(np.log10(x.min() / 1.5), np.log10(x.max() * 1.5), 40)
            entry["band"] = _band(entry, names, predict, grid, level)
            if key == "power":
                entry["conventions"] = _conventions(sub)
    return power, compute


def _conventions(rows):
    """Point fits of L(N) with embeddings counted (Chinchilla) and not (Kaplan); status
    degenerate (with the reason) when E collapsed, a parameter is on its bound or the fit
    did not converge (no bootstrap here, so no modes check)."""
    out = {}
    for key in ("params_active", "params_active_nonembed"):
        if not all(key in r for r in rows):
            out[key] = {"status": "not_fitted", "reason": f"the table has no {key} column"}
            continue
        try:
            f = fit_power_law(_col(rows, key), _col(rows, "final_eval_loss"))
        except _FIT_ERRORS as exc:
            out[key] = {"status": "not_fitted", "reason": str(exc)}
            continue
        floor = COLLAPSE_FRAC * float(np.min(_col(rows, "final_eval_loss")))
        why = (f"E = {f['E']:.2g} collapsed to 0" if f["E"] < floor else
               _pl_at_bound(f) or ("" if f["converged"] else "not converged"))
        out[key] = {"status": "degenerate" if why else "ok", "reason": why,
                    "E": _num(f["E"]), "alpha": _num(f["alpha"]),
                    "objective": _num(f["objective_sum"]), "converged": bool(f["converged"])}
    return out


#: L-BFGS starts for approach 3's and the additive law's bootstrap replicates (point fits
#: keep 32 and 16). With the tight tolerances every start costs ~9x scipy's defaults'
#: (1.3 s per 32-start approach-3 fit on the IsoFLOP ladder's 18 dense runs); on 10
#: resamples of those runs 8 starts reached the 32-start objective in all 10, and on 12
#: resamples of either committed ladder's runs the additive law's 8 starts were within
#: 4e-6 of its 16 (3.4 s for the 10 fits instead of 12.9; 3.3 s / 2.0 s instead of
#: 5.4 s / 3.7 s).
REPLICATE_STARTS = 8


def _profiler(exponents: dict, irreducible: str, level: float) -> Callable:
    """profile(point, rows) for _boot_law: fits.law_profiles on the point fit."""
    return lambda point, rows: law_profiles(point, exponents=exponents,
                                            irreducible=irreducible, level=level)


def _independent_spread(n: np.ndarray, d: np.ndarray) -> float:
    """Std of the residual of log D regressed on log N: how much the token budget varies
    beyond what size explains. A fixed tokens/param rule gives ~0 even when D/N drifts
    with the embedding share (D = 20 N_nonembed against N_active), and then approach 3
    cannot separate its N and D terms."""
    ln, ld = np.log(n), np.log(d)
    if np.ptp(ln) == 0:
        return float(np.std(ld))
    X = np.column_stack([np.ones_like(ln), ln])
    return float(np.std(ld - X @ np.linalg.lstsq(X, ld, rcond=None)[0]))


def _chinchilla(train, rows, n_boot, seed, level, min_runs, progress, group=None):
    """Approach 3 over the dense runs, or (group given) over one MoE level's runs."""
    law = "L = E + A / N^alpha + B / D^beta"
    dense = ([r for r in train if r["kind"] == "dense"] if group is None else
             [r for r in train if run_group(r) == group])
    what = "dense" if group is None else f"{group}"
    if len(dense) < min_runs:
        return _not_fitted(law, len(dense), f"{len(dense)} {what} runs; approach 3 needs "
                           f">= {min_runs}")
    spread = _independent_spread(_col(dense, "params_active"), _col(dense, "tokens"))
    if spread <= 0.1:
        return _not_fitted(law, len(dense), "tokens barely vary independently of size across "
                           f"{what} runs (residual std of log D on log N = {spread:.3g}), so "
                           "the N and D terms cannot be told apart; train some sizes at "
                           "several token budgets")
    def fit(rs, n_starts=32):
        return fit_chinchilla(_col(rs, "params_active"), _col(rs, "tokens"),
                              _col(rs, "final_eval_loss"), n_starts=n_starts)

    entry = _boot_law(
        fit, dense, CHIN, n_params=5, key=lambda r: (r["params_active"], r["tokens"]),
        replicate_fit=lambda rs: fit(rs, REPLICATE_STARTS),
        at_bound=_chin_at_bound, n_boot=n_boot,
        seed=seed + 200 + (0 if group is None else 50 + sum(map(ord, group)) % 50),
        level=level, law=law,
        progress=progress, irreducible="E", log_scale=("A", "B"),
        profile=_profiler({"alpha": (3, 1.0), "beta": (4, 1.0)}, "E", level))
    if entry["status"] == "not_fitted":
        return entry
    # Derived quantities, from the point fit and each replicate (no refit).
    point = _params_of(entry, CHIN)
    reps = _replicate_params(entry, CHIN)
    c_ref = float(max(r["flops"] for r in rows))
    derived = {"a": lambda p: p["beta"] / (p["alpha"] + p["beta"]),
               "b": lambda p: p["alpha"] / (p["alpha"] + p["beta"]),
               "n_opt_at_c_ref": lambda p: chinchilla_frontier(p, c_ref)[0],
               "loss_opt_at_c_ref": lambda p: chinchilla_frontier(p, c_ref)[2]}
    samples, pt = {}, {}
    for k, f in derived.items():
        with np.errstate(all="ignore"):  # numpy floats: a degenerate replicate gives NaN
            pt[k] = float(f({n: np.float64(v) for n, v in point.items()}))
            samples[k] = [float(f({n: np.float64(v) for n, v in p.items()})) for p in reps]
    entry.update(_estimates(pt, samples, list(derived), level))
    entry["c_ref"] = c_ref
    entry["fitted"] = [{"run": r["name"], "predicted": _num(chinchilla_predict(
        point, r["params_active"], r["tokens"]))} for r in dense]
    return entry


def _isoflop(groups, level, n_boot, seed):
    """Approach 2 per level: runs grouped by their `flop_budget` when the table gives one
    (runs without it are not on an IsoFLOP profile), else clustered by FLOPs."""
    from moe.scaling.isoflop import fit_isoflop

    out = {}
    for gi, (g, gr) in enumerate(groups.items()):
        tagged = [r for r in gr if "flop_budget" in r]
        rs = tagged or gr
        nominal = sorted({r["flop_budget"] for r in tagged}) or None
        groups_c = ([[i for i, r in enumerate(rs) if r["flop_budget"] == b] for b in nominal]
                    if nominal else _clusters(_col(rs, "flops"), 0.1))
        widest = max(len({rs[i]["params_active"] for i in idx}) for idx in groups_c)
        if widest < 3:
            out[g] = {"status": "not_fitted", "n_runs": len(rs), "reason": (
                f"no FLOP budget holds >= 3 sizes (at most {widest}): not an IsoFLOP ladder")}
            continue
        try:
            res = fit_isoflop(_col(rs, "flops"), _col(rs, "params_active"),
                              _col(rs, "final_eval_loss"), _col(rs, "tokens"),
                              nominal=nominal, n_boot=n_boot, seed=seed + 300 + gi,
                              level=level)
        except _FIT_ERRORS as exc:
            out[g] = {"status": "not_fitted", "reason": str(exc), "n_runs": len(rs)}
            continue
        out[g] = {"status": "ok", "reason": "", "n_runs": len(rs),
                  "grouping": "flop_budget column" if nominal else "clustered FLOPs", **res}
    return out


def _overtraining(train, n_boot, seed, level, progress):
    law = "L = E + a N^b + beta 6^(b/2) (M N)^b"
    dense = [r for r in train if r["kind"] == "dense"]
    if len(dense) < 5:
        return _not_fitted(law, len(dense), f"{len(dense)} dense runs; the over-training law "
                           "has 4 parameters and needs >= 5")
    spread = _independent_spread(_col(dense, "params_total"), _col(dense, "tokens"))
    if spread <= 0.1 or len({r["params_total"] for r in dense}) < 2:
        return _not_fitted(law, len(dense), "needs several sizes and several tokens/param "
                           "ratios M among the dense runs (residual std of log D on log N = "
                           f"{spread:.3g})")
    from moe.scaling.overtraining import fit_overtraining

    def fit(rs):
        n = _col(rs, "params_total")
        return fit_overtraining(n, _col(rs, "tokens") / n, _col(rs, "final_eval_loss"))

    def degenerate(p):
        return _exponents_in_box(p, ("b",), -1.0)

    return _boot_law(fit, dense, OVERTRAIN, n_params=4,
                     key=lambda r: (r["params_total"], r["tokens"]), at_bound=degenerate,
                     n_boot=n_boot, seed=seed + 400, level=level, law=law, progress=progress,
                     objective_name=_CURVE_FIT_OBJECTIVE, irreducible="E",
                     log_scale=("a", "beta"))


def _downstream(train, n_boot, seed, level, progress):
    law = "Err = eps - k exp(-gamma L)"
    rs = [r for r in train if "error" in r]
    if len(rs) < 4:
        return _not_fitted(law, len(rs), f"{len(rs)} runs with an 'error' column; the "
                           "downstream law has 3 parameters and needs >= 4")
    from moe.scaling.overtraining import fit_downstream

    def degenerate(p):
        if not p["gamma"] > 1e-6:
            return f"gamma = {p['gamma']:.3g} is at its bound 0 (error does not depend on loss)"
        return "" if p["k"] > 0 else f"k = {p['k']:.3g} is not positive"

    return _boot_law(lambda rr: fit_downstream(_col(rr, "final_eval_loss"), _col(rr, "error")),
                     rs, DOWNSTREAM, n_params=3, key=lambda r: r["final_eval_loss"],
                     at_bound=degenerate, n_boot=n_boot, seed=seed + 500, level=level,
                     law=law, progress=progress, objective_name=_CURVE_FIT_OBJECTIVE)


JOINT = {"clark": ("a", "b", "c", "d"), "additive": ("E0", "A", "alpha", "B", "beta"),
         "joint": ("a", "alpha", "gamma", "delta", "b", "beta", "zeta", "omega", "c")}
JOINT_LABELS = {"clark": "Clark et al. L(N_active, E)",
                "additive": "additive L(N_active, N_total)",
                "joint": "Ludziejewski et al. L(N_active, D, E)"}
JOINT_LAWS = {"clark": "log L = a log N + b log E' + c log N log E' + d",
              "additive": "L = E0 + A / N_active^alpha + B / N_total^beta",
              "joint": "L = a E'^delta N^(alpha + gamma ln E') + b E'^omega D^(beta + zeta "
                       "ln E') + c"}


#: L-BFGS starts for the joint law's bootstrap replicates (the point fit keeps the default
#: 32). Measured on 45 noisy synthetic runs (3 expert counts x 5 sizes x 3 tokens/param), 5
#: resamples: 8 starts reach the 32-start objective to 1e-14 relative in every one, at
#: 0.32 s per fit instead of 1.02 s (200 replicates: ~1 min instead of ~3.5).
JOINT_REPLICATE_STARTS = 8


JOINT_IRREDUCIBLE = {"additive": "E0", "joint": "c"}
JOINT_LOG_SCALE = {"additive": ("A", "B"), "joint": ("a", "b")}


def _joint_fit(name: str, rows, e_start: float, e_max: float, n_starts: int = 32) -> dict:
    experts = np.array([1.0 if r["kind"] == "dense" else float(r["n_experts"]) for r in rows])
    loss = _col(rows, "final_eval_loss")
    if name == "clark":
        return fit_clark(_col(rows, "params_active"), experts, loss, e_start=e_start,
                         e_max=e_max)
    if name == "additive":
        return fit_additive_moe(_col(rows, "params_active"), _col(rows, "params_total"), loss,
                                n_starts=min(n_starts, 16))
    from moe.scaling.joint_moe import fit_joint_moe

    return fit_joint_moe(_col(rows, "params_active"), _col(rows, "tokens"), experts, loss,
                         e_start=e_start, e_max=e_max, n_starts=n_starts)


def _joint_at_bound(name):
    if name == "additive":  # fit_additive_moe's box: exponents in [0, 5]
        return lambda p: _exponents_in_box(p, ("alpha", "beta"))
    if name == "joint":  # unbounded optimiser: a law that stops decreasing is degenerate
        return lambda p: _exponents_in_box(p, ("alpha", "beta"), -1.0, math.inf)
    return lambda p: ""  # Clark: ordinary least squares, no box


def _joint_laws(train, held, n_boot, seed, level, progress, e_start=2.0, e_max=256.0):
    """Clark, additive and Ludziejewski et al.'s joint law, each bootstrapped over whole
    runs like the others; one is chosen by cross-validation over sizes on the fitted runs
    (compare_joint_laws), and the held-out runs only score the laws afterwards."""
    if not any(r["kind"] == "moe" for r in train):
        reason = "no MoE runs in the table"
        return {k: _not_fitted(JOINT_LAWS[k], len(train), reason) for k in JOINT} | {
            "better": None, "reason": reason, "selected_by": "", "cv_folds_used": []}
    res = compare_joint_laws(train, held, e_start=e_start, e_max=e_max)
    out = {}
    for i, (name, names) in enumerate(JOINT.items()):
        j = res[name]
        if j["params"] is None:
            out[name] = _not_fitted(JOINT_LAWS[name], len(train), j["error"])
            continue
        entry = _boot_law(lambda rs, n=name: _joint_fit(n, rs, e_start, e_max), train,
                          names, n_params=len(names),
                          key=lambda r: (r["params_active"], r["params_total"], r["tokens"],
                                         r["n_experts"]),
                          at_bound=_joint_at_bound(name), n_boot=n_boot,
                          irreducible=JOINT_IRREDUCIBLE.get(name),
                          log_scale=JOINT_LOG_SCALE.get(name, ()),
                          profile=(_profiler({"alpha": (3, 1.0), "beta": (4, 1.0)}, "E0", level)
                                   if name == "additive" else None),
                          seed=seed + 600 + i, level=level, law=JOINT_LAWS[name],
                          progress=progress,
                          replicate_fit=lambda rs, n=name: _joint_fit(
                              n, rs, e_start, e_max, JOINT_REPLICATE_STARTS),
                          objective_name=("RMSE of log loss (ordinary least squares)"
                                          if name == "clark" else ""))
        out[name] = entry
        if entry["status"] == "not_fitted":
            continue
        entry["fixed"] = ({"e_start": e_start, "e_max": e_max} if name != "additive" else {})
        entry["train_rmse_log"] = _num(j["train_rmse_log"])
        entry["heldout_rmse_log"] = _num(j["heldout_rmse_log"])
        entry["cv_rmse_log"] = _num(j["cv_rmse_log"])
        entry["cv_folds"] = [{**f, "rmse_log": _num(f["rmse_log"])} for f in j["cv_folds"]]
    out["better"], out["reason"] = res["better"], res["reason"]
    out["selected_by"], out["cv_folds_used"] = res["selected_by"], res["cv_folds_used"]
    return out


def _inverse_n(p: dict, loss: float) -> float:
    """x at which the power law E + A / x^alpha reaches `loss`, in logs (A can be ~1e60 in
    FLOP units); +inf when loss <= E (the curve never gets there), NaN for alpha <= 0."""
    if loss <= p["E"]:
        return math.inf
    if not p["alpha"] > 0 or not p["A"] > 0:
        return math.nan
    return math.exp((math.log(p["A"]) - math.log(loss - p["E"])) / p["alpha"])


def _chin_inverse_n(p: dict, loss: float, tokens: float) -> float:
    """N at which the Chinchilla L(N, D) reaches `loss` at D = tokens; +inf when the D term
    and E alone already reach or pass it."""
    gap = loss - p["E"] - p["B"] / float(tokens) ** p["beta"]
    if gap <= 0:
        return math.inf
    if not p["alpha"] > 0 or not p["A"] > 0:
        return math.nan
    return math.exp((math.log(p["A"]) - math.log(gap)) / p["alpha"])


def _el_interval(samples: Sequence[float], level: float) -> tuple:
    """Percentile interval of EL replicates (+inf: that replicate's dense curve never
    reaches the loss; NaN replicates dropped) -> (lo, hi, n_used, n_inf); an edge that falls
    among the +inf replicates is None (unbounded)."""
    s = np.array([v for v in samples if not math.isnan(v)], float)
    if not s.size:
        return None, None, 0, 0
    n_inf = int(np.isinf(s).sum())
    q = 100.0 * (1.0 - level) / 2.0
    big = np.finfo(float).max / 8  # +inf stands in as a huge finite value, then back to None
    lo, hi = np.percentile(np.where(np.isinf(s), big, s), [q, 100.0 - q])
    return (None if lo > 1e300 else float(lo)), (None if hi > 1e300 else float(hi)), \
        int(s.size), n_inf


#: Dense-curve statuses efficiency leverage may read (an ok one preferred). EL inverts the
#: dense curve at a MoE run's loss, mostly inside the dense runs' range, where a curve
#: whose irreducible term is not determined (degenerate, unidentified) still fits the
#: runs; its bootstrap replicates carry that uncertainty into EL's interval, and `basis`
#: names the status. An unbounded curve (no residual dof, or replicates failed or on the
#: box) or one that did not converge is not a curve to read.
EL_CURVE_STATUSES = ("ok", "degenerate", "unidentified")


def _basis(name: str, entry: dict) -> str:
    return name + ("" if entry["status"] == "ok" else f" ({entry['status']})")


def _efficiency_leverage(rows, power, compute, chinchilla=None, level=0.95):
    """EL per MoE run against the dense runs: the active size a dense model needs to reach
    the run's loss / the run's active size (and the same in FLOPs). The dense curve is the
    dense L(N) (and L(C)) fit when its status is in EL_CURVE_STATUSES; else, where the
    dense runs vary tokens (an IsoFLOP ladder; also when L(N) is not fitted at all), the
    Chinchilla L(N, D) fit at the run's own tokens
    (EL(compute) then not given); else no number, and `reason` says why. `basis` names
    the curve used.

    Intervals: EL is recomputed from every stored bootstrap replicate of the basis law
    (no refit) and the `level` percentile interval kept as el_params_lo/hi and
    el_compute_lo/hi. They cover the uncertainty of the dense curve only: the MoE run's
    loss is taken as measured (its own seed noise is not in them). A replicate whose dense
    curve never reaches the run's loss counts as an infinite EL; when the upper edge falls
    among those, it is None (unbounded above) and `interval_note` says how many."""
    moe = [r for r in rows if r["kind"] == "moe"]
    dense_p = power.get("dense")
    def status(e):
        return e.get("status") if isinstance(e, dict) else None

    # an ok curve first (L(N), then approach 3), then one whose irreducible term is not
    # determined (same order); an unbounded or unconverged curve gives no number
    power_ok = status(dense_p) == "ok" or (status(dense_p) in EL_CURVE_STATUSES
                                            and status(chinchilla) != "ok")
    chin = chin_reps = None
    if not power_ok and status(chinchilla) in EL_CURVE_STATUSES:
        # an IsoFLOP ladder: L(N) along one recipe may not even be fitted (too few sizes
        # share a tokens/param ratio), while approach 3 over every dense run is
        chin = _params_of(chinchilla, CHIN)
        chin_reps = _replicate_params(chinchilla, CHIN)
    if not moe or ((dense_p is None or dense_p["status"] == "not_fitted") and chin is None):
        return []
    pp = _params_of(dense_p, POWER) if power_ok else None
    pp_reps = _replicate_params(dense_p, POWER) if power_ok else []
    cp = compute.get("dense")

    def as_power(c):
        return {"E": c["c"], "A": c["a"], "alpha": -c["b"]}

    cpp = cpp_reps = None
    if cp is not None and cp["status"] in EL_CURVE_STATUSES:
        cpp = as_power(_params_of(cp, COMPUTE))
        cpp_reps = [as_power(c) for c in _replicate_params(cp, COMPUTE)]
    out = []
    for r in moe:
        L = float(r["final_eval_loss"])
        row = {"run": r["name"], "level": run_group(r), "el_params": None,
               "el_params_lo": None, "el_params_hi": None, "el_compute": None,
               "el_compute_lo": None, "el_compute_hi": None, "basis": None, "reason": "",
               "interval_note": ""}
        notes = []

        def put(key, reps_el):
            lo, hi, n, n_inf = _el_interval(reps_el, level)
            row[f"{key}_lo"], row[f"{key}_hi"] = lo, hi
            if not n:
                notes.append(f"{key}: no usable replicates, no interval")
            elif n_inf:
                notes.append(f"{key}: {n_inf} of {n} replicates' dense curve never reaches "
                             "this loss" + (" (upper edge unbounded)" if hi is None else ""))

        if power_ok:
            row["basis"] = _basis("dense L(N)", dense_p) + (
                ", " + _basis("dense L(C)", cp) if cpp is not None else "")
            if L <= pp["E"]:
                row["reason"] = (f"loss {L:.4g} is at or below the dense fit's irreducible "
                                 f"E = {pp['E']:.4g}: no dense model reaches it")
            else:
                row["el_params"] = _num(_inverse_n(pp, L) / r["params_active"])
                put("el_params", [_inverse_n(p, L) / r["params_active"] for p in pp_reps])
                if cpp is not None and L > cpp["E"]:
                    row["el_compute"] = _num(_inverse_n(cpp, L) / r["flops"])
                    put("el_compute", [_inverse_n(p, L) / r["flops"] for p in cpp_reps])
        elif chin is not None:
            row["basis"] = _basis("dense Chinchilla L(N, D) at the run's tokens", chinchilla)
            n = _chin_inverse_n(chin, L, r["tokens"])
            if math.isinf(n):
                row["reason"] = (f"loss {L:.4g} is at or below what the dense L(N, D) reaches "
                                 f"at any size with {r['tokens']:.3g} tokens")
            else:
                row["el_params"] = _num(n / r["params_active"])
                put("el_params", [_chin_inverse_n(p, L, r["tokens"]) / r["params_active"]
                                  for p in chin_reps])
        else:
            row["reason"] = (f"dense L(N) fit is {dense_p['status']} "
                             f"({dense_p.get('reason', '')}) and no Chinchilla fit to fall "
                             "back on: no dense curve to compare with")
        row["interval_note"] = "; ".join(notes)
        out.append(row)
    return out


def _holdout(held, laws: list[tuple[str, str, str, dict, Sequence[str]]], level):
    """Held-out predictions from every fitted law that covers the run, with intervals."""
    q = 100.0 * (1.0 - level) / 2.0
    out = []
    for r in held:
        run = _run_record(r)
        for label, kind, scope, entry, names in laws:
            if entry is None or entry.get("status") == "not_fitted":
                continue
            if scope not in ("all", run_group(r)) and not (scope == "dense" and
                                                             r["kind"] == "dense"):
                continue
            if "recipe" in entry and not on_recipe(r, entry["recipe"]):
                continue  # a 1-D law predicts runs of its own recipe only
            quantity = "error" if kind == "downstream" else "loss"
            actual = r.get("error") if quantity == "error" else r["final_eval_loss"]
            if actual is None:
                continue
            fixed = entry.get("fixed", {})
            pred = law_predict(kind, {**_params_of(entry, names), **fixed}, run)
            with np.errstate(all="ignore"):
                reps = [law_predict(kind, {**p, **fixed}, run)
                        for p in _replicate_params(entry, names)]
            reps = np.array([v for v in reps if math.isfinite(v)])
            lo, hi = (np.percentile(reps, [q, 100 - q]) if reps.size else (math.nan, math.nan))
            out.append({"run": r["name"], "quantity": quantity, "law": label,
                        "predicted": _num(pred), "lo": _num(lo), "hi": _num(hi),
                        "actual": _num(actual), "rel_error": _num(pred / actual - 1.0),
                        "bounded": bool(entry.get("bounded", False))})
        out += _chained(r, run, laws, q)
    return out


def _chained(r, run, laws, q) -> list[dict]:
    """Gadre et al.'s chain: error predicted from the over-training law's PREDICTED loss.

    The interval pairs replicate i of the loss law with replicate i of the error law (two
    independent bootstraps, so each pair is a draw from their joint distribution).
    """
    ent = {kind: (e, names) for _, kind, _, e, names in laws
           if kind in ("overtraining", "downstream")}
    if (r.get("error") is None or r["kind"] != "dense" or len(ent) < 2
            or any(e is None or e.get("status") == "not_fitted" for e, _ in ent.values())):
        return []
    (ot, ot_names), (ds, ds_names) = ent["overtraining"], ent["downstream"]

    def chain(p_ot, p_ds):
        return law_predict("downstream", p_ds, {**run, "loss": law_predict("overtraining",
                                                                           p_ot, run)})

    pred = chain(_params_of(ot, ot_names), _params_of(ds, ds_names))
    with np.errstate(all="ignore"):
        reps = np.array([chain(a, b) for a, b in zip(_replicate_params(ot, ot_names),
                                                     _replicate_params(ds, ds_names))])
    reps = reps[np.isfinite(reps)]
    lo, hi = np.percentile(reps, [q, 100 - q]) if reps.size else (math.nan, math.nan)
    return [{"run": r["name"], "quantity": "error",
             "law": "downstream Err(L(N, M)), chained from the predicted loss",
             "predicted": _num(pred), "lo": _num(lo), "hi": _num(hi), "actual": r["error"],
             "rel_error": _num(pred / r["error"] - 1.0),
             "bounded": bool(ot.get("bounded") and ds.get("bounded"))}]


def _seed_noise(rows, seed_rows):
    """Spread of the final loss over seed repeats (group "seed" rows, `repeat_of`)."""
    if not seed_rows:
        return None
    by_name = {r["name"]: r for r in rows}
    groups: dict[str, list] = {}
    for s in seed_rows:
        base = str(s.get("repeat_of") or "").strip()
        if base in by_name:
            groups.setdefault(base, [by_name[base]["final_eval_loss"]])
        groups.setdefault(base or s["name"], []).append(float(s["final_eval_loss"]))
    runs, ss, dof, means = [], 0.0, 0, []
    for name, losses in groups.items():
        if len(losses) < 2:
            continue
        arr = np.array(losses)
        ss += float(((arr - arr.mean()) ** 2).sum())
        dof += len(arr) - 1
        means.append(arr.mean())
        runs.append({"run": name, "n": len(arr), "losses": [float(v) for v in arr],
                     "mean": float(arr.mean()), "std": float(arr.std(ddof=1))})
    if not dof:
        return None
    std = math.sqrt(ss / dof)
    return {"runs": runs, "std": std, "rel_std": std / float(np.mean(means))}


def _seed_key(r):
    """The row's `seed` as an int (or its text), None when the row has none."""
    v = r.get("seed")
    if v is None or (isinstance(v, float) and math.isnan(v)) or not str(v).strip():
        return None
    try:
        f = float(v)
        return int(f) if f == int(f) else f
    except (TypeError, ValueError):
        return str(v).strip()


def _paired(a_runs: dict, b_runs: dict, level: float) -> dict | None:
    """Paired t-test of loss(b) - loss(a) over the seeds both levels ran ({seed: loss})."""
    from scipy import stats

    seeds = sorted(set(a_runs) & set(b_runs), key=str)
    if len(seeds) < 2:
        return None
    d = np.array([b_runs[k] - a_runs[k] for k in seeds])
    n = len(d)
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * se
    t = mean / se if se > 0 else None
    p = float(2.0 * stats.t.sf(abs(t), n - 1)) if t is not None else None
    return {"n": n, "seeds": seeds, "diffs": [float(v) for v in d], "mean": mean, "se": se,
            "lo": mean - half, "hi": mean + half, "level": level, "df": n - 1, "t": t, "p": p}


def _sparsity_comparison(rows, seed_rows=(), level=0.95) -> list[dict]:
    """Per active size (the table's `size` label, with its `flop_budget` when given, else
    runs within 5% in params_active and tokens), the loss of every sparsity level and the
    gap of each MoE level to the next denser one (from the grid runs, one per level).

    Where seed repeats exist (group "seed" rows whose `repeat_of` is a grid run here), the
    gap is also tested by PAIRED differences: each level's runs are keyed by their `seed`
    column (the grid run's seed included; rows without one are not paired), the two
    levels' runs at the same seed are paired, and `paired` holds n, the seeds, the
    differences, their mean, standard error, the `level` t interval (lo, hi), t, df and
    the two-sided p of a paired t-test (scipy.stats.t; null t and p when every difference
    is equal). With fewer than two common seeds `paired` is null and `test` says "one run
    per level: no paired test": the gap of two single runs is not judged against a pooled
    seed std (that difference carries the noise of both runs)."""
    by_base: dict[str, dict] = {}
    for s in seed_rows or ():
        k = _seed_key(s)
        if k is not None and str(s.get("repeat_of") or "").strip():
            by_base.setdefault(str(s["repeat_of"]).strip(), {})[k] = float(s["final_eval_loss"])

    def seeds_of(r):
        out = dict(by_base.get(r["name"], {}))
        k = _seed_key(r)
        if k is not None:
            out.setdefault(k, float(r["final_eval_loss"]))
        return out

    groups: dict = {}
    for r in rows:
        if str(r.get("size") or "").strip():
            # an IsoFLOP ladder trains each size at several budgets: compare within one
            key = ("label", str(r["size"]).strip()
                   + (f" @ {r['flop_budget']:.3g} FLOPs" if r.get("flop_budget") else ""))
        else:
            key = next((k for k in groups if k[0] == "near" and abs(math.log(
                r["params_active"] / k[1])) < 0.05 and abs(math.log(r["tokens"] / k[2])) < 0.05),
                ("near", r["params_active"], r["tokens"]))
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in sorted(groups.items(), key=lambda kv: min(r["params_active"] for r in kv[1])):
        if len({run_group(r) for r in rs}) < 2:
            continue
        rs = sorted(rs, key=lambda r: (r["sparsity"], run_group(r)))
        gaps = []
        for a, b in zip(rs, rs[1:]):
            gap = b["final_eval_loss"] - a["final_eval_loss"]
            pr = _paired(seeds_of(a), seeds_of(b), level)
            if pr is None:
                test = "one run per level: no paired test"
            elif pr["p"] is None:
                test = f"paired over {pr['n']} seeds: every difference equal, no t-test"
            else:
                test = f"paired t-test over {pr['n']} seeds: p = {pr['p']:.2g}"
            gaps.append({"from": a["name"], "to": b["name"], "gap": gap, "paired": pr,
                         "test": test})
        out.append({"size": key[1] if key[0] == "label" else rs[0]["name"],
                    "params_active": min(r["params_active"] for r in rs),
                    "losses": {run_group(r): r["final_eval_loss"] for r in rs},
                    "runs": [r["name"] for r in rs], "gaps": gaps})
    return out


def _compare(compare_rows):
    if not compare_rows:
        return None
    return [{"run": r["name"], "loss": _num(r["final_eval_loss"]),
             "maxvio": _num(r.get("maxvio")), "tokens_per_s": _num(_maybe(r, "tokens_per_s")),
             "flops": _num(r["flops"])} for r in compare_rows]


def _maybe(r, k):
    try:
        return float(r.get(k))
    except (TypeError, ValueError):
        return None


def _run_record(r) -> dict:
    return {"name": r["name"], "level": run_group(r), "kind": r["kind"],
            "n_experts": int(r["n_experts"]), "top_k": int(r["top_k"]),
            "sparsity": _num(r["sparsity"]), "params_active": r["params_active"],
            "params_total": r["params_total"],
            "params_active_nonembed": _num(r.get("params_active_nonembed")),
            "params_total_nonembed": _num(r.get("params_total_nonembed")),
            "tokens": r["tokens"], "flops": r["flops"], "loss": r["final_eval_loss"],
            "error": _num(r.get("error")), "maxvio": _num(r.get("maxvio")),
            "held_out": bool(r.get("held_out")),
            **({"epochs": _num(r["epochs"])} if "epochs" in r else {})}


def epoch_notes(rows: Sequence[dict]) -> list[str]:
    """A note naming the runs that passed over their data more than once (column epochs)."""
    over = sorted((r for r in rows if r.get("epochs", 0) > 1.0), key=lambda r: -r["epochs"])
    if not over:
        return []
    names = ", ".join(f"{r['name']} ({r['epochs']:.3g})" for r in over[:12])
    more = f" and {len(over) - 12} more" if len(over) > 12 else ""
    return [f"WARNING: {len(over)} fitted run(s) trained more than 1 epoch of their data "
            f"(repeated tokens change the loss curve; the fit mixes in repetition): "
            f"{names}{more}"]


# --------------------------------------------------------------------------- entry


def analyse(rows: Sequence[dict], *, n_boot: int = 200, holdout: str | None = None,
            seed: int = 0, level: float = 0.95, source: str = "rows",
            notes: Sequence[str] = (), side: dict | None = None,
            chinchilla_min_runs: int = 8, progress: bool | None = None) -> dict:
    """Fit every law the table supports; return the analysis dict (schema_version 1).

    rows: run dicts (from `load_results`, or e.g. `chinchilla_rows()`); validated again.
    holdout: "largest" | "flag" | "none" | None (see `split_holdout`): held-out runs enter
    no fit and are predicted by every law that covers them. n_boot: whole-run bootstrap
    replicates per law (each re-runs the full multi-start fit). side: {"compare": rows,
    "seed": rows} as `validate_rows` collects them. A law the data cannot identify is
    recorded as not fitted with the reason; the analysis never fails because one law has
    too few runs.
    """
    rows = validate_rows(rows, source=source)
    side = side or {}
    if holdout is None:
        holdout = "flag" if any(r.get("held_out") for r in rows) else "largest"
    train, held = split_holdout(rows, holdout)
    for r in rows:  # validate_rows returned copies: mark the split the fits used
        r["held_out"] = any(r is h for h in held)
    if len(train) < 3:
        raise ResultsError(f"{source}: only {len(train)} run(s) left to fit after holding out "
                           f"{len(held)}; a fit needs at least 3")
    groups, held_groups = _groups(train), _groups(held)
    has_nonembed = all("params_active_nonembed" in r for r in rows)
    a: dict = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "settings": {"n_boot": int(n_boot), "level": float(level), "seed": int(seed),
                     "holdout": holdout, "huber_delta": HUBER_DELTA},
        "counting": {
            "params": "params_active = parameters used per token, embeddings included "
                      "(Chinchilla convention); params_active_nonembed excludes embeddings "
                      "(Kaplan convention)" + ("" if has_nonembed else
                                              "; this table has no non-embedding counts"),
            "conventions": ["params_active"] + (["params_active_nonembed"] if has_nonembed
                                                else []),
            "flops": "training FLOPs as the table gives them (6 N_active D when absent)"},
        "notes": list(notes) + epoch_notes(rows),
        "runs": [_run_record(r) for r in rows],
    }
    a["power_laws"], a["compute_laws"] = _one_d_laws(groups, held_groups, n_boot, seed,
                                                     level, progress)
    a["chinchilla"] = _chinchilla(train, rows, n_boot, seed, level, chinchilla_min_runs,
                                  progress)
    a["chinchilla_levels"] = {
        g: _chinchilla(train, rows, n_boot, seed, level, chinchilla_min_runs, progress, g)
        for g, gr in groups.items() if any(r["kind"] == "moe" for r in gr)}
    a["isoflop"] = _isoflop(groups, level, n_boot, seed)
    a["overtraining"] = _overtraining(train, n_boot, seed, level, progress)
    a["downstream"] = _downstream(train, n_boot, seed, level, progress)
    a["joint_laws"] = _joint_laws(train, held, n_boot, seed, level, progress)
    a["efficiency_leverage"] = _efficiency_leverage(rows, a["power_laws"], a["compute_laws"],
                                                    a["chinchilla"], level)
    laws = [(f"L(N_active), {g}", "power", g, e, POWER) for g, e in a["power_laws"].items()]
    laws += [(f"L(C), {g}", "compute", g, e, COMPUTE) for g, e in a["compute_laws"].items()]
    laws += [("Chinchilla L(N, D)", "chinchilla", "dense", a["chinchilla"], CHIN),
             ("over-training L(N, M)", "overtraining", "dense", a["overtraining"], OVERTRAIN),
             ("downstream Err(L), from the actual loss", "downstream", "all",
              a["downstream"], DOWNSTREAM)]
    laws += [(JOINT_LABELS[name], name, "all", a["joint_laws"][name], names)
             for name, names in JOINT.items()]
    a["holdout"] = _holdout(held, laws, level)
    a["seed_noise"] = _seed_noise(rows, side.get("seed"))
    a["sparsity_comparison"] = _sparsity_comparison(rows, side.get("seed"), level)
    a["compare"] = _compare(side.get("compare"))
    return a


# ---------------------------------------------------------------------------- files


def _jsonable(o):
    """numpy scalars -> float, NaN/inf -> None (strict JSON), containers recursively."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if o is None or isinstance(o, str):
        return o
    return str(o)


def write_fits(analysis: dict, path) -> Path:
    """Write the analysis as strict JSON (atomic replace); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(analysis), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_fits(path) -> dict:
    """Load a fits.json (a file, or a directory holding one); checks schema_version."""
    path = Path(path)
    if path.is_dir():
        path = path / "fits.json"
    try:
        a = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not JSON ({exc.msg})") from None
    if not isinstance(a, dict) or a.get("schema_version") not in READABLE_VERSIONS:
        got = a.get("schema_version") if isinstance(a, dict) else None
        raise ResultsError(f"{path}: schema_version {got!r}; this version reads "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")
    if a["schema_version"] == 1:
        recheck_version_1(a)
    return a


#: (section, law key or None for per-level sections, irreducible parameter, log-scale
#: parameters): the LAW entries a version-1 file holds and what version 2 checks in them
_V1_LAWS = (("power_laws", None, "E", ("A",)), ("compute_laws", None, "c", ("a",)),
            ("chinchilla", "", "E", ("A", "B")), ("chinchilla_levels", None, "E", ("A", "B")),
            ("overtraining", "", "E", ("a", "beta")), ("joint_laws", "additive", "E0", ("A", "B")),
            ("joint_laws", "joint", "c", ("a", "b")))


def recheck_version_1(a: dict) -> dict:
    """Give a version-1 fits.json's ok/unbounded laws the version-2 checks that need no
    refit: a collapsed irreducible term (from the stored point value) makes the law
    degenerate, replicates in two modes (from the stored replicates) unidentified. The
    smallest loss is taken over the fitted runs of the law's level (all fitted runs for
    the joint laws), which is at most the smallest loss the law saw: a conservative
    floor. Adds a note; returns `a` (changed in place)."""
    fitted = [r for r in a.get("runs", []) if not r.get("held_out")]
    changed = []
    for section, key, irr, logs in _V1_LAWS:
        sec = a.get(section)
        if not isinstance(sec, dict):
            continue
        entries = ({section: sec} if key == "" else {f"{section}.{key}": sec.get(key)}
                   if key else {f"{section}.{g}": e for g, e in sec.items()})
        for name, e in entries.items():
            if not isinstance(e, dict) or e.get("status") not in ("ok", "unbounded"):
                continue
            level = name.split(".", 1)[1] if key is None else None
            losses = [r["loss"] for r in fitted if level is None or r.get("level") == level]
            point = (e.get(irr) or {}).get("value")
            why = []
            if losses and point is not None and point < COLLAPSE_FRAC * min(losses):
                why.append(f"{irr} = {point:.2g} has collapsed to 0 (below {COLLAPSE_FRAC:g} "
                           "of the smallest fitted loss)")
            reps = e.get("replicates") or {}
            modes = _modes_of(reps, list(reps), irr, logs, min(losses)) if losses else {}
            if why or modes:
                e["status"] = "degenerate" if why else "unidentified"
                e["bounded"] = False
                e["reason"] = "; ".join(why + [_split_reason(k, m) for k, m in modes.items()]
                                        + [e.get("reason") or ""]).strip("; ")
                if modes:
                    e["modes"] = modes
                changed.append(name)
    if changed:
        a.setdefault("notes", []).append(
            "read from a schema_version 1 file: rechecked without refitting; now "
            "degenerate or unidentified: " + ", ".join(changed))
    return a
