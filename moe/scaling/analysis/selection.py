"""Which runs a law is fitted on: the held-out split, the sparsity levels, one training
recipe for a 1-D law over size, and whether tokens vary independently of size.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import numpy as np

from moe.scaling.table import run_group


def split_holdout(rows: Sequence[dict], holdout: str | None) -> tuple[list, list]:
    """Split rows into (train, held_out).

    holdout="none": nothing held out. "flag": rows with held_out true. None: "flag" if any
    row is flagged, else "largest".

    "largest" (the GPT-4-report check): in each sparsity level (`run_group`, so dense is a
    level like any MoE one) with >= 4 runs, ONE run is held out, so >= 3 remain to fit the
    3-parameter law. It is the run with the largest training budget: the `flop_budget`
    column when the row has one (an IsoFLOP ladder trains several sizes at one nominal
    budget, whose actual FLOPs differ by rounding), else `flops`; ties go to the largest
    params_active. On a size ladder that is each level's top size (dense included); on an
    IsoFLOP ladder, each level's largest size at its top budget. A level with < 4 runs
    keeps all of them.
    """
    rows = list(rows)
    if holdout is None:
        holdout = "flag" if any(r.get("held_out") for r in rows) else "largest"
    if holdout == "none":
        return rows, []
    if holdout == "flag":
        return ([r for r in rows if not r.get("held_out")], [r for r in rows if r.get("held_out")])
    if holdout != "largest":
        raise ValueError(f"holdout must be largest, none or flag; got {holdout!r}")
    held = set()
    for g in level_groups(rows).values():
        if len(g) >= 4:
            held.add(id(max(g, key=lambda r: (r.get("flop_budget") or r["flops"],
                                              r["params_active"]))))
    return [r for r in rows if id(r) not in held], [r for r in rows if id(r) in held]


def level_groups(rows) -> "OrderedDict[str, list]":
    g: dict[str, list] = {}
    for r in rows:
        g.setdefault(run_group(r), []).append(r)
    return OrderedDict(sorted(g.items(), key=lambda kv: (kv[1][0].get("sparsity", 0.0), kv[0])))


def clusters(values: np.ndarray, rtol: float) -> list[np.ndarray]:
    """Index groups of values agreeing within rtol: greedy in ascending order, a group
    spans at most a factor (1 + rtol) from its smallest value (no chaining: 8.2, 9.0, ...,
    13.5 in 10% steps are several groups, not one)."""
    order = np.argsort(values, kind="stable")
    lv = np.log(values[order])
    out, cur, start = [], [order[0]], lv[0]
    for j in range(1, len(order)):
        if lv[j] - start <= math.log1p(rtol):
            cur.append(order[j])
        else:
            out.append(np.array(cur))
            cur, start = [order[j]], lv[j]
    out.append(np.array(cur))
    return out


_RECIPES = {"tokens": "token budget", "tokens_per_param": "tokens/param ratio",
            "tokens_per_nonembed_param": "tokens per non-embedding param"}


def _recipe_value(r: dict, by: str) -> float:
    if by == "tokens":
        return r["tokens"]
    if by == "tokens_per_nonembed_param":
        return r["tokens"] / r["params_active_nonembed"]
    return r["tokens"] / r["params_active"]


def on_recipe(r: dict, recipe: dict) -> bool:
    """Whether a run was trained on `recipe` (a 1-D law's {by, value, rtol})."""
    return abs(math.log(_recipe_value(r, recipe["by"]) / recipe["value"])) <= math.log1p(
        recipe["rtol"])


def one_recipe_subset(rows: Sequence[dict], held: Sequence[dict] = (),
                      rtol: float = 0.1) -> tuple[list, str, dict]:
    """The runs a 1-D law over size may be fitted on, a sentence saying which, the recipe.

    L(N) is a law of size along ONE training recipe: every run at one token budget, or
    every run at one tokens-per-parameter ratio. When neither holds for the whole level
    (e.g. an IsoFLOP ladder, or Gadre et al.'s over-training grid) the recipe with the most
    distinct sizes (held-out runs counted, ties to the one holding more of them) is used and
    the sentence says so: mixing budgets would fit a law of the budgets, not of size. The
    recipe {by: tokens | tokens_per_param | tokens_per_nonembed_param, value, rtol} also
    decides which held-out runs the law may predict (`on_recipe`). Ties between recipes
    that hold the same runs go to the first in that order.
    """
    rows, held = list(rows), list(held)
    allr = rows + held
    best = None
    bys = ["tokens", "tokens_per_param"]
    if all(r.get("params_active_nonembed") for r in allr):  # Kaplan's N: a ladder's rule
        bys.append("tokens_per_nonembed_param")
    for by in bys:
        vals = np.array([_recipe_value(r, by) for r in allr])
        for idx in clusters(vals, rtol):
            sizes = len({allr[i]["params_active"] for i in idx})
            n_held = int(np.sum(idx >= len(rows)))
            gm = float(np.exp(np.mean(np.log(vals[idx]))))
            score = (sizes, n_held, len(idx))
            if best is None or score > best[0]:
                best = (score, {"by": by, "value": gm, "rtol": rtol})
    recipe = best[1]
    sub = [r for r in rows if on_recipe(r, recipe)]
    label = f"{_RECIPES[recipe['by']]} ~ {recipe['value']:.3g}"
    if len(sub) == len(rows):
        return rows, f"all {len(rows)} runs ({label})", recipe
    return (sub, f"{len(sub)} of {len(rows)} runs, those at one {label} (the rest vary the "
            "training recipe, which L(N) does not model)", recipe)


def independent_spread(n: np.ndarray, d: np.ndarray) -> float:
    """Std of the residual of log D regressed on log N: how much the token budget varies
    beyond what size explains. A fixed tokens/param rule gives ~0 even when D/N drifts
    with the embedding share (D = 20 N_nonembed against N_active), and then approach 3
    cannot separate its N and D terms."""
    ln, ld = np.log(n), np.log(d)
    if np.ptp(ln) == 0:
        return float(np.std(ld))
    X = np.column_stack([np.ones_like(ln), ln])
    return float(np.std(ld - X @ np.linalg.lstsq(X, ld, rcond=None)[0]))
