"""Efficiency leverage of each MoE run against the dense curve, with intervals from the
dense law's bootstrap replicates.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from moe.scaling.analysis.entries import params_of, replicate_params
from moe.scaling.analysis.kinds import CHIN, COMPUTE, POWER, num
from moe.scaling.table import run_group


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


def efficiency_leverage_section(rows, power, compute, chinchilla=None, level=0.95):
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
    c = _el_curves(power, compute, chinchilla)
    dense_p = power.get("dense")
    if not moe or ((dense_p is None or dense_p["status"] == "not_fitted") and c["chin"] is None):
        return []
    return [_el_row(r, c, dense_p, chinchilla, level) for r in moe]


def _el_curves(power, compute, chinchilla) -> dict:
    """The dense curves EL reads, each point and replicates: L(N) and L(C) as power laws
    (`power_ok`), else approach 3 (`chin`)."""
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
        chin = params_of(chinchilla, CHIN)
        chin_reps = replicate_params(chinchilla, CHIN)
    cp = compute.get("dense")

    def as_power(c):
        return {"E": c["c"], "A": c["a"], "alpha": -c["b"]}

    cpp = cpp_reps = None
    if cp is not None and cp["status"] in EL_CURVE_STATUSES:
        cpp = as_power(params_of(cp, COMPUTE))
        cpp_reps = [as_power(c) for c in replicate_params(cp, COMPUTE)]
    return {"power_ok": power_ok, "chin": chin, "chin_reps": chin_reps, "cp": cp, "cpp": cpp,
            "cpp_reps": cpp_reps}


def _el_row(r: dict, c: dict, dense_p, chinchilla, level: float) -> dict:
    """One MoE run's EL row (module function's docstring)."""
    power_ok, chin, cp, cpp = c["power_ok"], c["chin"], c["cp"], c["cpp"]
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
        pp = params_of(dense_p, POWER)
        pp_reps = replicate_params(dense_p, POWER)
        row["basis"] = _basis("dense L(N)", dense_p) + (
            ", " + _basis("dense L(C)", cp) if cpp is not None else "")
        if L <= pp["E"]:
            row["reason"] = (f"loss {L:.4g} is at or below the dense fit's irreducible "
                             f"E = {pp['E']:.4g}: no dense model reaches it")
        else:
            row["el_params"] = num(_inverse_n(pp, L) / r["params_active"])
            put("el_params", [_inverse_n(p, L) / r["params_active"] for p in pp_reps])
            if cpp is not None and L > cpp["E"]:
                row["el_compute"] = num(_inverse_n(cpp, L) / r["flops"])
                put("el_compute", [_inverse_n(p, L) / r["flops"] for p in c["cpp_reps"]])
    elif chin is not None:
        row["basis"] = _basis("dense Chinchilla L(N, D) at the run's tokens", chinchilla)
        n = _chin_inverse_n(chin, L, r["tokens"])
        if math.isinf(n):
            row["reason"] = (f"loss {L:.4g} is at or below what the dense L(N, D) reaches "
                             f"at any size with {r['tokens']:.3g} tokens")
        else:
            row["el_params"] = num(n / r["params_active"])
            put("el_params", [_chin_inverse_n(p, L, r["tokens"]) / r["params_active"]
                              for p in c["chin_reps"]])
    else:
        row["reason"] = (f"dense L(N) fit is {dense_p['status']} "
                         f"({dense_p.get('reason', '')}) and no Chinchilla fit to fall "
                         "back on: no dense curve to compare with")
    row["interval_note"] = "; ".join(notes)
    return row
