"""Over-training and downstream scaling laws of Gadre et al. 2024, reproduced on their runs.

    python -c "from moe.scaling.laws.overtraining import main; main()"   # their 5 + 1 runs -> the 4 errors

"Language models scale reliably with over-training and on downstream tasks" (Gadre et al.
2024) fits two laws and chains them:

    loss law        L(N, M) = E + a N^b + beta 6^(b/2) (M N)^b      (one shared exponent b < 0)
    downstream law  Err(L)  = eps - k exp(-gamma L)

N = total parameters, M = tokens per parameter (D = M N; M = 20 is Chinchilla-optimal), L =
C4 validation loss, Err = average top-1 error over their 17 tasks. A prediction for an
unseen run goes (N, M) -> L(N, M) -> Err(L(N, M)).

Procedure (as their scaling/laws.py and scaling/shared.py at a003c49 do it; this is a fresh
implementation, not their code):

- the loss law is fitted by `scipy.optimize.curve_fit` (Levenberg-Marquardt, maxfev 10000)
  from each of the 4 x 4 x 2 x 4 = 128 starting points in `OVERTRAINING_STARTS`, and the
  fit with the lowest residual standard error is kept. Their RSE divides the sum of squares
  by n - 2 whatever the parameter count; n is the same for every start, so ranking by the
  sum of squared residuals (`objective` here) picks the same fit. Starts that do not
  converge (curve_fit raises: no convergence, or non-finite residuals at the start) are
  skipped, as are non-finite results.
- the downstream law is fitted by one `curve_fit` call from scipy's default start
  (k, gamma, eps) = (1, 1, 1), no bounds, maxfev 10000: their call passes no p0.
- the fit runs (`gadre_fit_rows`) are models d=96_l=8_h=4, d=512_l=8_h=4, d=576_l=24_h=8,
  d=1024_l=24_h=8 at M = 20 and d=96_l=8_h=4 at M = 320 for the loss law; the same five
  plus open_lm_1b at M = 20 for the downstream law.

Measured with this file on the packaged RedPajama table (data/gadre2024_rpj.csv, whose
losses and errors are rounded to 5 decimals), relative error |predicted - actual| / actual
(every prediction here is above the measured value):

    open_lm_1b, M = 640   C4 loss    0.71071%   (published 0.7103%)
    open_lm_7b, M = 20    C4 loss    0.73245%   (published 0.7320%)
    open_lm_1b, M = 640   17-task    3.63671%   (published 3.6365%)
    open_lm_7b, M = 20    17-task    0.04734%   (published 0.0464%)

with a = 166.2148, beta = 366.6997, b = -0.272853, E = 1.836665 (SSE 4.2550e-4) and
k = 2.206331, gamma = 0.714558, eps = 0.857000. Every difference from the published numbers
is under 0.001 percentage points; it comes from the 5-decimal rounding of the table: the
same functions on the unrounded losses and errors of their JSON files (not shipped) give
0.710335%, 0.732046%, 3.636506% and 0.046445%, the published numbers to their 4 decimals. All 128 starts converge on these runs, to the same
optimum (their sums of squares agree to ~1e-15 relative), so which start is kept is decided
by round-off; the law is summed in their term order so that it is decided as in theirs.
Both fits together take ~0.1 s on 2 CPU cores.
"""
from __future__ import annotations

import csv
import itertools
import math
import warnings
from importlib import resources
from typing import Sequence

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

__all__ = [
    "OVERTRAINING_STARTS",
    "fit_overtraining",
    "overtraining_predict",
    "fit_downstream",
    "downstream_predict",
    "load_gadre_rpj",
    "gadre_fit_rows",
    "reproduce_gadre",
]

# Their grid of starting points (a, beta, b, E), in their loop order (a outermost).
OVERTRAINING_STARTS = tuple(itertools.product(
    (1e2, 3e2, 1e3, 3e3),       # a
    (1e2, 3e2, 1e3, 3e3),       # beta
    (-0.1, -0.3),               # b
    (0.0, 1.0, 2.0, 10.0),      # E
))
DOWNSTREAM_START = (1.0, 1.0, 1.0)     # (k, gamma, eps): scipy's default p0, which they use
MAXFEV = 10000

# The published targets (model, cc_mult) and the fit runs, in the order their code stacks them.
GADRE_TARGETS = (("open_lm_1b", 32.0), ("open_lm_7b", 1.0))
GADRE_LOSS_FIT_RUNS = (("d=96_l=8_h=4", 1.0), ("d=512_l=8_h=4", 1.0), ("d=576_l=24_h=8", 1.0),
                       ("d=1024_l=24_h=8", 1.0), ("d=96_l=8_h=4", 16.0))
GADRE_DOWNSTREAM_EXTRA_RUN = ("open_lm_1b", 1.0)
TOKENS_PER_PARAM_PER_CC = 20.0         # M = 20 x cc_mult


def _ot_law(X, a, beta, b, E):
    N, M = X       # summed in their order, so round-off matches theirs too
    return a * np.power(N, b) + beta * np.power(6.0, b / 2) * np.power(M * N, b) + E


