"""What the analysis says run by run: held-out predictions (and Gadre et al.'s chain),
seed noise, sparsity gaps at one size, the ladder's compare runs, and each run's record.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from moe.scaling.analysis.entries import params_of, replicate_params
from moe.scaling.analysis.kinds import law_predict, num
from moe.scaling.analysis.selection import on_recipe
from moe.scaling.table import run_group


def holdout_predictions(held, laws: list[tuple[str, str, str, dict, Sequence[str]]], level):
    """Held-out predictions from every fitted law that covers the run, with intervals."""
    q = 100.0 * (1.0 - level) / 2.0
    out = []
    for r in held:
        run = run_record(r)
        for label, kind, scope, entry, names in laws:
            if entry is None or entry.get("status") == "not_fitted":
                continue
            if scope not in ("all", run_group(r)) and not (scope == "dense" and
                                                           r["kind"] == "dense"):
                continue
            if "recipe" in entry and not on_recipe(r, entry["recipe"]):
                continue  # a 1-D law predicts runs of its own recipe only
            quantity = "error" if kind == "downstream" else "loss"
            actual = r.get("error") if quantity == "error" else r["final_eval_loss"]
            if actual is None:
                continue
            fixed = entry.get("fixed", {})
            pred = law_predict(kind, {**params_of(entry, names), **fixed}, run)
            with np.errstate(all="ignore"):
                reps = [law_predict(kind, {**p, **fixed}, run)
                        for p in replicate_params(entry, names)]
            reps = np.array([v for v in reps if math.isfinite(v)])
            lo, hi = (np.percentile(reps, [q, 100 - q]) if reps.size else (math.nan, math.nan))
            out.append({"run": r["name"], "quantity": quantity, "law": label,
                        "predicted": num(pred), "lo": num(lo), "hi": num(hi),
                        "actual": num(actual), "rel_error": num(pred / actual - 1.0),
                        "bounded": bool(entry.get("bounded", False))})
        out += _chained(r, run, laws, q)
    return out


def _chained(r, run, laws, q) -> list[dict]:
    """Gadre et al.'s chain: error predicted from the over-training law's PREDICTED loss.

    The interval pairs replicate i of the loss law with replicate i of the error law (two
    independent bootstraps, so each pair is a draw from their joint distribution).
    """
    ent = {kind: (e, names) for _, kind, _, e, names in laws
           if kind in ("overtraining", "downstream")}
    if (r.get("error") is None or r["kind"] != "dense" or len(ent) < 2
            or any(e is None or e.get("status") == "not_fitted" for e, _ in ent.values())):
        return []
    (ot, ot_names), (ds, ds_names) = ent["overtraining"], ent["downstream"]

    def chain(p_ot, p_ds):
        return law_predict("downstream", p_ds, {**run, "loss": law_predict("overtraining",
                                                                           p_ot, run)})

    pred = chain(params_of(ot, ot_names), params_of(ds, ds_names))
    with np.errstate(all="ignore"):
        reps = np.array([chain(a, b) for a, b in zip(replicate_params(ot, ot_names),
                                                     replicate_params(ds, ds_names))])
    reps = reps[np.isfinite(reps)]
    lo, hi = np.percentile(reps, [q, 100 - q]) if reps.size else (math.nan, math.nan)
    return [{"run": r["name"], "quantity": "error",
             "law": "downstream Err(L(N, M)), chained from the predicted loss",
             "predicted": num(pred), "lo": num(lo), "hi": num(hi), "actual": r["error"],
             "rel_error": num(pred / r["error"] - 1.0),
             "bounded": bool(ot.get("bounded") and ds.get("bounded"))}]


def seed_noise(rows, seed_rows):
    """Spread of the final loss over seed repeats (group "seed" rows, `repeat_of`)."""
    if not seed_rows:
        return None
    by_name = {r["name"]: r for r in rows}
    groups: dict[str, list] = {}
    for s in seed_rows:
        base = str(s.get("repeat_of") or "").strip()
        if base in by_name:
            groups.setdefault(base, [by_name[base]["final_eval_loss"]])
        groups.setdefault(base or s["name"], []).append(float(s["final_eval_loss"]))
    runs, ss, dof, means = [], 0.0, 0, []
    for name, losses in groups.items():
        if len(losses) < 2:
            continue
        arr = np.array(losses)
        ss += float(((arr - arr.mean()) ** 2).sum())
        dof += len(arr) - 1
        means.append(arr.mean())
        runs.append({"run": name, "n": len(arr), "losses": [float(v) for v in arr],
                     "mean": float(arr.mean()), "std": float(arr.std(ddof=1))})
    if not dof:
        return None
    std = math.sqrt(ss / dof)
    return {"runs": runs, "std": std, "rel_std": std / float(np.mean(means))}


def _seed_key(r):
    """The row's `seed` as an int (or its text), None when the row has none."""
    v = r.get("seed")
    if v is None or (isinstance(v, float) and math.isnan(v)) or not str(v).strip():
        return None
    try:
        f = float(v)
        return int(f) if f == int(f) else f
    except (TypeError, ValueError):
        return str(v).strip()


