"""Scaling report: analyse -> write fits.json -> render report.md and figures from it.

    moe-testbed fit runs/results.csv --out runs/scaling_report --n-boot 200 --holdout largest

`write_report` reads top to bottom as the three steps: `analyse` (moe/scaling/analysis/:
every fit, bootstrap interval, prediction and comparison, as one dict whose schema
analysis/schema.py documents), `write_fits` (fits.json), then `render_report`, which reads ONLY the
fits.json dict: report.md here, the PNGs in moe/scaling/figures.py. Re-rendering a saved
fits.json (`render_report(read_fits(dir), dir)`) gives the same report without refitting.
`fit_main` is the body of `moe-testbed fit`.

report.md never prints an interval the data does not bound: a law whose interval is
unbounded or whose optimiser did not converge is marked so, with the reason, in place of
the interval (see analysis/schema.py for the rule).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

from moe.scaling.analysis.analyse import analyse
from moe.scaling.analysis.schema import read_fits, write_fits
from moe.scaling.analysis.selection import split_holdout
from moe.scaling.figures import draw_all
from moe.scaling.table import ResultsError, load_results

__all__ = ["write_report", "render_report", "fit_main", "split_holdout", "fmt_iv"]

#: The parameters report.md prints per joint law (fits.json keeps every fitted value).
JOINT_SHOWN = {"clark": ("a", "b", "c", "d"),
               "additive": ("E0", "A", "alpha", "B", "beta"),
               "joint": ("a", "alpha", "gamma", "delta", "b", "beta", "zeta", "omega", "c")}
#: What a non-ok law's cells say instead of a number (its reason follows the table).
STATUS_WORDS = {"unbounded": "interval unbounded", "not_converged": "NOT CONVERGED",
                "degenerate": "degenerate fit", "unidentified": "replicates in two modes"}


# ----------------------------------------------------------------------- the steps


def write_report(rows: Sequence[dict], out_dir, *, n_boot: int = 200,
                 holdout: str | None = None, seed: int = 0, level: float = 0.95,
                 source: str = "rows", chinchilla_min_runs: int = 8,
                 notes: Sequence[str] = (), side: dict | None = None,
                 progress: bool | None = None) -> Path:
    """Analyse the runs, write fits.json, render report.md + PNGs from it; returns report.md.

    rows: run dicts (from `load_results`, or e.g. `chinchilla_rows()`); holdout: "largest" |
    "flag" | "none" | None (see `split_holdout`); n_boot: whole-run bootstrap replicates per
    law; notes: extra header lines (fit_main lists skipped rows); side: the ladder's compare
    and seed rows (`validate_rows(side=...)`).
    """
    out = Path(out_dir)
    analysis = analyse(rows, n_boot=n_boot, holdout=holdout, seed=seed, level=level,
                       source=source, notes=notes, side=side,
                       chinchilla_min_runs=chinchilla_min_runs, progress=progress)
    fits_path = write_fits(analysis, out / "fits.json")
    return render_report(read_fits(fits_path), out)


def render_report(fits: dict, out_dir) -> Path:
    """Write report.md and every figure from a fits.json dict alone; returns report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = draw_all(fits, out)
    md: list[str] = []
    for section in (_header, _power_laws, _compute_laws, _chinchilla, _chinchilla_levels,
                    _isoflop,
                    _overtraining, _joint_laws, _efficiency_leverage, _seed_noise,
                    _sparsity_comparison, _compare,
                    _maxvio, _holdout):
        md.extend(section(fits))
    md.append("## Figures\n")
    md.extend(f"![{p}]({p})" for p in pngs)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


# ---------------------------------------------------------------------- formatting


def _finite(v) -> bool:
    return v is not None and not isinstance(v, str) and math.isfinite(float(v))


