"""The laws the analysis knows, and the small helpers every section of it uses.

Each law the analysis bootstraps is described once: which parameters it keeps (POWER,
COMPUTE, CHIN, OVERTRAIN, DOWNSTREAM, JOINT), how to predict from a parameter dict (point or
replicate: `law_predict`), and when a fit sits on a box bound (`pl_at_bound`, ...).
Predictions and bands come from stored parameters only.
"""
from __future__ import annotations

import math

import numpy as np

from moe.scaling.laws.chinchilla import chinchilla_predict
from moe.scaling.laws.joint_moe import joint_moe_predict
from moe.scaling.laws.moe_laws import clark_predict
from moe.scaling.laws.overtraining import downstream_predict, overtraining_predict

FIT_ERRORS = (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError)


# fit_power_law's box: exponent in [0, max_alpha], log-amplitude in [-50, 50] (x_ref units).
MAX_ALPHA = 5.0

AMP_BOUND = 50.0

CURVE_FIT_OBJECTIVE = "sum of squared residuals (curve_fit least squares, as Gadre et al.)"

POWER = ("E", "A", "alpha")

COMPUTE = ("a", "b", "c")

CHIN = ("E", "A", "B", "alpha", "beta")

OVERTRAIN = ("E", "a", "b", "beta")

DOWNSTREAM = ("eps", "k", "gamma")

JOINT = {"clark": ("a", "b", "c", "d"), "additive": ("E0", "A", "alpha", "B", "beta"),
         "joint": ("a", "alpha", "gamma", "delta", "b", "beta", "zeta", "omega", "c")}

JOINT_LABELS = {"clark": "Clark et al. L(N_active, E)",
                "additive": "additive L(N_active, N_total)",
                "joint": "Ludziejewski et al. L(N_active, D, E)"}

JOINT_LAWS = {"clark": "log L = a log N + b log E' + c log N log E' + d",
              "additive": "L = E0 + A / N_active^alpha + B / N_total^beta",
              "joint": "L = a E'^delta N^(alpha + gamma ln E') + b E'^omega D^(beta + zeta "
                       "ln E') + c"}


def column(rows, key):
    return np.array([float(r[key]) for r in rows], float)


def num(v):
    """A float for JSON (None for NaN/inf/None)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def pl_predict(p, x):
    """E + A / x^alpha in log form (A can be ~1e60 in FLOP units)."""
    x = np.asarray(x, float)
    return p["E"] + np.exp(math.log(p["A"]) - p["alpha"] * np.log(x))


def cl_predict(p, c):
    return p["c"] + np.exp(math.log(p["a"]) + p["b"] * np.log(np.asarray(c, float)))


def exponents_in_box(p, names, sign=1.0, cap=MAX_ALPHA) -> str:
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


def pl_at_bound(p, exponent="alpha", sign=1.0):
    """Why a 1-D power-law fit sits on fit_power_law's box ('' when it does not)."""
    why = exponents_in_box({exponent: sign * p["alpha"]}, (exponent,), sign)
    if not why and abs(p.get("a_log", 0.0)) >= AMP_BOUND * (1 - 1e-6):
        why = f"the amplitude's log is at its box edge +-{AMP_BOUND:g}"
    return why


def cl_at_bound(p):
    return pl_at_bound(p, "b", -1.0)


def chin_at_bound(p):
    # approach 3 is unbounded in the optimiser; a non-positive exponent is a degenerate
    # (non-decreasing) law, and an exponent above 5 a step the data cannot support.
    return exponents_in_box(p, ("alpha", "beta"))


def law_predict(kind: str, params: dict, run: dict) -> float:
    """Loss (or error, for "downstream") predicted by one law entry's parameters for a run.

    kind: power | compute | chinchilla | overtraining | downstream | clark | additive |
    joint. `run` is a row of fits.json["runs"] (for downstream, its `loss` is the input).
    For clark and joint, params must carry e_start and e_max (their entries' `fixed`).
    Used by the analysis for held-out predictions and by later tools to propagate
    replicates.
    """
    if kind == "power":
        return float(pl_predict(params, run["params_active"]))
    if kind == "compute":
        return float(cl_predict(params, run["flops"]))
    if kind == "chinchilla":
        return float(chinchilla_predict(params, run["params_active"], run["tokens"]))
    if kind == "overtraining":
        n = run["params_total"]
        return float(overtraining_predict(params, n, run["tokens"] / n))
    if kind == "downstream":
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
        return float(joint_moe_predict(params, run["params_active"], run["tokens"], experts))
    raise ValueError(f"unknown law kind {kind!r}")