def _paired(a_runs: dict, b_runs: dict, level: float) -> dict | None:
    """Paired t-test of loss(b) - loss(a) over the seeds both levels ran ({seed: loss})."""
    from scipy import stats

    seeds = sorted(set(a_runs) & set(b_runs), key=str)
    if len(seeds) < 2:
        return None
    d = np.array([b_runs[k] - a_runs[k] for k in seeds])
    n = len(d)
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * se
    t = mean / se if se > 0 else None
    p = float(2.0 * stats.t.sf(abs(t), n - 1)) if t is not None else None
    return {"n": n, "seeds": seeds, "diffs": [float(v) for v in d], "mean": mean, "se": se,
            "lo": mean - half, "hi": mean + half, "level": level, "df": n - 1, "t": t, "p": p}


def sparsity_comparison(rows, seed_rows=(), level=0.95) -> list[dict]:
    """Per active size (the table's `size` label, with its `flop_budget` when given, else
    runs within 5% in params_active and tokens), the loss of every sparsity level and the
    gap of each MoE level to the next denser one (from the grid runs, one per level).

    Where seed repeats exist (group "seed" rows whose `repeat_of` is a grid run here), the
    gap is also tested by PAIRED differences: each level's runs are keyed by their `seed`
    column (the grid run's seed included; rows without one are not paired), the two
    levels' runs at the same seed are paired, and `paired` holds n, the seeds, the
    differences, their mean, standard error, the `level` t interval (lo, hi), t, df and
    the two-sided p of a paired t-test (scipy.stats.t; null t and p when every difference
    is equal). With fewer than two common seeds `paired` is null and `test` says "one run
    per level: no paired test": the gap of two single runs is not judged against a pooled
    seed std (that difference carries the noise of both runs)."""
    by_base: dict[str, dict] = {}
    for s in seed_rows or ():
        k = _seed_key(s)
        if k is not None and str(s.get("repeat_of") or "").strip():
            by_base.setdefault(str(s["repeat_of"]).strip(), {})[k] = float(s["final_eval_loss"])

    def seeds_of(r):
        out = dict(by_base.get(r["name"], {}))
        k = _seed_key(r)
        if k is not None:
            out.setdefault(k, float(r["final_eval_loss"]))
        return out

    groups: dict = {}
    for r in rows:
        if str(r.get("size") or "").strip():
            # an IsoFLOP ladder trains each size at several budgets: compare within one
            key = ("label", str(r["size"]).strip()
                   + (f" @ {r['flop_budget']:.3g} FLOPs" if r.get("flop_budget") else ""))
        else:
            key = next((k for k in groups if k[0] == "near" and abs(math.log(
                r["params_active"] / k[1])) < 0.05 and abs(math.log(r["tokens"] / k[2])) < 0.05),
                ("near", r["params_active"], r["tokens"]))
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in sorted(groups.items(), key=lambda kv: min(r["params_active"] for r in kv[1])):
        if len({run_group(r) for r in rs}) < 2:
            continue
        rs = sorted(rs, key=lambda r: (r["sparsity"], run_group(r)))
        gaps = []
        for a, b in zip(rs, rs[1:]):
            gap = b["final_eval_loss"] - a["final_eval_loss"]
            pr = _paired(seeds_of(a), seeds_of(b), level)
            if pr is None:
                test = "one run per level: no paired test"
            elif pr["p"] is None:
                test = f"paired over {pr['n']} seeds: every difference equal, no t-test"
            else:
                test = f"paired t-test over {pr['n']} seeds: p = {pr['p']:.2g}"
            gaps.append({"from": a["name"], "to": b["name"], "gap": gap, "paired": pr,
                         "test": test})
        out.append({"size": key[1] if key[0] == "label" else rs[0]["name"],
                    "params_active": min(r["params_active"] for r in rs),
                    "losses": {run_group(r): r["final_eval_loss"] for r in rs},
                    "runs": [r["name"] for r in rs], "gaps": gaps})
    return out


