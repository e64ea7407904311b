"""Which MoE law a ladder supports: the Clark, additive and joint laws fitted on the same
runs, chosen by cross-validation over model size and scored on held-out runs.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from moe.scaling.laws.joint_moe import fit_joint_moe, joint_moe_predict
from moe.scaling.laws.moe_laws import (additive_moe_predict, clark_predict, fit_additive_moe,
                                       fit_clark)


def _col(rows, key):
    return np.array([float(r[key]) for r in rows], float)


def _experts(rows):
    """Expert count per row; dense rows count as 1 whatever their n_experts field says."""
    return np.array([1.0 if r.get("kind") == "dense" else max(1.0, float(r["n_experts"]))
                     for r in rows])


def _tokens(rows):
    """Training tokens per row; a missing "tokens" is a ValueError (reported, not raised)."""
    if any(r.get("tokens") is None for r in rows):
        raise ValueError("rows have no 'tokens': the joint MoE law needs each run's training "
                         "tokens")
    return _col(rows, "tokens")


#: Parameters of each joint law (a fold whose training runs hold no more distinct runs than
#: this interpolates them and is not scored).
JOINT_N_PARAMS = {"clark": 4, "additive": 5, "joint": 9}


def size_groups(rows: Sequence[dict], rtol: float = 0.05) -> list[tuple[str, list[int]]]:
    """Rows grouped by model size, smallest first: [(label, row indices)].

    The table's `size` label when every row has one (a ladder writes it; an IsoFLOP ladder
    trains one size at several budgets and they are one size), else runs whose
    params_active agree within `rtol` (MoE runs of one ladder size differ by a few % in
    active params: the router), greedy from the smallest, no chaining. Groups are ordered
    by their smallest params_active.
    """
    rows = list(rows)
    if not rows:
        return []
    na = np.array([float(r["params_active"]) for r in rows])
    if all(str(r.get("size") or "").strip() for r in rows):
        labels: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            labels.setdefault(str(r["size"]).strip(), []).append(i)
        out = list(labels.items())
    else:
        order = np.argsort(na, kind="stable")
        out, cur = [], [int(order[0])]
        for j in order[1:]:
            if math.log(na[j] / na[cur[0]]) <= math.log1p(rtol):
                cur.append(int(j))
            else:
                out.append(cur)
                cur = [int(j)]
        out.append(cur)
        out = [(f"{na[idx[0]]:.3g}", idx) for idx in out]
    return sorted(out, key=lambda kv: float(na[kv[1]].min()))


def _distinct_runs(rows, active_key, total_key) -> int:
    return len({(float(r[active_key]), float(r[total_key]), r.get("tokens"),
                 float(_experts([r])[0])) for r in rows})


def compare_joint_laws(train_rows: Sequence[dict], heldout_rows: Sequence[dict], *,
                       active_key: str = "params_active", total_key: str = "params_total",
                       e_start: float = 2.0, e_max: float = 256.0, n_folds: int = 3) -> dict:
    """Fit the Clark, the additive and the joint MoE law on train_rows, choose one by
    cross-validation on train_rows alone, and score every law on heldout_rows.

    "joint" is Ludziejewski et al. 2025 (`moe.scaling.laws.joint_moe.fit_joint_moe`: active
    params, training tokens from each row's "tokens", experts; same e_start/e_max as Clark).
    It needs >= 10 runs and token budgets that vary at fixed size; when a table cannot
    identify it (e.g. a fixed tokens/param ladder, or rows without "tokens") its entry holds
    the error and the other laws are compared as before.

    Selection never sees heldout_rows. The candidates are the laws fitted on all of
    train_rows. Cross-validation is forward-chaining over model size (`size_groups`): fold
    j leaves out the j-th largest size among train_rows (j = 1..n_folds, only while >= 2
    smaller sizes remain), fits each law on every training run of a smaller size, and
    scores RMSE of log loss on the left-out size. A law gets no score in a fold where its
    fit raises or its training runs are no more than its parameters (it would interpolate
    them); the fold's entry says why. `better` is the candidate with the lowest mean CV
    RMSE over the folds where every candidate has a score; when no fold has them all, the
    candidate scored in the fewest folds is dropped until one does. Held-out RMSE is
    computed for every fitted law as information and does not enter the choice.

    Score: RMSE of log loss (natural log), which is scale-free and is what every fit sees.
    Returns {"clark": {...}, "additive": {...}, "joint": {...}, "better": name or None,
    "reason": str, "selected_by": str, "cv_folds_used": [size labels]}; each law entry has
    params (or error), train_rmse_log, heldout_rmse_log, cv_rmse_log (mean over the folds
    used for the choice, NaN when not a candidate or not scored there), cv_folds
    [{left_out, params_active, n_train, n_test, rmse_log (NaN when not scored), error}],
    and per-row predictions on the held-out rows.
    """
    train_rows, heldout_rows = list(train_rows), list(heldout_rows)
    laws = _law_fns(active_key, total_key, e_start, e_max)
    out = _fit_all(laws, train_rows, heldout_rows)
    # Cross-validation over sizes, on train_rows only.
    folds = _size_folds(train_rows, n_folds)
    candidates = [k for k in laws if out[k]["params"] is not None]
    for name, (fit, pred) in laws.items():
        out[name]["cv_folds"] = _cv_folds(name, fit, pred, folds, active_key, total_key)
    return _choose(out, list(laws), candidates, folds)


def _rmse(pred, y):
    return float(np.sqrt(np.mean((np.log(pred) - y) ** 2))) if y.size else float("nan")


#: what a law's fit or prediction raises when the rows cannot give it
_LAW_ERRORS = (ValueError, RuntimeError, np.linalg.LinAlgError)


def _law_fns(active_key, total_key, e_start, e_max) -> dict:
    """{law: (fit(rows) -> params, predict(params, rows) -> losses)}."""
    return {
        "clark": (lambda rows: fit_clark(_col(rows, active_key), _experts(rows),
                                         _col(rows, "final_eval_loss"),
                                         e_start=e_start, e_max=e_max),
                  lambda p, rows: clark_predict(p, _col(rows, active_key), _experts(rows))),
        "additive": (lambda rows: fit_additive_moe(_col(rows, active_key), _col(rows, total_key),
                                                   _col(rows, "final_eval_loss")),
                     lambda p, rows: additive_moe_predict(p, _col(rows, active_key),
                                                          _col(rows, total_key))),
        "joint": (lambda rows: fit_joint_moe(_col(rows, active_key), _tokens(rows),
                                             _experts(rows), _col(rows, "final_eval_loss"),
                                             e_start=e_start, e_max=e_max),
                  lambda p, rows: joint_moe_predict(p, _col(rows, active_key), _tokens(rows),
                                                    _experts(rows))),
    }


def _fit_all(laws: dict, train_rows: list, heldout_rows: list) -> dict:
    """Every law fitted on train_rows: params (or the error), train and held-out RMSE,
    predictions on the held-out rows."""
    out: dict = {}
    y_tr = np.log(_col(train_rows, "final_eval_loss"))
    y_ho = np.log(_col(heldout_rows, "final_eval_loss")) if heldout_rows else np.empty(0)
    for name, (fit, pred) in laws.items():
        try:  # predictions too: held-out rows can lack a column the fit had (e.g. tokens)
            p = fit(train_rows)
            tr_pred = pred(p, train_rows)
            ho_pred = pred(p, heldout_rows) if heldout_rows else np.empty(0)
        except _LAW_ERRORS as exc:
            out[name] = {"params": None, "error": str(exc), "train_rmse_log": float("nan"),
                         "heldout_rmse_log": float("nan"), "predictions": []}
            continue
        out[name] = {
            # without the fit's internal problem (arrays): params are the law's values
            "params": {k: v for k, v in p.items() if k != "_problem"}, "error": None,
            "train_rmse_log": _rmse(tr_pred, y_tr),
            "heldout_rmse_log": _rmse(ho_pred, y_ho),
            "predictions": [{"name": r.get("name"), "actual": float(r["final_eval_loss"]),
                             "predicted": float(v)} for r, v in zip(heldout_rows, ho_pred)],
        }
    return out


def _size_folds(train_rows: list, n_folds: int) -> list:
    """[(left-out size label, fit rows, test rows)]: fold j leaves out the j-th largest
    size, while >= 2 smaller sizes remain."""
    groups = size_groups(train_rows)
    folds = []
    for j in range(1, n_folds + 1):
        if len(groups) - j < 2:
            break
        label, test_idx = groups[-j]
        fit_rows = [train_rows[i] for _, idx in groups[:-j] for i in idx]
        folds.append((label, fit_rows, [train_rows[i] for i in test_idx]))
    return folds


def _cv_folds(name, fit, pred, folds, active_key, total_key) -> list[dict]:
    """One law's score in each fold (NaN, with the error, where it is not scored)."""
    cv = []
    for label, fit_rows, test in folds:
        rec = {"left_out": label,
               "params_active": float(min(r[active_key] for r in test)),
               "n_train": len(fit_rows), "n_test": len(test), "rmse_log": float("nan"),
               "error": None}
        d = _distinct_runs(fit_rows, active_key, total_key)
        if d <= JOINT_N_PARAMS[name]:
            rec["error"] = (f"{d} distinct training runs for {JOINT_N_PARAMS[name]} "
                            "parameters: the fit would interpolate them")
        else:
            try:
                with np.errstate(all="ignore"):
                    rec["rmse_log"] = _rmse(pred(fit(fit_rows), test),
                                            np.log(_col(test, "final_eval_loss")))
                if not math.isfinite(rec["rmse_log"]):
                    rec["error"] = "prediction on the left-out size is not finite"
            except _LAW_ERRORS as exc:
                rec["error"] = str(exc)
        cv.append(rec)
    return cv


def _choose(out: dict, laws: list, candidates: list, folds: list) -> dict:
    """The law with the lowest mean CV RMSE over the folds every remaining candidate was
    scored in (dropping the candidate scored in the fewest folds until one such fold
    exists); `out` with cv_rmse_log, better, reason, selected_by, cv_folds_used."""
    def scored(k):
        return {f["left_out"] for f in out[k]["cv_folds"] if math.isfinite(f["rmse_log"])}

    cands = [k for k in candidates if scored(k)]
    dropped = [k for k in candidates if k not in cands]
    used: list = []
    while cands:
        common = set.intersection(*(scored(k) for k in cands))
        used = [lab for lab, _, _ in folds if lab in common]
        if used:
            break
        worst = min(cands, key=lambda k: (len(scored(k)), -candidates.index(k)))
        dropped.append(worst)
        cands.remove(worst)
    for k in laws:
        fs = [f["rmse_log"] for f in out[k]["cv_folds"] if f["left_out"] in used]
        out[k]["cv_rmse_log"] = (float(np.mean(fs)) if k in cands and fs
                                 else float("nan"))
    sizes = ", ".join(lab for lab, _, _ in folds) or "none"
    out["cv_folds_used"] = used
    out["selected_by"] = (
        "cross-validation on fitted runs (leave the largest remaining active size out in "
        f"turn: {len(folds)} fold(s), left out {sizes}; mean RMSE(log L) over the "
        f"{len(used)} fold(s) where every candidate law was fitted: "
        f"{', '.join(used) or 'none'}); held-out runs not used")
    held_info = ", ".join(f"{k} held-out RMSE(log L) {out[k]['heldout_rmse_log']:.4g}"
                          for k in laws if np.isfinite(out[k]["heldout_rmse_log"]))
    if not candidates:
        out["better"], out["reason"] = None, "no law could be fitted"
        return out
    if not cands:
        out["better"] = None
        out["reason"] = ("no law could be cross-validated: "
                         + ("fewer than 3 distinct sizes among the fitted runs" if not folds
                            else "no candidate was fitted in any fold")
                         + (f"; for information, {held_info}" if held_info else ""))
        return out
    best = min(cands, key=lambda k: out[k]["cv_rmse_log"])
    out["better"] = best
    out["reason"] = ("CV RMSE(log L) " + ", ".join(f"{k} {out[k]['cv_rmse_log']:.4g}"
                                                   for k in cands)
                     + (f"; not cross-validated in a common fold: {', '.join(dropped)}"
                        if dropped else "")
                     + (f"; for information, not used to choose: {held_info}"
                        if held_info else "; no held-out runs"))
    return out
