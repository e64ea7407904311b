"""Scaling report: fits, bootstrap intervals, extrapolation check, plots -> report.md.

    moe-testbed fit runs/results.csv --out runs/scaling_report --n-boot 200 --holdout largest

(`fit_main` is the body of that subcommand.) What the report contains, in order:
per-sparsity power laws L(N_active) = E + A/N^alpha (both counting conventions), compute
laws L(C) = a C^b + c, Chinchilla approach 3 where tokens/param varies enough to identify
it, the two MoE joint laws (Clark; additive), efficiency leverage, MaxVio, and the
extrapolation check: held-out runs (the largest by FLOPs in each sparsity level, or rows
flagged held_out) are left out of every fit and predicted. Any fit that cannot be made is
reported as such with the reason; the report never fails because one law has too few runs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from moe.scaling.resample import bootstrap
from moe.scaling.fits import (chinchilla_frontier, chinchilla_predict, compare_joint_laws,
                              compute_law_predict, efficiency_leverage, fit_chinchilla,
                              fit_compute_law, fit_power_law, power_law_predict)
from moe.scaling.results import ResultsError, load_results, run_group, validate_rows

__all__ = ["write_report", "fit_main", "split_holdout"]

_FIT_ERRORS = (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError)



def _save(fig, plt, out: Path, name: str, pngs: list) -> None:
    """Write one report figure (110 dpi), close it, and list it for the report."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    pngs.append(name)

def _col(rows, key):
    return np.array([float(r[key]) for r in rows], float)


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(v):
        return "nan"
    return f"{v:.{digits}g}"


def _ci(s: dict) -> str:
    return f"{_fmt(s['estimate'])} [{_fmt(s['lo'])}, {_fmt(s['hi'])}]"


def _pct(pred, actual) -> str:
    return _fmt(100.0 * (pred - actual) / actual, 3) + "%"


