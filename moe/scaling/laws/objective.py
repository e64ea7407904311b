"""The shared objective of every log-sum-exp law: Huber loss of log residuals.

Every nonlinear law in `moe.scaling.laws` is a log-sum-exp of power-law terms,

    log L_hat = LSE(c_1 - alpha_1 log X_1, ..., c_K - alpha_K log X_K, e)
    objective = SUM_i Huber_delta(log L_hat_i - log L_i),   delta = 1e-3

Here: the Huber loss, the stacked terms (`lse_terms`), the max-shifted log-sum-exp
(`lse0`), the objective with its analytic gradient (`lse_objective`) and the blocked scoring
of a whole start grid (`grid_huber_scores`). The fitter is `lse.py`; the joint MoE law
(`joint_moe.py`) scores its own terms with the same primitives.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

HUBER_DELTA = 1e-3


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Elementwise Huber loss: r^2/2 inside |r| <= delta, delta (|r| - delta/2) outside."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def lse_terms(theta: np.ndarray, logX: Sequence[np.ndarray]) -> np.ndarray:
    """Stack the K+1 log-terms (c_k - alpha_k log X_k ..., e); theta may be (P,) or (G, P)."""
    K = len(logX)
    theta = np.asarray(theta, float)
    if theta.ndim == 1:
        c, e, al = theta[:K], theta[K], theta[K + 1:]
        terms = [c[k] - al[k] * logX[k] for k in range(K)]
        terms.append(np.full_like(logX[0], e))
    else:  # (G, P) -> terms (K+1, G, m), the whole grid in one pass
        c, e, al = theta[:, :K], theta[:, K:K + 1], theta[:, K + 1:]
        terms = [c[:, k:k + 1] - al[:, k:k + 1] * logX[k][None, :] for k in range(K)]
        terms.append(np.broadcast_to(e, terms[0].shape))
    return np.stack(terms)


def lse0(T: np.ndarray) -> np.ndarray:
    """log-sum-exp over axis 0, max-shifted (same maths as scipy.special.logsumexp).

    Written out because it is the hot loop: scipy's logsumexp measured ~0.28 s on the
    (3, 4500, 240) Chinchilla grid stack against ~0.02 s for this, and its per-call overhead
    was ~55% of a whole 3-parameter power-law fit (profiled), which the bootstrap repeats.
    """
    m = T.max(axis=0)
    return m + np.log(np.exp(T - m).sum(axis=0))


def lse_objective(theta, logX, logL, delta, reduction):
    """Summed (or averaged) Huber loss of log residuals, and its analytic gradient."""
    K = len(logX)
    T = lse_terms(theta, logX)
    lse = lse0(T)
    w = np.exp(T - lse)  # softmax weights = d lse / d term
    r = lse - logL
    f = float(huber(r, delta).sum())
    g = np.clip(r, -delta, delta)  # d Huber / d r
    grad = np.empty(2 * K + 1)
    for k in range(K):
        gw = g * w[k]
        grad[k] = gw.sum()
        grad[K + 1 + k] = -(gw @ logX[k])
    grad[K] = g @ w[K]
    if reduction == "mean":
        f /= r.size
        grad /= r.size
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return f, grad


#: elements of one (terms x grid rows x data rows) block scored at once: 2^22 float64 =
#: 32 MiB, so a grid pass peaks near 0.2 GB whatever the table size (the numpy temporaries
#: of lse0 and huber are a few blocks). A fixed 2048 grid rows was 4.9 GB per block at
#: 100,000 rows and the fit peaked at 9.4 GB.
GRID_BLOCK_ELEMENTS = 1 << 22


def grid_chunk(n_rows: int, n_terms: int, cap: int = 2048) -> int:
    """Grid rows per block so that a block holds <= GRID_BLOCK_ELEMENTS values (>= 1,
    <= ``cap``: small tables keep the old 2048-row blocks). Scores do not depend on it:
    each grid row is reduced on its own."""
    return max(1, min(cap, GRID_BLOCK_ELEMENTS // max(1, n_rows * n_terms)))


def grid_huber_scores(grid, terms, n_terms: int, logL, delta, chunk=None) -> np.ndarray:
    """Summed Huber loss of (LSE of ``terms(grid rows)`` - log L) at every grid row, in
    blocks of ``chunk`` rows (default :func:`grid_chunk`: bounded memory). ``terms`` maps
    (rows, params) to the (n_terms, rows, data) stack of log-terms."""
    out = np.empty(len(grid))
    chunk = chunk or grid_chunk(len(logL), n_terms)
    for s in range(0, len(grid), chunk):
        r = lse0(terms(grid[s:s + chunk])) - logL[None, :]
        out[s:s + chunk] = huber(r, delta).sum(axis=1)
    return out


def lse_grid_objective(grid, logX, logL, delta, chunk=None):
    """Summed Huber objective of the LSE law at every grid row."""
    return grid_huber_scores(grid, lambda g: lse_terms(g, logX), len(logX) + 1, logL, delta,
                             chunk)


def as_pos_array(name, x):
    x = np.asarray(x, float).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"{name} must be finite and > 0 (got {x.size} values)")
    return x
