"""The law sections of fits.json: per-level 1-D laws, Chinchilla approaches 3 and 2,
over-training and downstream (Gadre et al.), and the joint MoE laws.
"""
from __future__ import annotations

import math

import numpy as np

from moe.scaling.analysis.entries import (band, boot_law, estimates, not_fitted, params_of,
                                          profiler, replicate_params, COLLAPSE_FRAC)
from moe.scaling.analysis.kinds import (CHIN, COMPUTE, CURVE_FIT_OBJECTIVE, DOWNSTREAM,
                                        FIT_ERRORS, JOINT, JOINT_LAWS, OVERTRAIN, POWER,
                                        chin_at_bound, cl_at_bound, cl_predict, column,
                                        exponents_in_box, num, pl_at_bound, pl_predict)
from moe.scaling.analysis.selection import clusters, independent_spread, one_recipe_subset
from moe.scaling.laws.chinchilla import chinchilla_frontier, chinchilla_predict, fit_chinchilla
from moe.scaling.laws.compare import compare_joint_laws
from moe.scaling.laws.isoflop import fit_isoflop
from moe.scaling.laws.joint_moe import fit_joint_moe
from moe.scaling.laws.moe_laws import fit_additive_moe, fit_clark
from moe.scaling.laws.overtraining import fit_downstream, fit_overtraining
from moe.scaling.laws.power import fit_compute_law, fit_power_law
from moe.scaling.table import run_group


def one_d_laws(groups, held_groups, n_boot, seed, level, progress):
    """Per sparsity level: L(N_active) and L(C) on one recipe, bootstrapped, with bands."""
    power, compute = {}, {}
    for gi, (g, gr) in enumerate(groups.items()):
        sub, selection, recipe = one_recipe_subset(gr, held_groups.get(g, []))
        distinct = len({r["params_active"] for r in sub})
        xs_all = gr + held_groups.get(g, [])
        for key, out, law, names, fit, predict, xkey, seed_off, at_bound, irr, amp in (
                ("power", power, "L = E + A / N_active^alpha", POWER, fit_power_law,
                 pl_predict, "params_active", 0, pl_at_bound, "E", "A"),
                ("compute", compute, "L = a C^b + c", COMPUTE, fit_compute_law, cl_predict,
                 "flops", 100, cl_at_bound, "c", "a")):
            # the exponent is theta[2] of fit_power_law (a compute law's b is -alpha)
            expo = {"alpha": (2, 1.0)} if key == "power" else {"b": (2, -1.0)}
            if distinct < 3:
                out[g] = not_fitted(law, len(gr), f"{distinct} distinct size(s) along one "
                                    "recipe; a 3-parameter law needs >= 3 (" + selection + ")")
                out[g]["selection"] = selection
                continue
            entry = boot_law(
                lambda rs, f=fit, k=xkey: f(column(rs, k), column(rs, "final_eval_loss")),
                sub, names, n_params=3, key=lambda r, k=xkey: r[k], at_bound=at_bound,
                n_boot=n_boot, seed=seed + seed_off + gi, level=level, law=law,
                progress=progress, irreducible=irr, log_scale=(amp,),
                profile=profiler(expo, irr, level))
            out[g] = entry
            entry["selection"] = selection
            if entry["status"] == "not_fitted":
                continue
            entry["x"] = xkey
            entry["recipe"] = recipe
            x = column(xs_all, xkey)
            grid = np.logspace(np.log10(x.min() / 1.5), np.log10(x.max() * 1.5), 40)
            entry["band"] = band(entry, names, predict, grid, level)
            if key == "power":
                entry["conventions"] = conventions(sub)
    return power, compute


def conventions(rows):
    """Point fits of L(N) with embeddings counted (Chinchilla) and not (Kaplan); status
    degenerate (with the reason) when E collapsed, a parameter is on its bound or the fit
    did not converge (no bootstrap here, so no modes check)."""
    out = {}
    for key in ("params_active", "params_active_nonembed"):
        if not all(key in r for r in rows):
            out[key] = {"status": "not_fitted", "reason": f"the table has no {key} column"}
            continue
        try:
            f = fit_power_law(column(rows, key), column(rows, "final_eval_loss"))
        except FIT_ERRORS as exc:
            out[key] = {"status": "not_fitted", "reason": str(exc)}
            continue
        floor = COLLAPSE_FRAC * float(np.min(column(rows, "final_eval_loss")))
        why = (f"E = {f['E']:.2g} collapsed to 0" if f["E"] < floor else
               pl_at_bound(f) or ("" if f["converged"] else "not converged"))
        out[key] = {"status": "degenerate" if why else "ok", "reason": why,
                    "E": num(f["E"]), "alpha": num(f["alpha"]),
                    "objective": num(f["objective_sum"]), "converged": bool(f["converged"])}
    return out