def compare_runs(compare_rows):
    if not compare_rows:
        return None
    return [{"run": r["name"], "variant": _variant(r), "seed": _seed_key(r),
             "loss": num(r["final_eval_loss"]),
             "maxvio": num(r.get("maxvio")), "tokens_per_s": num(_maybe(r, "tokens_per_s")),
             "flops": num(r["flops"])} for r in compare_rows]


def _variant(r) -> str:
    """A comparison run's variant: its `repeat_of` (cmp-<variant> for seeded variants), else
    its own name."""
    return str(r.get("repeat_of") or "").strip() or str(r["name"])


def compare_variants(compare_rows, level=0.95) -> list[dict] | None:
    """The comparison variants over their seeds: per variant n, mean and standard error of
    the loss and of MaxVio; and for every variant after the first, the PAIRED difference to
    the first (runs with the same seed paired; `_paired`'s fields, null with fewer than two
    common seeds) in loss and in MaxVio. Null when no variant has two runs."""
    if not compare_rows:
        return None
    by: dict[str, dict] = {}
    for r in compare_rows:
        k = _seed_key(r)
        by.setdefault(_variant(r), {})[k if k is not None else r["name"]] = r
    if all(len(v) < 2 for v in by.values()):
        return None

    def stats(vals):
        a = np.array([v for v in vals if v is not None and math.isfinite(v)], float)
        if not len(a):
            return {"n": 0, "mean": None, "se": None}
        se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None
        return {"n": int(len(a)), "mean": float(a.mean()), "se": se}

    def column(runs, key):
        return {k: float(v) for k, r in runs.items() if (v := num(r.get(key))) is not None}

    names = list(by)
    first = by[names[0]]
    out = []
    for name in names:
        runs = by[name]
        e = {"variant": name, "runs": sorted(r["name"] for r in runs.values()),
             "loss": stats([num(r["final_eval_loss"]) for r in runs.values()]),
             "maxvio": stats([num(r.get("maxvio")) for r in runs.values()]),
             "vs": None if name == names[0] else names[0]}
        if name != names[0]:
            e["paired_loss"] = _paired(column(first, "final_eval_loss"),
                                       column(runs, "final_eval_loss"), level)
            e["paired_maxvio"] = _paired(column(first, "maxvio"), column(runs, "maxvio"), level)
        out.append(e)
    return out


def _maybe(r, k):
    try:
        return float(r.get(k))
    except (TypeError, ValueError):
        return None


def run_record(r) -> dict:
    return {"name": r["name"], "level": run_group(r), "kind": r["kind"],
            "n_experts": int(r["n_experts"]), "top_k": int(r["top_k"]),
            "sparsity": num(r["sparsity"]), "params_active": r["params_active"],
            "params_total": r["params_total"],
            "params_active_nonembed": num(r.get("params_active_nonembed")),
            "params_total_nonembed": num(r.get("params_total_nonembed")),
            "tokens": r["tokens"], "flops": r["flops"], "loss": r["final_eval_loss"],
            "error": num(r.get("error")), "maxvio": num(r.get("maxvio")),
            "held_out": bool(r.get("held_out")),
            **({"epochs": num(r["epochs"])} if "epochs" in r else {})}


def epoch_notes(rows: Sequence[dict]) -> list[str]:
    """A note naming the runs that passed over their data more than once (column epochs)."""
    over = sorted((r for r in rows if r.get("epochs", 0) > 1.0), key=lambda r: -r["epochs"])
    if not over:
        return []
    names = ", ".join(f"{r['name']} ({r['epochs']:.3g})" for r in over[:12])
    more = f" and {len(over) - 12} more" if len(over) > 12 else ""
    return [f"WARNING: {len(over)} fitted run(s) trained more than 1 epoch of their data "
            f"(repeated tokens change the loss curve; the fit mixes in repetition): "
            f"{names}{more}"]
