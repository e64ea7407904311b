"""One-dimensional power laws L = E + A/x^alpha (per-sparsity laws over active params,
L(C) as in the GPT-4 report) and the efficiency leverage read off a dense one.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

from moe.scaling.laws.lse import fit_lse_law
from moe.scaling.laws.objective import HUBER_DELTA, as_pos_array


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
    x = as_pos_array("x", x)
    loss = as_pos_array("loss", loss)
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
    theta, _, diag = fit_lse_law([lx], lL, grid, delta=delta, reduction="sum",
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


def _col(rows, key):
    return np.array([float(r[key]) for r in rows], float)


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