#: L-BFGS starts for approach 3's and the additive law's bootstrap replicates (point fits
#: keep 32 and 16). With the tight tolerances every start costs ~9x scipy's defaults'
#: (1.3 s per 32-start approach-3 fit on the IsoFLOP ladder's 18 dense runs); on 10
#: resamples of those runs 8 starts reached the 32-start objective in all 10, and on 12
#: resamples of either committed ladder's runs the additive law's 8 starts were within
#: 4e-6 of its 16 (3.4 s for the 10 fits instead of 12.9; 3.3 s / 2.0 s instead of
#: 5.4 s / 3.7 s).
REPLICATE_STARTS = 8


def chinchilla_section(train, rows, n_boot, seed, level, min_runs, progress, group=None):
    """Approach 3 over the dense runs, or (group given) over one MoE level's runs."""
    law = "L = E + A / N^alpha + B / D^beta"
    dense = ([r for r in train if r["kind"] == "dense"] if group is None else
             [r for r in train if run_group(r) == group])
    what = "dense" if group is None else f"{group}"
    if len(dense) < min_runs:
        return not_fitted(law, len(dense), f"{len(dense)} {what} runs; approach 3 needs "
                          f">= {min_runs}")
    spread = independent_spread(column(dense, "params_active"), column(dense, "tokens"))
    if spread <= 0.1:
        return not_fitted(law, len(dense), "tokens barely vary independently of size across "
                          f"{what} runs (residual std of log D on log N = {spread:.3g}), so "
                          "the N and D terms cannot be told apart; train some sizes at "
                          "several token budgets")
    def fit(rs, n_starts=32):
        return fit_chinchilla(column(rs, "params_active"), column(rs, "tokens"),
                              column(rs, "final_eval_loss"), n_starts=n_starts)

    entry = boot_law(
        fit, dense, CHIN, n_params=5, key=lambda r: (r["params_active"], r["tokens"]),
        replicate_fit=lambda rs: fit(rs, REPLICATE_STARTS),
        at_bound=chin_at_bound, n_boot=n_boot,
        seed=seed + 200 + (0 if group is None else 50 + sum(map(ord, group)) % 50),
        level=level, law=law,
        progress=progress, irreducible="E", log_scale=("A", "B"),
        profile=profiler({"alpha": (3, 1.0), "beta": (4, 1.0)}, "E", level))
    if entry["status"] == "not_fitted":
        return entry
    # Derived quantities, from the point fit and each replicate (no refit).
    point = params_of(entry, CHIN)
    reps = replicate_params(entry, CHIN)
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
    entry.update(estimates(pt, samples, list(derived), level))
    entry["c_ref"] = c_ref
    entry["fitted"] = [{"run": r["name"], "predicted": num(chinchilla_predict(
        point, r["params_active"], r["tokens"]))} for r in dense]
    return entry


def isoflop_section(groups, level, n_boot, seed):
    """Approach 2 per level: runs grouped by their `flop_budget` when the table gives one
    (runs without it are not on an IsoFLOP profile), else clustered by FLOPs."""
    out = {}
    for gi, (g, gr) in enumerate(groups.items()):
        tagged = [r for r in gr if "flop_budget" in r]
        rs = tagged or gr
        nominal = sorted({r["flop_budget"] for r in tagged}) or None
        groups_c = ([[i for i, r in enumerate(rs) if r["flop_budget"] == b] for b in nominal]
                    if nominal else clusters(column(rs, "flops"), 0.1))
        widest = max(len({rs[i]["params_active"] for i in idx}) for idx in groups_c)
        if widest < 3:
            out[g] = {"status": "not_fitted", "n_runs": len(rs), "reason": (
                f"no FLOP budget holds >= 3 sizes (at most {widest}): not an IsoFLOP ladder")}
            continue
        try:
            res = fit_isoflop(column(rs, "flops"), column(rs, "params_active"),
                              column(rs, "final_eval_loss"), column(rs, "tokens"),
                              nominal=nominal, n_boot=n_boot, seed=seed + 300 + gi,
                              level=level)
        except FIT_ERRORS as exc:
            out[g] = {"status": "not_fitted", "reason": str(exc), "n_runs": len(rs)}
            continue
        out[g] = {"status": "ok", "reason": "", "n_runs": len(rs),
                  "grouping": "flop_budget column" if nominal else "clustered FLOPs", **res}
    return out


def overtraining_section(train, n_boot, seed, level, progress):
    law = "L = E + a N^b + beta 6^(b/2) (M N)^b"
    dense = [r for r in train if r["kind"] == "dense"]
    if len(dense) < 5:
        return not_fitted(law, len(dense), f"{len(dense)} dense runs; the over-training law "
                          "has 4 parameters and needs >= 5")
    spread = independent_spread(column(dense, "params_total"), column(dense, "tokens"))
    if spread <= 0.1 or len({r["params_total"] for r in dense}) < 2:
        return not_fitted(law, len(dense), "needs several sizes and several tokens/param "
                          "ratios M among the dense runs (residual std of log D on log N = "
                          f"{spread:.3g})")
    def fit(rs):
        n = column(rs, "params_total")
        return fit_overtraining(n, column(rs, "tokens") / n, column(rs, "final_eval_loss"))

    def degenerate(p):
        return exponents_in_box(p, ("b",), -1.0)

    return boot_law(fit, dense, OVERTRAIN, n_params=4,
                    key=lambda r: (r["params_total"], r["tokens"]), at_bound=degenerate,
                    n_boot=n_boot, seed=seed + 400, level=level, law=law, progress=progress,
                    objective_name=CURVE_FIT_OBJECTIVE, irreducible="E",
                    log_scale=("a", "beta"))


