"""Joint MoE scaling law of Ludziejewski et al. 2025, fitted the Chinchilla approach-3 way.

    python -c "from moe.scaling.laws.joint_moe import _demo; _demo()"

The law ("Joint MoE scaling laws: mixture of experts can be memory efficient", ICML 2025):

    L(N, D, E) = a E'^delta N^(alpha + gamma ln E') + b E'^omega D^(beta + zeta ln E') + c

N = active parameters, D = training tokens, E = number of experts (1 for dense runs),
E' = clark_expert_transform(E, e_start, e_max) from moe/scaling/laws/moe_laws.py.

Sign convention: the PAPER's, exponents as written. alpha and beta are NEGATIVE for a loss
that falls with N and D (the project's other laws write A/N^alpha with alpha > 0; here
alpha_paper = -alpha_project). gamma, zeta, delta, omega carry the sign they have in the
formula above. Returned keys use the paper's names: a, alpha, gamma, delta, b, beta, zeta,
omega, c.

E' (the paper's E-hat). The paper uses a saturating transform of the expert count in the
style of Clark et al. 2022; this module reuses the project's `clark_expert_transform`,

    1/E' = 1 / (E - 1 + (1/(e_start - 1) - 1/e_max)^-1) + 1/e_max,

with the project defaults e_start = 2 (so E'(1) = 1: ln E' = 0 for dense runs and the law
reduces exactly to Chinchilla approach 3, L = a N^alpha + b D^beta + c) and e_max = 256
(bends the law only above ~64 experts). The paper's own E-hat definition and constants
could not be read from any source available when this was written (only its abstract, the
law itself, and a second-hand note quoting the fitted values as a = 35.91, delta = 0.2285,
N exponent 0.1889 - 0.0098 ln E', b = 35.98, omega = -0.5529, D exponent 0.1775 +
0.0259 ln E', c = 1.3637, with the exponents' signs evidently lost, since as quoted the
loss would rise with N and D; unverified, not used here). E'(1) = 1 is what "joint scaling
laws for dense and MoE models" (the abstract) needs; e_start = 2 and e_max = 256 are this
project's choice, not verified to be the paper's. Both are arguments.

Procedure (as approach 3 in `chinchilla.py`): every term's log is linear in parameters times
features, so log L_hat = LSE(F_N theta_N, F_D theta_D, log c) with

    F_N = [1, ln E', ln n, ln E' ln n],  n = N / N_ref   (N_ref = geometric mean of N)
    F_D = [1, ln E', ln d, ln E' ln d],  d = D / D_ref   (D_ref = geometric mean of D)

objective = SUM_i Huber_1e-3(log L_hat_i - log L_i) (summed, natural logs), minimised by
scipy L-BFGS-B with an analytic gradient (`_feature_lse_objective`) from the `n_starts`
best points of an 11,664-point grid scored in one vectorised pass (`joint_moe_grid`).
Scaling by the geometric means makes the amplitudes O(1); the raw parameters are recovered
exactly afterwards (log a = a_s - alpha ln N_ref, delta = delta_s - gamma ln N_ref, and the
same for b, omega). ln E' is not scaled: E' = 1 must stay the dense point.
L-BFGS-B's tolerances are tightened (ftol 1e-15, gtol 1e-10, maxiter 5000). Measured on the
48 noise-free runs of `_demo`: scipy's defaults stop at objective 2.7e-11 with relative
parameter errors up to 4.6e-4 (delta), the tight ones at 3.8e-17 with errors <= 1.3e-7, for
~15% more time (0.72 s vs 0.62 s for the 32 starts). The objective is summed, not averaged, so the
early stop documented in `lse.py` for `reduction="mean"` does not arise either way.

Measured (tests/test_scaling_joint.py, 2 shared CPU cores): 48 noise-free runs (sizes 1e7-3e8
x 5, 20, 80 tokens/param x E in {1, 8, 32, 64}) recover all nine parameters to <= 6.5e-7
relative (objective ~2e-17). One fit of 40 of those runs takes 0.9-1.4 s with the default
32 starts (grid scoring ~0.06 s of it, the rest L-BFGS, ~100-170 iterations for the best
start). With 0.3% log-normal noise, predictions at 3x the largest training size stay within
the noise (held-out RMSE(log L) 0.0033) but the raw delta and omega move by ~20% (0.040 for
0.05, 0.054 for 0.06): they are the E' slopes extrapolated to N = 1 and D = 1 tokens, far
outside any data (delta = delta_s - gamma ln N_ref), so compare fits by the slopes at the
reference sizes (returned as delta_ref, omega_ref) or by predictions, not delta/omega alone.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import minimize

from moe.scaling.laws._blas import single_threaded_blas
from moe.scaling.laws.moe_laws import clark_expert_transform
from moe.scaling.laws.objective import (HUBER_DELTA, as_pos_array, grid_huber_scores, huber,
                                        lse0)

__all__ = ["fit_joint_moe", "joint_moe_predict", "joint_moe_grid", "JOINT_PARAMS"]

#: The nine parameters, in the paper's names and order of the formula.
JOINT_PARAMS = ("a", "alpha", "gamma", "delta", "b", "beta", "zeta", "omega", "c")

# Internal (scaled) parameter vector, 9 entries:
#   [a_s, delta_s, alpha, gamma,  b_s, omega_s, beta, zeta,  c_log]
# matching the feature columns F_N = [1, lnE', ln n, lnE' ln n] and F_D likewise.


# --------------------------------------------------------- feature log-sum-exp core


def _feature_terms(theta, feats):
    """Log-terms (K+1, m) for theta (P,), or (K+1, G, m) for a grid (G, P).

    feats: K feature matrices (m, p_k); term k = feats[k] @ theta[slice_k]; the last theta
    entry is the constant term's log (the irreducible loss).
    """
    theta = np.asarray(theta, float)
    out, s = [], 0
    if theta.ndim == 1:
        for F in feats:
            p = F.shape[1]
            out.append(F @ theta[s:s + p])
            s += p
        out.append(np.full(feats[0].shape[0], theta[s]))
    else:
        for F in feats:
            p = F.shape[1]
            out.append(theta[:, s:s + p] @ F.T)
            s += p
        out.append(np.broadcast_to(theta[:, s:s + 1], out[0].shape))
    return np.stack(out)


def _feature_lse_objective(theta, feats, logL, huber_delta=HUBER_DELTA):
    """Summed Huber loss of (LSE of the log-terms - log L) and its analytic gradient.

    d objective / d theta_k = F_k^T (h' * w_k), w_k the softmax weight of term k (the
    derivative of the LSE with respect to that term) and h' = clip(r, -delta, delta).
    """
    T = _feature_terms(theta, feats)
    lse = lse0(T)
    w = np.exp(T - lse)
    r = lse - logL
    f = float(huber(r, huber_delta).sum())
    g = np.clip(r, -huber_delta, huber_delta)
    grad = np.empty(len(theta))
    s = 0
    for k, F in enumerate(feats):
        p = F.shape[1]
        grad[s:s + p] = F.T @ (g * w[k])
        s += p
    grad[s] = g @ w[-1]
    return f, grad


def _grid_scores(grid, feats, logL, huber_delta, chunk=None):
    out = grid_huber_scores(grid, lambda g: _feature_terms(g, feats), len(feats) + 1, logL,
                            huber_delta, chunk)
    return np.where(np.isfinite(out), out, np.inf)


# --------------------------------------------------------------------------- the fit


def _features(N, D, E, N_ref, D_ref, e_start, e_max):
    lE = np.log(clark_expert_transform(E, e_start, e_max))
    ln, ld = np.log(N / N_ref), np.log(D / D_ref)
    one = np.ones_like(ln)
    return [np.column_stack([one, lE, ln, lE * ln]), np.column_stack([one, lE, ld, lE * ld])]


def joint_moe_grid(loss) -> np.ndarray:
    """Starting grid in the scaled parametrisation, rows (a_s, delta_s, alpha, gamma, b_s,
    omega_s, beta, zeta, c_log): 3 x 4 x 4 x 3 x 3 x 3 x 3 x 3 = 11,664 points.

    Data-driven like `power._power_grid`: c in {0.2, 0.5, 0.8} x min L; the reducible part
    at the reference point (geometric mean of L minus c) is split f : 1-f between the N and
    the D term, f in {0.2, 0.5, 0.8}; alpha, beta in {-0.05, -0.15, -0.35, -0.7};
    gamma, zeta in {-0.02, 0, 0.02}; delta_s, omega_s (log change of a term per unit ln E'
    at the reference size) in {-0.2, -0.05, 0.1}.
    """
    loss = np.asarray(loss, float)
    lmin, lgeo = float(loss.min()), float(np.exp(np.mean(np.log(loss))))
    exps = (-0.05, -0.15, -0.35, -0.7)
    inter = (-0.02, 0.0, 0.02)
    eslope = (-0.2, -0.05, 0.1)
    rows = []
    for cf, f, al, be, ga, ze, de, om in itertools.product(
            (0.2, 0.5, 0.8), (0.2, 0.5, 0.8), exps, exps, inter, inter, eslope, eslope):
        c = cf * lmin
        red = lgeo - c
        rows.append((math.log(f * red), de, al, ga, math.log((1 - f) * red), om, be, ze,
                     math.log(c)))
    return np.array(rows, float)


def _check_inputs(N_active, D, E, loss):
    N = as_pos_array("N_active", N_active)
    D = as_pos_array("D", D)
    loss = as_pos_array("loss", loss)
    E = np.asarray(E, float).ravel()
    if not (N.size == D.size == E.size == loss.size):
        raise ValueError(f"N_active, D, E, loss lengths differ: {N.size}, {D.size}, {E.size}, "
                         f"{loss.size}")
    if not np.all(np.isfinite(E)) or np.any(E < 1):
        raise ValueError("expert counts must be finite and >= 1 (1 for dense runs)")
    if N.size < 10:
        raise ValueError(f"the joint MoE law has 9 parameters; got {N.size} runs, need >= 10")
    if np.unique(E).size < 2:
        raise ValueError("the joint MoE law needs at least two expert counts (e.g. dense and "
                         "MoE runs): with one, delta, gamma, omega, zeta cannot be identified")
    if np.unique(N).size < 3:
        raise ValueError(f"the joint MoE law needs at least 3 distinct N_active; got "
                         f"{np.unique(N).size}")
    # The D term is identified only if ln D varies beyond what ln N explains. D = k N (a fixed
    # tokens/param ratio, std of log(D/N) = 0) is the common case; any D = k N^p fails too.
    lN, lD = np.log(N), np.log(D)
    X = np.column_stack([np.ones_like(lN), lN])
    resid = lD - X @ np.linalg.lstsq(X, lD, rcond=None)[0]
    if float(np.std(resid)) < 0.05 or float(np.std(lD - lN)) < 0.05:
        what = ("D is the same for every run" if float(np.std(lD)) < 0.05 else
                "D and N move together")
        raise ValueError(f"{what}: the D term cannot be identified; train some sizes at "
                         "several token budgets")
    return N, D, E, loss


def fit_joint_moe(N_active, D, E, loss, *, e_start: float = 2.0, e_max: float = 256.0,
                  n_starts: int | None = 32, huber_delta: float = HUBER_DELTA,
                  grid=None) -> dict:
    """Fit L = a E'^delta N^(alpha + gamma ln E') + b E'^omega D^(beta + zeta ln E') + c.

    N_active: active parameters; D: training tokens; E: experts (1 for dense);
    E' = clark_expert_transform(E, e_start, e_max). Summed Huber (delta 1e-3) on log loss,
    L-BFGS-B with analytic gradient from the `n_starts` best points of `joint_moe_grid`
    (None: from every grid point), inputs scaled by their geometric means inside the fit.
    Paper's sign convention: alpha, beta < 0 for a decreasing law (see module docstring).

    Raises ValueError (one line) if the law is not identifiable: < 10 runs, < 2 expert
    counts, < 3 sizes, D moving with N (no token-budget variation at fixed size), or bad
    inputs.

    Returns a dict: a, alpha, gamma, delta, b, beta, zeta, omega, c (raw units, paper's
    names); a_log, b_log, c_log (logs of a, b, c); N_ref, D_ref (the scaling references,
    geometric means of N and D); delta_ref = delta + gamma ln N_ref and omega_ref = omega +
    zeta ln D_ref (d log term / d ln E' at the reference sizes: far better determined than
    delta, omega, which are extrapolated to N = D = 1);
    e_start, e_max; objective (summed Huber), converged, nit, n, n_starts, n_grid,
    huber_delta; _scaled (the internal 9-vector, for debugging).
    """
    N, D, E, loss = _check_inputs(N_active, D, E, loss)
    N_ref, D_ref = float(np.exp(np.log(N).mean())), float(np.exp(np.log(D).mean()))
    feats = _features(N, D, E, N_ref, D_ref, e_start, e_max)
    logL = np.log(loss)
    grid = joint_moe_grid(loss) if grid is None else np.asarray(grid, float).reshape(-1, 9)
    big = 50.0
    bounds = [(-big, big), (-5.0, 5.0), (-5.0, 0.0), (-1.0, 1.0),
              (-big, big), (-5.0, 5.0), (-5.0, 0.0), (-1.0, 1.0),
              (float(logL.min()) - 30.0, float(logL.max()) + 1.0)]
    with single_threaded_blas():
        if n_starts is None or n_starts >= len(grid):
            starts = grid
        else:
            score = _grid_scores(grid, feats, logL, huber_delta)
            starts = grid[np.argsort(score, kind="stable")[: max(1, int(n_starts))]]
        best = None
        for x0 in starts:
            res = minimize(_feature_lse_objective, x0, args=(feats, logL, huber_delta),
                           jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000})
            if not np.all(np.isfinite(res.x)) or not np.isfinite(res.fun):
                continue
            if best is None or res.fun < best.fun:
                best = res
    if best is None:
        raise RuntimeError("every L-BFGS start diverged")
    a_s, de_s, al, ga, b_s, om_s, be, ze, c_log = (float(v) for v in best.x)
    lNr, lDr = math.log(N_ref), math.log(D_ref)
    a_log, delta = a_s - al * lNr, de_s - ga * lNr
    b_log, omega = b_s - be * lDr, om_s - ze * lDr
    out = {"a": math.exp(a_log), "alpha": al, "gamma": ga, "delta": delta,
           "b": math.exp(b_log), "beta": be, "zeta": ze, "omega": omega,
           "c": math.exp(c_log),
           "a_log": a_log, "b_log": b_log, "c_log": c_log, "N_ref": N_ref, "D_ref": D_ref,
           "delta_ref": de_s, "omega_ref": om_s,
           "e_start": float(e_start), "e_max": float(e_max),
           "objective": float(best.fun), "converged": bool(best.success),
           "nit": int(best.nit), "n": int(N.size), "n_starts": int(len(starts)),
           "n_grid": int(len(grid)), "huber_delta": float(huber_delta),
           "_scaled": best.x.copy()}
    return out


def joint_moe_predict(params: dict, N_active, D, E) -> np.ndarray:
    """Loss from a `fit_joint_moe` dict (or any dict with the nine paper-named parameters,
    plus optional e_start/e_max, defaults 2 and 256). Terms are evaluated in log space, so
    raw-unit amplitudes such as a = 1e30 do not overflow; a_log/b_log/c_log are used when
    present (no rounding through exp/log)."""
    N = np.asarray(N_active, float)
    D = np.asarray(D, float)
    lE = np.log(clark_expert_transform(E, params.get("e_start", 2.0), params.get("e_max", 256.0)))
    a_log = params["a_log"] if "a_log" in params else math.log(params["a"])
    b_log = params["b_log"] if "b_log" in params else math.log(params["b"])
    c = math.exp(params["c_log"]) if "c_log" in params else params["c"]
    lN, lD = np.log(N), np.log(D)
    tN = a_log + params["delta"] * lE + (params["alpha"] + params["gamma"] * lE) * lN
    tD = b_log + params["omega"] * lE + (params["beta"] + params["zeta"] * lE) * lD
    return np.exp(tN) + np.exp(tD) + c


def _demo():
    """Fit noise-free synthetic runs and print truth vs fit (the module's runnable line)."""
    import time
    truth = dict(a=30.0, alpha=-0.2, gamma=-0.01, delta=0.05,
                 b=400.0, beta=-0.3, zeta=-0.006, omega=0.06, c=1.7)
    N, D, E = (np.array(v, float) for v in zip(*[
        (n, n * tpp, e) for n in (1e7, 3e7, 1e8, 3e8) for tpp in (5, 20, 80)
        for e in (1, 8, 32, 64)]))
    L = joint_moe_predict(truth, N, D, E)
    t0 = time.perf_counter()
    fit = fit_joint_moe(N, D, E, L)
    dt = time.perf_counter() - t0
    print(f"{len(N)} runs, fit in {dt:.2f} s, objective {fit['objective']:.3g}, "
          f"converged {fit['converged']}")
    for k in JOINT_PARAMS:
        rel = (fit[k] - truth[k]) / abs(truth[k])
        print(f"  {k:6s} true {truth[k]: .6g}  fit {fit[k]: .8g}  rel err {rel: .1e}")