def split_holdout(rows: Sequence[dict], holdout: str | None) -> tuple[list, list]:
    """Split rows into (train, held_out).

    holdout="none": nothing held out. "flag": rows with held_out true. "largest": in each
    sparsity level (`run_group`) with >= 4 runs, the run with the most training FLOPs (so
    >= 3 runs remain to fit the 3-parameter law; the GPT-4-report check, one per level).
    None: "flag" if any row is flagged, else "largest".
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
    groups: dict[str, list] = OrderedDict()
    for r in rows:
        groups.setdefault(run_group(r), []).append(r)
    held = set()
    for g in groups.values():
        if len(g) >= 4:
            held.add(id(max(g, key=lambda r: r["flops"])))
    return [r for r in rows if id(r) not in held], [r for r in rows if id(r) in held]


def _groups(rows):
    g: dict[str, list] = {}
    for r in rows:
        g.setdefault(run_group(r), []).append(r)
    return OrderedDict(sorted(g.items(), key=lambda kv: (kv[1][0]["sparsity"], kv[0])))


def _boot_power(rows, xkey, heldout, n_boot, seed, level, law="power"):
    """Point fit + bootstrap of a 1-D law over x=rows[xkey]; band on a grid, held-out preds."""
    fit = fit_power_law if law == "power" else fit_compute_law
    predict = power_law_predict if law == "power" else compute_law_predict
    xs = np.concatenate([_col(rows, xkey), _col(heldout, xkey) if heldout else []])
    grid = np.logspace(np.log10(xs.min() / 1.5), np.log10(xs.max() * 1.5), 40)
    derived = {f"_g{i}": (lambda p, x=x: float(predict(p, x))) for i, x in enumerate(grid)}
    for r in heldout:
        derived[f"pred:{r['name']}"] = lambda p, x=float(r[xkey]): float(predict(p, x))
    names = ["E", "A", "alpha"] if law == "power" else ["a", "b", "c"]
    bs = bootstrap(lambda rs: fit(_col(rs, xkey), _col(rs, "final_eval_loss")), rows,
                   n_boot=n_boot, seed=seed, derived=derived, level=level, params=names,
                   keep_samples=False)
    band = np.array([[bs["derived"][f"_g{i}"][k] for k in ("estimate", "lo", "hi")]
                     for i in range(len(grid))])
    return bs, grid, band


def _clip_y(ax, rows):
    """Keep the data in view: bootstrap bands of a 4-run fit can reach 10x the losses."""
    L = _col(rows, "final_eval_loss")
    ax.set_ylim(L.min() / 1.15, L.max() * 1.3)


class _Plots:
    """pyplot-like shim over matplotlib.figure.Figure (Agg canvas when saved to PNG).

    Figures are made without pyplot so writing a report neither switches the caller's
    backend (a notebook, a GUI) nor leaves figures in pyplot's global registry.
    """

    def __init__(self):
        import matplotlib

        self.rcParams = matplotlib.rcParams

    @staticmethod
    def subplots(figsize):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig, fig.subplots()

    @staticmethod
    def close(fig):
        fig.clear()


def _plot_setup():
    return _Plots()


def write_report(rows: Sequence[dict], out_dir, *, n_boot: int = 200, holdout: str | None = None,
                 seed: int = 0, level: float = 0.95, source: str = "rows",
                 chinchilla_min_runs: int = 8, notes: Sequence[str] = ()) -> Path:
    """Fit every law the table supports, bootstrap them; write report.md, report.json, PNGs.

    rows: run dicts (from `load_results`, or e.g. `chinchilla_rows()`); they are validated
    again here. holdout: "largest" | "flag" | "none" | None (see `split_holdout`).
    n_boot: bootstrap replicates per fit (whole runs resampled, full refit each time).
    Chinchilla approach 3 is fitted on dense runs when there are >= chinchilla_min_runs of
    them and tokens/param varies (std of log(D/N) > 0.1); on a fixed-ratio ladder it is not
    identifiable and the report says so. `notes`: extra lines for the report's header
    (fit_main lists the rows it skipped). Returns the path of report.md.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = validate_rows(rows, source=source)
    train, held = split_holdout(rows, holdout)
    if len(train) < 3:
        raise ResultsError(f"{source}: only {len(train)} run(s) left to fit after holding out "
                           f"{len(held)}; a fit needs at least 3")
    plt = _plot_setup()
    md: list[str] = []
    w = md.append
    pngs: list[str] = []
    groups = _groups(train)
    held_groups = _groups(held) if held else {}
    n_dense = sum(r["kind"] == "dense" for r in rows)
    w("# Scaling report\n")
    w(f"Source: `{source}`. {len(rows)} runs ({n_dense} dense, {len(rows) - n_dense} MoE); "
      f"{len(train)} fitted, {len(held)} held out for the extrapolation check"
      + (f" ({', '.join(r['name'] for r in held)})" if held else "") + ".")
    w(f"Intervals: {int(level * 100)}% percentile bootstrap over whole runs, {n_boot} "
      "replicates, every replicate re-runs the full multi-start fit. Losses are final eval "
      "losses; fits minimise summed Huber (delta 1e-3) of log loss.\n")
    for note in notes:
        w(f"- {note}")
    if notes:
        w("")

    # ---------------------------------------------------------- per-sparsity power laws
    w("## Loss vs active parameters: L(N) = E + A / N^alpha per sparsity level\n")
    w("| level | sparsity | runs | E | A | alpha | failed replicates |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    power: dict[str, dict] = {}
    conv_rows = []
    for gi, (g, gr) in enumerate(groups.items()):
        ho = held_groups.get(g, [])
        try:
            bs, grid, band = _boot_power(gr, "params_active", ho, n_boot, seed + gi, level)
        except _FIT_ERRORS as exc:
            w(f"| {g} | {_fmt(gr[0]['sparsity'], 3)} | {len(gr)} | not fitted: {exc} | | | |")
            continue
        power[g] = {"bs": bs, "grid": grid, "band": band}
        p = bs["params"]
        w(f"| {g} | {_fmt(gr[0]['sparsity'], 3)} | {len(gr)} | {_ci(p['E'])} | {_ci(p['A'])} | "
          f"{_ci(p['alpha'])} | {bs['n_failed']}/{n_boot} |")
        for key in ("params_active", "params_active_nonembed"):
            try:
                f = fit_power_law(_col(gr, key), _col(gr, "final_eval_loss"))
                conv_rows.append(f"| {g} | {key} | {_fmt(f['E'])} | {_fmt(f['alpha'])} | "
                                 f"{_fmt(f['objective_sum'])} |")
            except _FIT_ERRORS as exc:
                conv_rows.append(f"| {g} | {key} | not fitted: {exc} | | |")
    if not groups:
        w("\nNo runs to fit.")
    few = [g for g, gr in groups.items() if len(gr) < 6]
    if few:
        w(f"\nFew runs in {', '.join(few)}: a whole-run bootstrap of a 3-parameter law over "
          "< 6 runs mostly redraws the same few sizes (replicates with < 3 distinct sizes "
          "fail and are dropped), so those intervals understate the uncertainty.")
    w("\nCounting conventions (point fits; embeddings dominate tiny models, so the exponent "
      "can differ):\n")
    w("| level | N counted as | E | alpha | objective |")
    w("| --- | --- | --- | --- | --- |")
    md.extend(conv_rows)
    w("")

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def color(i):
        return colors[i % len(colors)]

    fig, ax = plt.subplots(figsize=(7, 5))
    for gi, (g, gr) in enumerate(groups.items()):
        c = color(gi)
        ax.scatter(_col(gr, "params_active"), _col(gr, "final_eval_loss"), color=c, s=18,
                   label=g)
        ho = held_groups.get(g, [])
        if ho:
            ax.scatter(_col(ho, "params_active"), _col(ho, "final_eval_loss"), color=c, s=60,
                       marker="*", edgecolor="k", zorder=5)
        if g in power:
            grid, band = power[g]["grid"], power[g]["band"]
            ax.plot(grid, band[:, 0], color=c, lw=1.2)
            ax.fill_between(grid, band[:, 1], band[:, 2], color=c, alpha=0.2, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("active parameters")
    ax.set_ylabel("final eval loss")
    _clip_y(ax, rows)
    ax.set_title("Loss vs active params (stars: held out; bands: bootstrap)")
    ax.legend(fontsize=7)
    _save(fig, plt, out, "loss_vs_active_params.png", pngs)

    fig, ax = plt.subplots(figsize=(7, 5))
    for gi, (g, gr) in enumerate(groups.items()):
        allr = sorted(gr + held_groups.get(g, []), key=lambda r: r["params_total"])
        ax.plot(_col(allr, "params_total"), _col(allr, "final_eval_loss"), "o-", color=color(gi),
                ms=4, lw=0.8, label=g)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total parameters")
    ax.set_ylabel("final eval loss")
    ax.set_title("Loss vs total params")
    ax.legend(fontsize=7)
    _save(fig, plt, out, "loss_vs_total_params.png", pngs)

    # ------------------------------------------------------------------- compute laws
    w("## Loss vs training compute: L(C) = a C^b + c per sparsity level\n")
    w("| level | runs | a | b | c | failed replicates |")
    w("| --- | --- | --- | --- | --- | --- |")
    claw: dict[str, dict] = {}
    for gi, (g, gr) in enumerate(groups.items()):
        ho = held_groups.get(g, [])
        try:
            bs, grid, band = _boot_power(gr, "flops", ho, n_boot, seed + 100 + gi, level,
                                         law="compute")
        except _FIT_ERRORS as exc:
            w(f"| {g} | {len(gr)} | not fitted: {exc} | | | |")
            continue
        claw[g] = {"bs": bs, "grid": grid, "band": band}
        p = bs["params"]
        w(f"| {g} | {len(gr)} | {_ci(p['a'])} | {_ci(p['b'])} | {_ci(p['c'])} | "
          f"{bs['n_failed']}/{n_boot} |")
    w("")
    fig, ax = plt.subplots(figsize=(7, 5))
    for gi, (g, gr) in enumerate(groups.items()):
        c = color(gi)
        ax.scatter(_col(gr, "flops"), _col(gr, "final_eval_loss"), color=c, s=18, label=g)
        if g in claw:
            grid, band = claw[g]["grid"], claw[g]["band"]
            ax.plot(grid, band[:, 0], color=c, lw=1.2)
            ax.fill_between(grid, band[:, 1], band[:, 2], color=c, alpha=0.2, lw=0)
        for r in held_groups.get(g, []):
            ax.scatter([r["flops"]], [r["final_eval_loss"]], color=c, s=70, marker="*",
                       edgecolor="k", zorder=5)
            if g in claw:
                s = claw[g]["bs"]["derived"][f"pred:{r['name']}"]
                ax.errorbar([r["flops"]], [s["estimate"]],
                            yerr=[[max(s["estimate"] - s["lo"], 0)], [max(s["hi"] - s["estimate"], 0)]],
                            fmt="x", color="k", capsize=3, zorder=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final eval loss")
    _clip_y(ax, rows)
    ax.set_title("Loss vs compute (star: held-out actual; x: predicted with interval)")
    ax.legend(fontsize=7)
    _save(fig, plt, out, "loss_vs_flops.png", pngs)

    # ----------------------------------------------------------- Chinchilla approach 3
    w("## Chinchilla approach 3 on dense runs: L(N, D) = E + A/N^alpha + B/D^beta\n")
    dense_tr = [r for r in train if r["kind"] == "dense"]
    dense_ho = [r for r in held if r["kind"] == "dense"]
    chin = None
    if len(dense_tr) < chinchilla_min_runs:
        w(f"Not fitted: {len(dense_tr)} dense runs; approach 3 needs >= {chinchilla_min_runs}.\n")
    else:
        ratio_sd = float(np.std(np.log(_col(dense_tr, "tokens") / _col(dense_tr, "params_active"))))
        if ratio_sd <= 0.1:
            w(f"Not fitted: tokens/param barely varies across dense runs (std of log(D/N) = "
              f"{ratio_sd:.3g}), so the N and D terms cannot be told apart. Train some sizes "
              "at several token budgets to identify it.\n")
        else:
            c_ref = float(max(r["flops"] for r in rows))
            derived = {"a (N_opt ~ C^a)": lambda p: p["beta"] / (p["alpha"] + p["beta"]),
                       "b (D_opt ~ C^b)": lambda p: p["alpha"] / (p["alpha"] + p["beta"]),
                       f"N_opt at C={c_ref:.3g}": lambda p: chinchilla_frontier(p, c_ref)[0],
                       f"L_opt at C={c_ref:.3g}": lambda p: chinchilla_frontier(p, c_ref)[2]}
            for r in dense_ho:
                derived[f"pred:{r['name']}"] = (lambda p, r=r: float(chinchilla_predict(
                    p, r["params_active"], r["tokens"])))
            try:
                chin = bootstrap(lambda rs: fit_chinchilla(_col(rs, "params_active"),
                                                           _col(rs, "tokens"),
                                                           _col(rs, "final_eval_loss")),
                                 dense_tr, n_boot=n_boot, seed=seed + 200, level=level,
                                 derived=derived, keep_samples=False,
                                 params=["E", "A", "B", "alpha", "beta"])
            except _FIT_ERRORS as exc:
                w(f"Not fitted: {exc}\n")
            if chin is not None:
                pt = chin["point"]
                w(f"{len(dense_tr)} dense runs; summed objective {_fmt(pt['objective'])}, "
                  f"L-BFGS converged: {pt['converged']}; {chin['n_failed']}/{n_boot} replicates failed.\n")
                w("| quantity | estimate [interval] | bootstrap median |")
                w("| --- | --- | --- |")
                for k, s in list(chin["params"].items()) + [
                        (k, s) for k, s in chin["derived"].items() if not k.startswith("pred:")]:
                    w(f"| {k} | {_ci(s)} | {_fmt(s['median'])} |")
                w("")
                fig, ax = plt.subplots(figsize=(5.5, 5))
                pred = chinchilla_predict(pt, _col(dense_tr, "params_active"), _col(dense_tr, "tokens"))
                act = _col(dense_tr, "final_eval_loss")
                sc = ax.scatter(act, pred, c=np.log10(_col(dense_tr, "flops")), s=12, cmap="viridis")
                lo, hi = min(act.min(), pred.min()), max(act.max(), pred.max())
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
                fig.colorbar(sc, ax=ax, label="log10 FLOPs")
                ax.set_xlabel("actual loss")
                ax.set_ylabel("approach-3 prediction")
                ax.set_title("Chinchilla approach 3: predicted vs actual")
                _save(fig, plt, out, "chinchilla_fit.png", pngs)

    # ------------------------------------------------------------------ MoE joint laws
    w("## MoE joint laws\n")
    moe_tr = [r for r in train if r["kind"] == "moe"]
    joint = None
    if not moe_tr:
        w("Not fitted: no MoE runs in the table, so neither joint law (Clark et al.: "
          "log L = a log N + b log E' + c log N log E' + d; additive: "
          "L = E0 + A/N_active^alpha + B/N_total^beta) can be fitted.\n")
    else:
        joint = compare_joint_laws(train, held)
        w("Clark et al. (E' saturating transform, E_start 2, E_max 256; dense runs have E' = 1) "
          "and the additive law, fitted on all non-held-out runs; scored by RMSE of log loss.\n")
        w("| law | parameters | train RMSE(log L) | held-out RMSE(log L) |")
        w("| --- | --- | --- | --- |")
        for name in ("clark", "additive"):
            j = joint[name]
            if j["params"] is None:
                w(f"| {name} | not fitted: {j['error']} | | |")
                continue
            keys = ("a", "b", "c", "d") if name == "clark" else ("E0", "A", "alpha", "B", "beta")
            ps = ", ".join(f"{k}={_fmt(j['params'][k])}" for k in keys)
            w(f"| {name} | {ps} | {_fmt(j['train_rmse_log'])} | {_fmt(j['heldout_rmse_log'])} |")
        w(f"\nBetter on held-out runs: **{joint['better'] or 'undecided'}** ({joint['reason']}).\n")

    # ------------------------------------------------------------- efficiency leverage
    w("## Efficiency leverage\n")
    lev = {}
    if "dense" not in power:
        w("Not computed: no dense power-law fit (needs >= 3 dense runs).\n")
    elif not any(r["kind"] == "moe" for r in rows):
        w("Not computed: no MoE runs.\n")
    else:
        moe_all = [r for r in rows if r["kind"] == "moe"]
        lev["params"] = efficiency_leverage(moe_all, power["dense"]["bs"]["point"], by="params")
        if "dense" in claw:
            lev["compute"] = efficiency_leverage(moe_all, claw["dense"]["bs"]["point"], by="compute")
        w("EL(params) = active size a dense model needs (dense fit L(N)) to reach the run's "
          "loss / the run's active size; EL(compute) the same with FLOPs and the dense L(C).\n")
        w("| run | level | sparsity | loss | EL(params) | EL(compute) | note |")
        w("| --- | --- | --- | --- | --- | --- | --- |")
        for i, r in enumerate(moe_all):
            lp = lev["params"][i]
            lc = lev["compute"][i] if "compute" in lev else None
            note = lp["reason"] or (lc["reason"] if lc else "")
            w(f"| {r['name']} | {run_group(r)} | {_fmt(r['sparsity'], 3)} | {_fmt(r['final_eval_loss'])} "
              f"| {_fmt(lp['leverage'])} | {_fmt(lc['leverage']) if lc else '-'} | {note} |")
        w("")
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for j, (k, m) in enumerate((("params", "o"), ("compute", "s"))):
            if k not in lev:
                continue
            sp = np.array([r["sparsity"] for r in moe_all])
            el = np.array([d["leverage"] for d in lev[k]])
            ok = np.isfinite(el)
            ax.scatter(sp[ok], el[ok], marker=m, label=f"EL ({k})", color=color(j))
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("sparsity (1 - top_k / n_experts)")
        ax.set_ylabel("efficiency leverage vs dense")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title("Efficiency leverage vs sparsity")
        _save(fig, plt, out, "efficiency_leverage.png", pngs)

    # --------------------------------------------------------------------- MaxVio
    mv = [r for r in rows if "maxvio" in r]
    if mv:
        w("## Load balance (MaxVio)\n")
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(mv)), 4))
        ax.bar(range(len(mv)), [r["maxvio"] for r in mv], color=color(0))
        ax.set_xticks(range(len(mv)))
        ax.set_xticklabels([r["name"] for r in mv], rotation=70, fontsize=6)
        ax.set_ylabel("MaxVio")
        ax.set_title("MaxVio per run")
        _save(fig, plt, out, "maxvio.png", pngs)
        w("| run | MaxVio |\n| --- | --- |")
        for r in mv:
            w(f"| {r['name']} | {_fmt(r['maxvio'])} |")
        w("")

    # ------------------------------------------------------------- extrapolation check
    w("## Extrapolation check (held-out runs predicted from the fits)\n")
    if not held:
        w("No runs held out (holdout=none, or no level has >= 4 runs), so there is no "
          "extrapolation check.\n")
    else:
        w("| run | law | predicted [interval] | actual | error |")
        w("| --- | --- | --- | --- | --- |")
        for r in held:
            g = run_group(r)
            act = r["final_eval_loss"]
            preds = []
            if g in power:
                preds.append(("L(N_active), " + g, power[g]["bs"]["derived"][f"pred:{r['name']}"]))
            if g in claw:
                preds.append(("L(C), " + g, claw[g]["bs"]["derived"][f"pred:{r['name']}"]))
            if chin is not None and f"pred:{r['name']}" in chin["derived"]:
                preds.append(("Chinchilla L(N, D)", chin["derived"][f"pred:{r['name']}"]))
            if joint is not None:
                for name in ("clark", "additive"):
                    for p in joint[name]["predictions"]:
                        if p["name"] == r["name"]:
                            preds.append((f"{name} joint law",
                                          {"estimate": p["predicted"], "lo": float("nan"),
                                           "hi": float("nan")}))
            if not preds:
                w(f"| {r['name']} | none fitted for level {g} | | {_fmt(act)} | |")
            for law, s in preds:
                iv = "" if not math.isfinite(s["lo"]) else f" [{_fmt(s['lo'])}, {_fmt(s['hi'])}]"
                w(f"| {r['name']} | {law} | {_fmt(s['estimate'])}{iv} | {_fmt(act)} | "
                  f"{_pct(s['estimate'], act)} |")
        w("")
    w("## Figures\n")
    for p in pngs:
        w(f"![{p}]({p})")
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    # The same numbers for machines (dashboards, regression checks), beside the prose.
    summary = {
        "source": source, "n_runs": len(rows), "n_boot": n_boot, "level": level,
        "held_out": [r["name"] for r in held],
        "power_law_active": {g: {"params": v["bs"]["params"], "n_failed": v["bs"]["n_failed"],
                                 "held_out_pred": {k[5:]: s for k, s in v["bs"]["derived"].items()
                                                   if k.startswith("pred:")}}
                             for g, v in power.items()},
        "compute_law": {g: {"params": v["bs"]["params"], "n_failed": v["bs"]["n_failed"],
                            "held_out_pred": {k[5:]: s for k, s in v["bs"]["derived"].items()
                                              if k.startswith("pred:")}}
                        for g, v in claw.items()},
        "chinchilla": None if chin is None else {"params": chin["params"],
                                                 "derived": chin["derived"],
                                                 "objective": chin["point"]["objective"],
                                                 "n_failed": chin["n_failed"]},
        "joint": None if joint is None else {
            k: ({"params": {pk: pv for pk, pv in joint[k]["params"].items()
                            if not pk.startswith("_")} if joint[k]["params"] else None,
                 "error": joint[k]["error"], "train_rmse_log": joint[k]["train_rmse_log"],
                 "heldout_rmse_log": joint[k]["heldout_rmse_log"]})
            for k in ("clark", "additive")} | {"better": joint["better"]},
        "efficiency_leverage": lev,
        "pngs": pngs,
    }
    (out / "report.json").write_text(json.dumps(_jsonable(summary), indent=1) + "\n")
    return path