def downstream_section(train, n_boot, seed, level, progress):
    law = "Err = eps - k exp(-gamma L)"
    rs = [r for r in train if "error" in r]
    if len(rs) < 4:
        return not_fitted(law, len(rs), f"{len(rs)} runs with an 'error' column; the "
                          "downstream law has 3 parameters and needs >= 4")
    def degenerate(p):
        if not p["gamma"] > 1e-6:
            return f"gamma = {p['gamma']:.3g} is at its bound 0 (error does not depend on loss)"
        return "" if p["k"] > 0 else f"k = {p['k']:.3g} is not positive"

    return boot_law(lambda rr: fit_downstream(column(rr, "final_eval_loss"), column(rr, "error")),
                    rs, DOWNSTREAM, n_params=3, key=lambda r: r["final_eval_loss"],
                    at_bound=degenerate, n_boot=n_boot, seed=seed + 500, level=level,
                    law=law, progress=progress, objective_name=CURVE_FIT_OBJECTIVE)


#: L-BFGS starts for the joint law's bootstrap replicates (the point fit keeps the default
#: 32). Measured on 45 noisy synthetic runs (3 expert counts x 5 sizes x 3 tokens/param), 5
#: resamples: 8 starts reach the 32-start objective to 1e-14 relative in every one, at
#: 0.32 s per fit instead of 1.02 s (200 replicates: ~1 min instead of ~3.5).
JOINT_REPLICATE_STARTS = 8

JOINT_IRREDUCIBLE = {"additive": "E0", "joint": "c"}

JOINT_LOG_SCALE = {"additive": ("A", "B"), "joint": ("a", "b")}


def _joint_fit(name: str, rows, e_start: float, e_max: float, n_starts: int = 32) -> dict:
    experts = np.array([1.0 if r["kind"] == "dense" else float(r["n_experts"]) for r in rows])
    loss = column(rows, "final_eval_loss")
    if name == "clark":
        return fit_clark(column(rows, "params_active"), experts, loss, e_start=e_start,
                         e_max=e_max)
    if name == "additive":
        return fit_additive_moe(column(rows, "params_active"), column(rows, "params_total"), loss,
                                n_starts=min(n_starts, 16))
    return fit_joint_moe(column(rows, "params_active"), column(rows, "tokens"), experts, loss,
                         e_start=e_start, e_max=e_max, n_starts=n_starts)


def _joint_at_bound(name):
    if name == "additive":  # fit_additive_moe's box: exponents in [0, 5]
        return lambda p: exponents_in_box(p, ("alpha", "beta"))
    if name == "joint":  # unbounded optimiser: a law that stops decreasing is degenerate
        return lambda p: exponents_in_box(p, ("alpha", "beta"), -1.0, math.inf)
    return lambda p: ""  # Clark: ordinary least squares, no box


def joint_laws(train, held, n_boot, seed, level, progress, e_start=2.0, e_max=256.0):
    """Clark, additive and Ludziejewski et al.'s joint law, each bootstrapped over whole
    runs like the others; one is chosen by cross-validation over sizes on the fitted runs
    (compare_joint_laws), and the held-out runs only score the laws afterwards."""
    if not any(r["kind"] == "moe" for r in train):
        reason = "no MoE runs in the table"
        return {k: not_fitted(JOINT_LAWS[k], len(train), reason) for k in JOINT} | {
            "better": None, "reason": reason, "selected_by": "", "cv_folds_used": []}
    res = compare_joint_laws(train, held, e_start=e_start, e_max=e_max)
    out = {}
    for i, (name, names) in enumerate(JOINT.items()):
        j = res[name]
        if j["params"] is None:
            out[name] = not_fitted(JOINT_LAWS[name], len(train), j["error"])
            continue
        entry = boot_law(lambda rs, n=name: _joint_fit(n, rs, e_start, e_max), train,
                         names, n_params=len(names),
                         key=lambda r: (r["params_active"], r["params_total"], r["tokens"],
                                        r["n_experts"]),
                         at_bound=_joint_at_bound(name), n_boot=n_boot,
                         irreducible=JOINT_IRREDUCIBLE.get(name),
                         log_scale=JOINT_LOG_SCALE.get(name, ()),
                         profile=(profiler({"alpha": (3, 1.0), "beta": (4, 1.0)}, "E0", level)
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
        entry["train_rmse_log"] = num(j["train_rmse_log"])
        entry["heldout_rmse_log"] = num(j["heldout_rmse_log"])
        entry["cv_rmse_log"] = num(j["cv_rmse_log"])
        entry["cv_folds"] = [{**f, "rmse_log": num(f["rmse_log"])} for f in j["cv_folds"]]
    out["better"], out["reason"] = res["better"], res["reason"]
    out["selected_by"], out["cv_folds_used"] = res["selected_by"], res["cv_folds_used"]
    return out
