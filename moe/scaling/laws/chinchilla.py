"""Chinchilla approach 3 (Hoffmann et al. 2022, refitted as Besiroglu et al. 2024 do) and
Kaplan et al. 2020's published laws.

    python -c "from moe.scaling.laws.chinchilla import fit_chinchilla, load_chinchilla_points as p; print(fit_chinchilla(*p()))"

L(N, D) = E + A/N^alpha + B/D^beta as a log-sum-exp law (`lse.py`), started from the
4500-point Chinchilla grid.
"""
from __future__ import annotations

import csv
import itertools
import math
from importlib import resources

import numpy as np

from moe.scaling.laws.lse import fit_lse_law
from moe.scaling.laws.objective import HUBER_DELTA, as_pos_array, lse_objective


#: Hoffmann et al. 2022, approach 3, as published (they fit the digitised points poorly).
CHINCHILLA_PUBLISHED = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


#: Kaplan et al. 2020, L(N) = (N_c/N)^a_N and L(D) = (D_c/D)^a_D, N non-embedding params.
KAPLAN = {"a_N": 0.076, "N_c": 8.8e13, "a_D": 0.095, "D_c": 5.4e13}


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
    return lse_objective(np.asarray(theta, float), [np.log(N), np.log(D)], np.log(loss),
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
    N = as_pos_array("N", N)
    D = as_pos_array("D", D)
    loss = as_pos_array("loss", loss)
    if not (N.size == D.size == loss.size):
        raise ValueError(f"N, D, loss lengths differ: {N.size}, {D.size}, {loss.size}")
    if np.unique(np.column_stack([N, D]), axis=0).shape[0] < 5:
        raise ValueError("approach 3 has 5 parameters; got fewer than 5 distinct (N, D) runs")
    grid = chinchilla_grid() if grid is None else np.asarray(grid, float).reshape(-1, 5)
    theta, _, diag = fit_lse_law([np.log(N), np.log(D)], np.log(loss), grid, delta=delta,
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
