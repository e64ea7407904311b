"""fits.json: the analysis written as data, its schema, and reading it back.

`analyse(rows)` (analyse.py) runs every law the table supports and returns one dict;
`write_fits` saves it as `fits.json` and `read_fits` loads it back (checking the schema version).
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
    compare         [{run, variant, seed, loss, maxvio, tokens_per_s, flops}] or null (the
                    ladder's fixed-size comparison runs; variant: the run's repeat_of, or
                    its name)
    compare_variants  [{variant, runs, loss {n, mean, se}, maxvio {n, mean, se}, vs,
                    paired_loss, paired_maxvio}] or null (no variant with two runs): each
                    variant over its seeds; every variant after the first is paired with
                    the first (`vs`) by seed, in loss and in MaxVio (`paired` as in
                    sparsity_comparison: value of this variant - value of `vs`)

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
from pathlib import Path

import numpy as np

from moe.runs import atomic_write
from moe.scaling.analysis.entries import COLLAPSE_FRAC, modes_of, split_reason
from moe.scaling.table import ResultsError

SCHEMA_VERSION = 2
#: fits.json versions read_fits accepts: 1 lacks the keys version 2 added (module docstring)
READABLE_VERSIONS = (1, 2)


def jsonable(o):
    """numpy scalars -> float, NaN/inf -> None (strict JSON), containers recursively."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if o is None or isinstance(o, str):
        return o
    return str(o)


def write_fits(analysis: dict, path) -> Path:
    """Write the analysis as strict JSON (atomic replace); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(jsonable(analysis), indent=1, allow_nan=False) + "\n")
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
            modes = modes_of(reps, list(reps), irr, logs, min(losses)) if losses else {}
            if why or modes:
                e["status"] = "degenerate" if why else "unidentified"
                e["bounded"] = False
                e["reason"] = "; ".join(why + [split_reason(k, m) for k, m in modes.items()]
                                        + [e.get("reason") or ""]).strip("; ")
                if modes:
                    e["modes"] = modes
                changed.append(name)
    if changed:
        a.setdefault("notes", []).append(
            "read from a schema_version 1 file: rechecked without refitting; now "
            "degenerate or unidentified: " + ", ".join(changed))
    return a