def fmt_iv(value, lo=None, hi=None) -> str:
    """A value and its interval, printed to the precision the interval's width allows.

    Two significant digits of the half-width (hi - lo) / 2 set the last decimal place
    kept, and the value and both bounds are rounded to that place: 0.2248 [0.2167, 0.9588]
    -> "0.22 [0.22, 0.96]", 1.188 [1.05, 1.31] -> "1.19 [1.05, 1.31]". Numbers of 1e6 and
    above or below 1e-4 are written in e-notation with as many digits as reach that
    place. No interval (a bound None or not finite, or hi <= lo): the value alone to 4
    significant figures. None -> "-".
    """
    if value is None:
        return "-"
    if not (_finite(value) and _finite(lo) and _finite(hi)) or float(hi) <= float(lo):
        return _fmt(value)
    v, lo, hi = float(value), float(lo), float(hi)
    # decimal exponent of the last digit kept (1e-9 guards 0.1 stored as 0.0999...)
    place = math.floor(math.log10((hi - lo) / 2.0) + 1e-9) - 1
    big = max(abs(v), abs(lo), abs(hi))
    if 1e-4 <= big < 1e6:
        dec = max(0, -place)

        def one(x):
            return f"{round(x, -place) if place > 0 else x:.{dec}f}"
    else:
        def one(x):
            if x == 0:
                return "0"
            digits = max(1, math.floor(math.log10(abs(x))) - place + 1)
            return f"{x:.{digits - 1}e}"
    return f"{one(v)} [{one(lo)}, {one(hi)}]"


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{float(v):.{digits}g}"


def _cell(entry: dict, k: str) -> str:
    """value [lo, hi] for an ok law; "not determined (why)" otherwise: a number whose law
    is degenerate, unidentified, unbounded or not converged is never printed bare (the
    values stay in fits.json, and the profile intervals below the table still apply)."""
    p = entry[k]
    if entry["status"] == "ok":
        return fmt_iv(p["value"], p["lo"], p["hi"])
    return f"not determined ({STATUS_WORDS.get(entry['status'], entry['status'])})"


def _status_notes(entries: dict) -> list[str]:
    lines = [f"- {name}: {STATUS_WORDS.get(e['status'], e['status'])}: {e['reason']}."
             for name, e in entries.items() if e["status"] in STATUS_WORDS]
    return (["", *lines] if lines else []) + [""]


def _profile_iv(p: dict) -> str:
    """value [lo, hi] of one profile interval; an end that reached the parameter's limit
    with the data still consistent is said to be open."""
    ends = [w for w, o in (("lower", p["lo_open"]), ("upper", p["hi_open"])) if o]
    return fmt_iv(p["value"], p["lo"], p["hi"]) + (
        f" ({' and '.join(ends)} end at its limit: not bounded by the data)" if ends else "")


def _profile_lines(name: str, e: dict) -> list[str]:
    """One line of profile-likelihood intervals, and where the irreducible loss is not
    identified (law not ok, or its interval reaches 0) the exponents at stated values of it."""
    pr = e.get("profile")
    if not pr:
        return []
    if "error" in pr:
        return [f"- {name}: profile likelihood failed: {pr['error']}"]
    cond = pr["conditional"]
    irr = cond["on"]
    exps = [k for k in pr if isinstance(pr[k], dict) and "lo_open" in pr[k] and k != irr]
    pct = f"{100 * pr['level']:.0f}%"
    ivs = "; ".join(f"{k} {_profile_iv(pr[k])}" for k in exps + [irr])
    md = [f"- {name + ': ' if name else ''}{pct} profile-likelihood intervals "
          f"({pr['dof']} residual dof): {ivs}."]
    if e["status"] != "ok" or pr[irr]["lo"] <= 0.0:
        rows = "; ".join(f"{irr} = {_fmt(r[irr], 3)}: "
                         + ", ".join(f"{k} = {_fmt(r[k])}" for k in exps)
                         for r in cond["rows"])
        md.append(f"  {irr} is not identified: every value in its interval is consistent "
                  f"with the runs (F below the {pct} threshold), and the exponents depend on "
                  f"it: {rows}.")
    return md


def _profile_notes(entries: dict) -> list[str]:
    lines = [ln for g, e in entries.items() if e["status"] != "not_fitted"
             for ln in _profile_lines(g, e)]
    return lines + ([""] if lines else [])


