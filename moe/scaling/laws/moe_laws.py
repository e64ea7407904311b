"""MoE laws over active parameters and experts: Clark et al. 2022 (log-bilinear in N and
a saturating expert count E') and the additive law E0 + A/N_active^alpha + B/N_total^beta.

The MoE joint law of Clark et al. is linear in its coefficients and is fitted by ordinary
least squares in log loss (as in the paper); its saturation constants are fixed by default.
The additive law is a log-sum-exp law (`lse.py`), fitted like Chinchilla approach 3.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import minimize

from moe.scaling.laws.lse import fit_lse_law
from moe.scaling.laws.objective import HUBER_DELTA, as_pos_array


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
    N = as_pos_array("N", N)
    E = np.asarray(E, float).ravel()
    loss = as_pos_array("loss", loss)
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
    Na = as_pos_array("N_active", N_active)
    Nt = as_pos_array("N_total", N_total)
    loss = as_pos_array("loss", loss)
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
    theta, _, diag = fit_lse_law([la, lt], lL, grid, delta=delta, reduction="sum",
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