def _ds_law(L, k, gamma, eps):
    return eps - k * np.exp(-gamma * L)


def _as_array(name: str, x, *, positive: bool) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional; got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite (got {int(np.sum(~np.isfinite(a)))} non-finite "
                         f"of {a.size})")
    if positive and not np.all(a > 0):
        raise ValueError(f"{name} must be > 0 (got {int(np.sum(a <= 0))} non-positive of {a.size})")
    return a


def _curve_fit(f, x, y, p0):
    """curve_fit as they call it; None where it does not converge or gives non-finite values."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", OptimizeWarning)    # covariance not estimable: unused
        warnings.simplefilter("ignore", RuntimeWarning)     # overflow on the way, from bad starts
        try:
            popt, _ = curve_fit(f, x, y, p0=p0, maxfev=MAXFEV)
        except RuntimeError:                                 # MINPACK did not converge
            return None
        except ValueError:           # non-finite residuals at the start (inputs are checked)
            return None
        resid = y - f(x, *popt)
    sse = float(np.sum(resid ** 2))
    if not (np.all(np.isfinite(popt)) and math.isfinite(sse)):
        return None
    return popt, sse


def _rse(sse: float, n: int, p: int) -> float:
    return math.sqrt(sse / (n - p)) if n > p else math.nan


def fit_overtraining(N, M, loss, *, starts: Sequence[Sequence[float]] = OVERTRAINING_STARTS) -> dict:
    """Fit L(N, M) = E + a N^b + beta 6^(b/2) (M N)^b from every start; keep the lowest SSE.

    N: total parameters, M: tokens per parameter, loss: evaluation loss (1-D, same length,
    finite and > 0, at least 4 points). Returns a dict: a, beta, b, E; `objective` = `sse`,
    the sum of squared loss residuals of the kept fit (the quantity ranked; their residual
    standard error is a fixed monotone function of it); `rse` = sqrt(sse / (n - 4)) (nan
    when n == 4); `converged` (some start converged); n; n_starts; n_converged; `start`,
    the starting point of the kept fit. With no converged start the parameters are nan.
    """
    N = _as_array("N", N, positive=True)
    M = _as_array("M", M, positive=True)
    loss = _as_array("loss", loss, positive=True)
    if not N.size == M.size == loss.size:
        raise ValueError(f"N, M, loss lengths differ: {N.size}, {M.size}, {loss.size}")
    if N.size < 4:
        raise ValueError(f"the over-training law has 4 parameters; got {N.size} points")
    X = np.vstack([N, M])
    best, best_start, n_conv = None, None, 0
    for p0 in starts:
        res = _curve_fit(_ot_law, X, loss, list(p0))
        if res is None:
            continue
        n_conv += 1
        if best is None or res[1] < best[1]:                 # first of equals wins, as theirs
            best, best_start = res, tuple(float(v) for v in p0)
    out = {"n": int(N.size), "n_starts": len(starts), "n_converged": n_conv,
           "converged": best is not None, "start": best_start}
    if best is None:
        out.update(a=math.nan, beta=math.nan, b=math.nan, E=math.nan, objective=math.nan,
                   sse=math.nan, rse=math.nan)
        return out
    (a, beta, b, E), sse = best
    out.update(a=float(a), beta=float(beta), b=float(b), E=float(E), objective=sse, sse=sse,
               rse=_rse(sse, N.size, 4))
    return out


def overtraining_predict(params: dict, N, M) -> np.ndarray:
    """L(N, M) = E + a N^b + beta 6^(b/2) (M N)^b; N, M broadcast."""
    N = np.asarray(N, dtype=float)
    M = np.asarray(M, dtype=float)
    return np.asarray(_ot_law((N, M), params["a"], params["beta"], params["b"], params["E"]),
                      dtype=float)


def fit_downstream(loss, err, *, p0: Sequence[float] = DOWNSTREAM_START) -> dict:
    """Fit Err(L) = eps - k exp(-gamma L) with one curve_fit call (their start: all ones).

    loss: finite and > 0; err: finite; same length, at least 3 points. Returns a dict: eps,
    k, gamma; `objective` = `sse`, the sum of squared error residuals; `rse` =
    sqrt(sse / (n - 3)) (nan when n == 3); `converged` (curve_fit converged to finite
    values; if not, the parameters are nan); n.
    """
    loss = _as_array("loss", loss, positive=True)
    err = _as_array("err", err, positive=False)
    if loss.size != err.size:
        raise ValueError(f"loss and err lengths differ: {loss.size} vs {err.size}")
    if loss.size < 3:
        raise ValueError(f"the downstream law has 3 parameters; got {loss.size} points")
    res = _curve_fit(_ds_law, loss, err, list(p0))
    out = {"n": int(loss.size), "converged": res is not None}
    if res is None:
        out.update(eps=math.nan, k=math.nan, gamma=math.nan, objective=math.nan, sse=math.nan,
                   rse=math.nan)
        return out
    (k, gamma, eps), sse = res
    out.update(eps=float(eps), k=float(k), gamma=float(gamma), objective=sse, sse=sse,
               rse=_rse(sse, loss.size, 3))
    return out


def downstream_predict(params: dict, loss) -> np.ndarray:
    """Err(L) = eps - k exp(-gamma L)."""
    return np.asarray(_ds_law(np.asarray(loss, dtype=float), params["k"], params["gamma"],
                              params["eps"]), dtype=float)


# ------------------------------------------------------------------ their RedPajama runs

_NUMERIC = ("n_experts", "top_k", "params_total", "params_active", "params_total_nonembed",
            "params_active_nonembed", "tokens", "flops", "final_eval_loss", "error", "cc_mult")


def load_gadre_rpj() -> list[dict]:
    """The packaged table data/gadre2024_rpj.csv (35 RedPajama runs), numbers as floats and
    held_out as bool. Provenance and column mapping: data/README.md."""
    text = resources.files("moe.scaling").joinpath("data/gadre2024_rpj.csv").read_text()
    rows = []
    for r in csv.DictReader(text.splitlines()):
        r = dict(r)
        for c in _NUMERIC:
            r[c] = float(r[c])
        r["held_out"] = r["held_out"].strip().lower() == "true"
        rows.append(r)
    return rows


def _pick(rows: Sequence[dict], model: str, cc_mult: float) -> dict:
    hits = [r for r in rows if r["model"] == model and float(r["cc_mult"]) == cc_mult]
    if len(hits) != 1:
        raise ValueError(f"expected one run of {model} at cc_mult {cc_mult}; found {len(hits)}")
    return hits[0]


def gadre_fit_rows(rows: Sequence[dict], *, downstream: bool = False) -> list[dict]:
    """Their fit runs from one training set's rows (columns `model`, `cc_mult`): the five
    loss-law runs, plus open_lm_1b at cc_mult 1 when downstream=True. ValueError if one is
    missing or duplicated."""
    runs = GADRE_LOSS_FIT_RUNS + ((GADRE_DOWNSTREAM_EXTRA_RUN,) if downstream else ())
    return [_pick(rows, m, c) for m, c in runs]


def _arrays(rows):
    N = np.array([float(r["params_total"]) for r in rows])
    M = np.array([TOKENS_PER_PARAM_PER_CC * float(r["cc_mult"]) for r in rows])
    loss = np.array([float(r["final_eval_loss"]) for r in rows])
    err = np.array([float(r["error"]) for r in rows])
    return N, M, loss, err


def reproduce_gadre(rows: Sequence[dict] | None = None) -> dict:
    """Fit both laws on their runs and predict the two targets (default: the packaged table).

    Returns {"loss_fit", "downstream_fit", "targets": [{model, cc_mult, M, loss, loss_pred,
    loss_rel_err, error, error_pred, error_rel_err}, ...]}; relative errors are
    |predicted - actual| / actual, as fractions.
    """
    rows = load_gadre_rpj() if rows is None else rows
    N, M, loss, _ = _arrays(gadre_fit_rows(rows))
    lfit = fit_overtraining(N, M, loss)
    _, _, dloss, derr = _arrays(gadre_fit_rows(rows, downstream=True))
    dfit = fit_downstream(dloss, derr)
    targets = []
    for model, cc in GADRE_TARGETS:
        r = _pick(rows, model, cc)
        Nt, Mt, Lt, Et = (v[0] for v in _arrays([r]))
        lp = float(overtraining_predict(lfit, Nt, Mt))
        ep = float(downstream_predict(dfit, lp))
        targets.append({"model": model, "cc_mult": cc, "M": Mt, "loss": Lt, "loss_pred": lp,
                        "loss_rel_err": abs(lp - Lt) / Lt, "error": Et, "error_pred": ep,
                        "error_rel_err": abs(ep - Et) / Et})
    return {"loss_fit": lfit, "downstream_fit": dfit, "targets": targets}


def main() -> None:
    res = reproduce_gadre()
    lf, df = res["loss_fit"], res["downstream_fit"]
    print(f"loss law:       a={lf['a']:.4f} beta={lf['beta']:.4f} b={lf['b']:.6f} E={lf['E']:.6f} "
          f"(sse {lf['sse']:.4e}; {lf['n_converged']}/{lf['n_starts']} starts converged)")
    print(f"downstream law: k={df['k']:.6f} gamma={df['gamma']:.6f} eps={df['eps']:.6f} "
          f"(sse {df['sse']:.4e})")
    for t in res["targets"]:
        print(f"relative error predicting ({t['model']}, M={t['M']:g}) C4 loss: "
              f"{t['loss_rel_err']:.4%}  (predicted {t['loss_pred']:.5f}, actual {t['loss']:.5f})")
    for t in res["targets"]:
        print(f"relative error predicting ({t['model']}, M={t['M']:g}) 17-task top-1 error: "
              f"{t['error_rel_err']:.4%}  (predicted {t['error_pred']:.5f}, actual {t['error']:.5f})")


if __name__ == "__main__":
    main()