def _law_table(entries: dict, names, head: str, extra=lambda g, e: []) -> list[str]:
    cols = ["level", "runs", *names, "objective", "failed replicates", *extra(None, None)]
    md = [head, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for g, e in entries.items():
        if e["status"] == "not_fitted":
            md.append(f"| {g} | {e['n_runs']} | not fitted: {e['reason']} |"
                      + " |" * (len(cols) - 3))
            continue
        cells = [g, str(e["n_runs"]), *(_cell(e, k) for k in names), _fmt(e["objective"]),
                 f"{e['failed_replicates']}/{e['n_boot']}", *extra(g, e)]
        md.append("| " + " | ".join(cells) + " |")
    md += _status_notes(entries)
    md += _profile_notes(entries)
    sel = {e.get("selection") for e in entries.values() if e.get("selection")}
    if any(not s.startswith("all ") for s in sel):
        md += [f"- runs used, {g}: {e['selection']}" for g, e in entries.items()
               if e.get("selection")] + [""]
    return md


# ------------------------------------------------------------------------ sections


def _header(f) -> list[str]:
    runs = f["runs"]
    held = [r["name"] for r in runs if r["held_out"]]
    n_dense = sum(r["kind"] == "dense" for r in runs)
    s = f["settings"]
    md = ["# Scaling report\n",
          f"Source: `{f['source']}`. {len(runs)} runs ({n_dense} dense, {len(runs) - n_dense}"
          f" MoE); {len(runs) - len(held)} fitted, {len(held)} held out for the "
          "extrapolation check" + (f" ({', '.join(held)})" if held else "") + ".",
          f"Intervals: {s['level'] * 100:.0f}% percentile bootstrap over whole runs, "
          f"{s['n_boot']} replicates, every replicate re-runs the full multi-start fit. "
          "Losses are final eval losses; fits minimise summed Huber (delta "
          f"{s['huber_delta']:g}) of log loss unless a section says otherwise. Every number "
          "here is in fits.json beside this file (schema_version "
          f"{f['schema_version']}), with each law's bootstrap replicates.",
          f"Counting: {f['counting']['params']}.\n"]
    md += [f"- {n}" for n in f["notes"]]
    return md + ([""] if f["notes"] else [])


def _power_laws(f) -> list[str]:
    sp = {r["level"]: r["sparsity"] for r in f["runs"]}
    md = _law_table(f["power_laws"], ("E", "A", "alpha"),
                    "## Loss vs active parameters: L(N) = E + A / N^alpha per sparsity level",
                    lambda g, e: ["sparsity"] if g is None else [_fmt(sp.get(g), 3)])
    md += ["Counting conventions (point fits; embeddings dominate tiny models, so the "
           "exponent can differ):\n", "| level | N counted as | E | alpha | objective | "
           "converged |", "| --- | --- | --- | --- | --- | --- |"]
    for g, e in f["power_laws"].items():
        for key, c in (e.get("conventions") or {}).items():
            if c["status"] == "degenerate":
                cond = (f"{_fmt(c['alpha'])} if E = 0" if "collapsed" in c["reason"]
                        else "not determined")
                md.append(f"| {g} | {key} | not determined ({c['reason']}) | {cond} | "
                          f"{_fmt(c['objective'])} | {c['converged']} |")
            elif c["status"] != "ok":
                md.append(f"| {g} | {key} | not fitted: {c['reason']} | | | |")
            else:
                md.append(f"| {g} | {key} | {_fmt(c['E'])} | {_fmt(c['alpha'])} | "
                          f"{_fmt(c['objective'])} | {c['converged']} |")
    return md + [""]


def _compute_laws(f) -> list[str]:
    return _law_table(f["compute_laws"], ("a", "b", "c"),
                      "## Loss vs training compute: L(C) = a C^b + c per sparsity level")


def _one_law(title: str, e: dict, names, derived=()) -> list[str]:
    md = [title, ""]
    if e["status"] == "not_fitted":
        return md + [f"Not fitted ({e['n_runs']} runs): {e['reason']}.", ""]
    md.append(f"{e['n_runs']} runs; objective {_fmt(e['objective'])}"
              + (f" ({e['objective_name']})" if e.get("objective_name") else "")
              + f"; optimiser converged: {e['converged']}; {e['failed_replicates']}/"
              f"{e['n_boot']} replicates failed.")
    if e["status"] != "ok":
        md.append(f"**{STATUS_WORDS[e['status']]}**: {e['reason']}.")
    md += ["", "| quantity | estimate [interval] | bootstrap median |", "| --- | --- | --- |"]
    for k, label in [(k, k) for k in names] + list(derived):
        med = _fmt(e[k]['median']) if e["status"] == "ok" else "-"
        md.append(f"| {label} | {_cell(e, k)} | {med} |")
    return md + [""] + _profile_notes({"": e})


def _chinchilla(f) -> list[str]:
    e = f["chinchilla"]
    c = e.get("c_ref")
    return _one_law("## Chinchilla approach 3 on dense runs: L(N, D) = E + A/N^alpha + "
                    "B/D^beta", e, ("E", "A", "B", "alpha", "beta"),
                    [("a", "a (N_opt ~ C^a)"), ("b", "b (D_opt ~ C^b)"),
                     ("n_opt_at_c_ref", f"N_opt at C={_fmt(c, 3)}"),
                     ("loss_opt_at_c_ref", f"L_opt at C={_fmt(c, 3)}")])


def _chinchilla_levels(f) -> list[str]:
    md = []
    for g, e in (f.get("chinchilla_levels") or {}).items():
        c = e.get("c_ref")
        md += _one_law(f"## Chinchilla approach 3 on the {g} runs: L(N_active, D)", e,
                       ("E", "A", "B", "alpha", "beta"),
                       [("a", "a (N_opt ~ C^a)"), ("b", "b (D_opt ~ C^b)"),
                        ("n_opt_at_c_ref", f"N_opt at C={_fmt(c, 3)}"),
                        ("loss_opt_at_c_ref", f"L_opt at C={_fmt(c, 3)}")])
    return md


def _isoflop(f) -> list[str]:
    md = ["## IsoFLOP (approach 2, Porian et al. 2024): N* ~ C^a per sparsity level", ""]
    if not f["isoflop"]:
        return md + ["Not fitted: no runs.", ""]
    for g, e in f["isoflop"].items():
        if e["status"] != "ok":
            md.append(f"- {g}: not fitted: {e['reason']}.")
            continue
        def iv(key):
            i, pr = e.get(key), e.get(key.replace("_interval", "_profile_interval"))
            v = e[key.replace("_interval", "")]
            out = (f" {fmt_iv(v, i['lo'], i['hi'])} (bootstrap)" if i else
                   f" {_fmt(v)} (no bootstrap interval)")
            if pr:
                out += (f", {fmt_iv(v, pr['lo'], pr['hi'])} (profile likelihood, "
                        f"{pr['dof']} dof)")
            return out

        md.append(f"- {g}: a ={iv('exponent_interval')} from "
                  f"{len(e['budgets'])} budgets"
                  + (f"; D* ~ C^b, b ={iv('d_exponent_interval')}"
                     if e.get("d_exponent") is not None else "")
                  + (f"; {e['interval_note']}" if e.get("interval_note") else "")
                  + (f"; dropped {len(e['dropped'])}: "
                     + "; ".join(f"{_fmt(d['flops'], 3)} ({d['reason']})" for d in e["dropped"])
                     if e.get("dropped") else ""))
        md.append("")
        md.append("  | budget C | N* | loss at N* | runs |")
        md.append("  | --- | --- | --- | --- |")
        for b in e["budgets"]:
            md.append(f"  | {_fmt(b['flops'], 3)} | {_fmt(b['n_opt'])} | "
                      f"{_fmt(b['loss_opt'])} | {b['n_runs']} |")
    return md + [""]


def _overtraining(f) -> list[str]:
    md = _one_law("## Over-training law (Gadre et al. 2024): L(N, M) = E + a N^b + beta "
                  "6^(b/2) (M N)^b, N total params, M tokens/param", f["overtraining"],
                  ("E", "a", "b", "beta"))
    return md + _one_law("## Downstream law (Gadre et al. 2024): Err(L) = eps - k exp(-gamma L)",
                         f["downstream"], ("eps", "k", "gamma"))


def _joint_laws(f) -> list[str]:
    j = f["joint_laws"]
    md = ["## MoE joint laws\n", "Clark et al. 2022 (log L bilinear in log N and log E'), "
          "the additive law L = E0 + A/N_active^alpha + B/N_total^beta, and Ludziejewski et "
          "al. 2025 (joint in N_active, D and E'; exponents signed as in the paper), fitted "
          "on all non-held-out runs with whole-run bootstrap intervals. One law is chosen "
          "by " + (j.get("selected_by") or "cross-validation on the fitted runs (not run)")
          + "; the held-out runs then score it (their RMSE is shown for every law and "
          "never enters the choice).\n",
          "| law | runs | parameters [interval] | train RMSE(log L) | CV RMSE(log L) "
          "| held-out RMSE(log L) | failed replicates |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, shown in JOINT_SHOWN.items():
        e = j[name]
        if e["status"] == "not_fitted":
            md.append(f"| {name} | {e['n_runs']} | not fitted: {e['reason']} | | | | |")
            continue
        ps = "; ".join(f"{k} = {_cell(e, k)}" for k in shown)
        fixed = ", ".join(f"{k} = {_fmt(v)}" for k, v in e.get("fixed", {}).items())
        md.append(f"| {name} | {e['n_runs']} | {ps}{' (' + fixed + ')' if fixed else ''} | "
                  f"{_fmt(e['train_rmse_log'])} | {_fmt(e.get('cv_rmse_log'))} | "
                  f"{_fmt(e['heldout_rmse_log'])} | {e['failed_replicates']}/{e['n_boot']} |")
    md += _status_notes({k: j[k] for k in JOINT_SHOWN})
    md += _profile_notes({k: j[k] for k in JOINT_SHOWN})
    folds = [(name, f) for name in JOINT_SHOWN for f in (j[name].get("cv_folds") or [])]
    if folds:
        md += ["Cross-validation folds (fit on every fitted run smaller than the left-out "
               "size):\n", "| law | left out | runs fitted | runs scored | RMSE(log L) |",
               "| --- | --- | --- | --- | --- |"]
        md += [f"| {name} | {f['left_out']} | {f['n_train']} | {f['n_test']} | "
               + (_fmt(f["rmse_log"]) if f["rmse_log"] is not None
                  else f"not fitted: {f['error']}") + " |" for name, f in folds]
        md.append("")
    md.append(f"Chosen by cross-validation on the fitted runs: **{j['better'] or 'undecided'}**"
              f" ({j['reason']}).\n")
    return md


def _efficiency_leverage(f) -> list[str]:
    md = ["## Efficiency leverage\n"]
    el = f["efficiency_leverage"]
    if not el:
        dense = f["power_laws"].get("dense")
        why = ("no MoE runs" if not any(r["kind"] == "moe" for r in f["runs"]) else
               "no dense power-law fit (needs >= 3 dense sizes along one recipe)"
               if not dense or dense["status"] == "not_fitted" else "nothing to compute")
        return md + [f"Not computed: {why}.\n"]
    md += ["EL(params) = active size a dense model needs to reach the run's loss / the run's "
           "active size; EL(compute) the same with FLOPs. The dense curve (basis) is the "
           "dense L(N) and L(C) fits when fitted and converged (a status in brackets: its "
           "irreducible term is not determined, which matters most where EL extrapolates "
           "beyond the dense runs' losses), else the dense Chinchilla L(N, D) at the "
           "run's tokens. Intervals: EL recomputed from every bootstrap replicate of that "
           "dense fit, so they cover the dense curve's uncertainty, not the MoE run's own "
           "seed noise (see the seed repeats below).\n",
           "| run | level | EL(params) [interval] | EL(compute) [interval] | basis | note |",
           "| --- | --- | --- | --- | --- | --- |"]

    def cell(e, k):
        if e.get(k) is not None and e.get(f"{k}_lo") is not None and e.get(f"{k}_hi") is None:
            return f"{_fmt(e[k])} [{_fmt(e[f'{k}_lo'], 3)}, unbounded]"
        return fmt_iv(e.get(k), e.get(f"{k}_lo"), e.get(f"{k}_hi"))

    md += [f"| {e['run']} | {e['level']} | {cell(e, 'el_params')} | {cell(e, 'el_compute')} "
           f"| {e.get('basis') or '-'} | "
           + "; ".join(x for x in (e['reason'], e.get('interval_note')) if x) + " |"
           for e in el]
    return md + [""]


def _seed_noise(f) -> list[str]:
    s = f["seed_noise"]
    md = ["## Run-to-run noise (seed repeats)\n"]
    if s is None:
        return md + ["Not measured: the table has no seed repeats, so no gap between two "
                     "runs here can be told apart from seed noise.\n"]
    md.append(f"Pooled std of the final loss over seed repeats: {_fmt(s['std'])} "
              f"({100 * s['rel_std']:.2f}% of the loss): the spread of ONE run. The gap "
              "between two single runs carries the noise of both; gaps between levels are "
              "tested by paired differences over seeds in the sparsity comparison below.\n")
    md += ["| run | repeats | losses | std |", "| --- | --- | --- | --- |"]
    md += [f"| {r['run']} | {r['n']} | {', '.join(_fmt(v, 5) for v in r['losses'])} | "
           f"{_fmt(r['std'])} |" for r in s["runs"]]
    return md + [""]


def _gap_test(g: dict) -> str:
    """The gap's test; a version-1 file judged it against the pooled seed std instead."""
    if "test" in g:
        return g["test"]
    return {True: "within the pooled seed std (version-1 file)",
            False: "beyond the pooled seed std (version-1 file)"}.get(
                g.get("within_noise"), "not tested")


def _sparsity_comparison(f) -> list[str]:
    rows = f.get("sparsity_comparison") or []
    if not rows:
        return []
    levels = []
    for r in rows:
        levels += [lv for lv in r["losses"] if lv not in levels]
    md = ["## Sparsity at equal active size\n",
          "Final eval loss per level at each active size; each gap is the next sparser "
          "level's loss minus the denser one's (negative: the sparser model is better), from "
          "one run per level. Where both levels were repeated over seeds, the gap is tested "
          "by paired differences (runs of the two levels with the same seed paired; table "
          "below); a gap between two single runs is not tested.\n",
          "| size | active params | " + " | ".join(levels) + " | gaps |",
          "|" + " --- |" * (len(levels) + 3)]
    paired = []
    for r in rows:
        cells = []
        for g in r["gaps"]:
            cells.append(f"{g['to']} {fmt_iv(g['gap'])} ({_gap_test(g)})")
            if g.get("paired"):
                paired.append((r, g))
        md.append(f"| {r['size']} | {_fmt(r['params_active'])} | "
                  + " | ".join(_fmt(r["losses"].get(lv), 5) for lv in levels)
                  + f" | {'; '.join(cells)} |")
    if paired:
        lv = paired[0][1]["paired"]["level"]
        md += ["", f"Paired differences over seeds (loss of `to` minus loss of `from` at the "
               f"same seed; {lv * 100:.0f}% t interval; two-sided paired t-test):\n",
               "| size | from | to | seeds | mean difference [interval] | std. error | t | p |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r, g in paired:
            p = g["paired"]
            md.append(f"| {r['size']} | {g['from']} | {g['to']} | {p['n']} | "
                      f"{fmt_iv(p['mean'], p['lo'], p['hi'])} | {_fmt(p['se'], 2)} | "
                      f"{_fmt(p['t'], 3)} | {_fmt(p['p'], 2)} |")
    return md + [""]


def _compare(f) -> list[str]:
    if not f["compare"]:
        return []
    md = ["## Fixed-size comparison (balancing, MTP variants)\n",
          "| variant | eval loss | MaxVio | tokens/s |", "| --- | --- | --- | --- |"]
    md += [f"| {c['run']} | {_fmt(c['loss'], 5)} | {_fmt(c['maxvio'], 3)} | "
           f"{'not measured' if c['tokens_per_s'] is None else format(c['tokens_per_s'], '.0f')}"
           " |" for c in f["compare"]]
    md.append("")
    variants = f.get("compare_variants")  # absent from fits.json files before it existed
    if variants:
        def ms(x, d):
            return "-" if x["mean"] is None else (
                f"{x['mean']:.{d}f}" + ("" if x["se"] is None else f" ± {x['se']:.{d}f}"))

        def pt(p):
            if p is None:
                return "no paired test (< 2 common seeds)"
            return (f"{fmt_iv(p['mean'], p['lo'], p['hi'])}, p = {_fmt(p['p'], 2)} "
                    f"(n {p['n']})")

        md += ["Over seeds (mean ± standard error; each variant paired by seed with the "
               f"first, {variants[0]['variant']}: difference = this variant - it, "
               f"{f['settings']['level'] * 100:.0f}% t interval, two-sided paired t-test):\n",
               "| variant | runs | eval loss | MaxVio | loss difference | MaxVio difference |",
               "| --- | --- | --- | --- | --- | --- |"]
        for v in variants:
            first = v["vs"] is None
            md.append(f"| {v['variant']} | {v['loss']['n']} | {ms(v['loss'], 4)} | "
                      f"{ms(v['maxvio'], 3)} | "
                      f"{'-' if first else pt(v['paired_loss'])} | "
                      f"{'-' if first else pt(v['paired_maxvio'])} |")
        md.append("")
    return md


def _maxvio(f) -> list[str]:
    mv = [r for r in f["runs"] if r["maxvio"] is not None]
    if not mv:
        return []
    return (["## Load balance (MaxVio)\n", "| run | MaxVio |", "| --- | --- |"]
            + [f"| {r['name']} | {_fmt(r['maxvio'])} |" for r in mv] + [""])


def _holdout(f) -> list[str]:
    md = ["## Extrapolation check (held-out runs predicted from the fits)\n"]
    held = [r for r in f["runs"] if r["held_out"]]
    if not held:
        return md + ["No runs held out (holdout=none, or no level has >= 4 runs), so there "
                     "is no extrapolation check.\n"]
    md += ["| run | quantity | law | predicted [interval] | actual | error |",
           "| --- | --- | --- | --- | --- | --- |"]
    seen = set()
    for h in f["holdout"]:
        seen.add(h["run"])
        if h["lo"] is None:
            iv = ""
        elif h["bounded"]:
            iv = None
        else:
            iv = " (interval unbounded)"
        pred = (fmt_iv(h["predicted"], h["lo"], h["hi"]) if iv is None
                else _fmt(h["predicted"]) + iv)
        md.append(f"| {h['run']} | {h['quantity']} | {h['law']} | {pred} "
                  f"| {_fmt(h['actual'])} | {100 * h['rel_error']:+.3g}% |")
    md += [f"| {r['name']} | loss | none fitted for level {r['level']} | | {_fmt(r['loss'])} "
           "| |" for r in held if r["name"] not in seen]
    return md + [""]


# ------------------------------------------------------------------------------ CLI


def _parse_columns(items) -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ResultsError(f"--column {it!r}: expected NAME=SOURCE (e.g. "
                               "final_eval_loss=loss_c4_val)")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def fit_main(argv: list[str] | None = None) -> int:
    """`moe-testbed fit RESULTS [--out DIR] [--n-boot N] [--holdout ...] [--column N=S]`.

    Loads and validates the results table, writes fits.json, report.md and the PNGs,
    prints the report's path; returns 0. A bad table (or a missing file) prints one line
    `error: ...` to stderr and returns 2, before any fitting.
    """
    ap = argparse.ArgumentParser(prog="moe-testbed fit",
                                 description="Fit scaling laws to a results table; write "
                                             "fits.json, report.md and figures.")
    ap.add_argument("results", help="results table, .csv or .jsonl (one row per run); "
                                    "columns as documented in moe/scaling/table.py")
    ap.add_argument("--out", default=None,
                    help="output directory (default: scaling_report next to RESULTS)")
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates (default 200)")
    ap.add_argument("--holdout", choices=("largest", "none", "flag"), default=None,
                    help="runs to hold out and predict: the largest by FLOPs per sparsity level, "
                         "none, or rows flagged held_out (default: flag if any row is flagged, "
                         "else largest)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ap.add_argument("--column", action="append", metavar="NAME=SOURCE",
                    help="read documented column NAME from the table's column SOURCE, e.g. "
                         "--column final_eval_loss=loss_c4_val (repeatable)")
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
        side: dict = {}
        rows = load_results(path, skipped=skipped, columns=_parse_columns(args.column),
                            side=side)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError:
        print(f"error: no results table at {path}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    # the output directory is checked before fitting, and its errors name it (not RESULTS)
    from ..runs.lock import RunDirError, check_dir

    out = Path(args.out) if args.out else path.parent / "scaling_report"
    try:
        check_dir(out, "output directory")
        notes = [f"not fitted: {n} ({why})" for n, why in skipped]
        report = write_report(rows, out, n_boot=args.n_boot, holdout=args.holdout,
                              seed=args.seed, source=path.name, notes=notes, side=side)
    except (RunDirError, ResultsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing the report (disk full, a file in the way, ...)
        print(f"error: cannot write {exc.filename or out}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    print(report)
    print(out / "fits.json")
    return 0