def _jsonable(o):
    """numpy scalars -> float, NaN/inf -> None (strict JSON), containers recursively."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if o is None or isinstance(o, str):
        return o
    return str(o)


def fit_main(argv: list[str] | None = None) -> int:
    """`moe-testbed fit RESULTS [--out DIR] [--n-boot N] [--holdout largest|none|flag]`.

    Loads and validates the results table, writes the report, prints its path; returns 0.
    A bad table (or a missing file) prints one line `error: ...` to stderr and returns 2.
    """
    ap = argparse.ArgumentParser(prog="moe-testbed fit",
                                 description="Fit scaling laws to a results table and write a report.")
    ap.add_argument("results", help="results table, .csv or .jsonl (one row per run)")
    ap.add_argument("--out", default=None,
                    help="output directory (default: scaling_report next to RESULTS)")
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates (default 200)")
    ap.add_argument("--holdout", choices=("largest", "none", "flag"), default=None,
                    help="runs to hold out and predict: the largest by FLOPs per sparsity level, "
                         "none, or rows flagged held_out (default: flag if any row is flagged, "
                         "else largest)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the error
        return int(exc.code or 0)
    if args.n_boot < 1:
        print("error: --n-boot must be >= 1", file=sys.stderr)
        return 2
    path = Path(args.results)
    try:
        skipped: list = []
        rows = load_results(path, skipped=skipped)
        out = Path(args.out) if args.out else path.parent / "scaling_report"
        notes = [f"not fitted: {n} ({why})" for n, why in skipped]
        report = write_report(rows, out, n_boot=args.n_boot, holdout=args.holdout,
                              seed=args.seed, source=path.name, notes=notes)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError:
        print(f"error: no results table at {path}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0
