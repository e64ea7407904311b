"""What a plan writes: plan.json, plan.md, one training config per row, and plan.png's
data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from moe.config import Config, apply_overrides, config_from_dict
from moe.scaling.analysis.schema import jsonable
from moe.scaling.planner.geometry import Family
from moe.scaling.planner.laws import frontier


def _train_overrides(fam: Family, cfg: Config, tokens: float, experts: int, name: str) -> list[str]:
    """LR, warm-up and token budget for the written config (the ladder's rules if known)."""
    t = cfg.train
    step_tokens = t.micro_batch_size * t.seq_len * t.grad_accum
    budget = max(step_tokens, int(math.ceil(tokens / step_tokens) * step_tokens))
    ov = [f"name={name}", "train.max_steps=null", f"train.token_budget={budget}",
          "train.flop_budget=null"]
    if fam.ladder is not None:
        from moe.scaling.ladder.design import run_lr, warmup_for

        lr = run_lr(fam.ladder, float(fam.base.get("train", {}).get("lr", t.lr)),
                    cfg.model.d_model, experts > 0, t.micro_batch_size)
        ov += [f"train.lr={lr:.6g}", f"train.warmup_steps={warmup_for(fam.ladder, budget // step_tokens)}"]
    return ov


def write_plan(plan: dict, out_dir, *, figure: bool = True) -> Path:
    """plan.json, plan.md, one training config per row and plan.png; returns plan.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fam = plan.pop("_family", None)
    for r in plan["rows"]:
        r.pop("_choice", None)
        cfg = r.pop("_cfg", None)
        if cfg is None or r.get("refused"):
            continue
        if fam is not None:
            ov = _train_overrides(fam, cfg, r["tokens"], r["experts"], r["name"])
            cfg = config_from_dict(apply_overrides(cfg.to_dict() | {}, ov))
        (out / r["config"]).write_text(
            f"# moe-testbed plan row {r['name']}: {r['law']}, C = {r['flops']:.3g} FLOPs\n"
            + (f"# BEYOND FITTED RANGE x{r['extrapolation']:.2g}: {r['extrapolated_reason']}\n"
               if r.get("extrapolated") else "")
            + f"# planned N_active {_g(r['n_active'], _sig(r))}, tokens "
            f"{_g(r['tokens'], _sig(r))}; this config: "
            f"active {r['geometry']['config_active']:,}, total {r['geometry']['config_total']:,}\n"
            + cfg.to_yaml())
    (out / "plan.json").write_text(json.dumps(jsonable({k: v for k, v in plan.items()
                                                        if not k.startswith("_")}),
                                              indent=1, allow_nan=False) + "\n")
    md = out / "plan.md"
    md.write_text(render_plan(plan))
    if figure and plan.get("_curves"):
        from moe.scaling.figures import draw_plan

        draw_plan(plan["_curves"], out / "plan.png")
    return md


def _sig(r: dict, digits: int = 4) -> str:
    """The number format of a row: `digits` significant figures, 2 for a row beyond the
    extrapolation limit (its numbers are illustrations, not predictions)."""
    return "{:.2g}" if r.get("extrapolated") else "{:.%dg}" % digits


def _g(v, fmt="{:.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def _iv(lo, hi, fmt="{:.4g}") -> str:
    if lo is None or hi is None:
        return "no interval"
    return f"[{fmt.format(lo)}, {fmt.format(hi)}]"


def _passes_s(r: dict) -> str:
    if r.get("passes") is not None:
        return f"{r['passes']:.3g}"
    if r.get("passes_estimate") is not None:
        return f"? (~{r['passes_estimate']:.2g} estimated)"
    return "?"


def _header_lines(plan: dict) -> list[str]:
    """Warnings (rows beyond the fitted range, refused rows) and what the plan rests on."""
    s = plan["settings"]
    lines = [f"# Plan from {plan['fits_source']}", ""]
    ext_rows = [r for r in plan["rows"] if r.get("extrapolated")]
    if ext_rows:
        worst = max(r["extrapolation"] for r in ext_rows)
        lines += [f"**WARNING: {len(ext_rows)} of {len(plan['rows'])} rows are BEYOND THE "
                  f"FITTED RANGE (up to {worst:.2g}x the compute of the largest fitted run; "
                  f"limit {s['max_extrapolation']:g}x), planned only because --extrapolate was "
                  "passed: their numbers are extrapolations shown to 2 significant figures, "
                  "not predictions.**", ""]
    refused = [r for r in plan["rows"] if r.get("refused")]
    if refused:
        lines += [f"**{len(refused)} of {len(plan['rows'])} rows REFUSED** (no config "
                  "written): " + "; ".join(f"{r['name']} {r['refused']}" for r in refused),
                  ""]
    lines += [f"Budgets {', '.join(f'{c:.3g}' for c in s['flops'])} FLOPs; fitted runs span "
              f"{s['fitted_flops'][0]:.3g}-{s['fitted_flops'][1]:.3g} FLOPs, experts "
              f"{s['fitted_experts'] or 'none'} (top-k {s['fitted_top_k'] or '-'}). "
              f"Intervals: {int(plan['level'] * 100)}% percentile over the fits' bootstrap "
              "replicates (propagated, not refitted). Configs from "
              f"{s['template']}. Passes over the corpus: tokens / its training tokens, "
              f"at most {s['max_epochs']:g} ({s['max_epochs_source']}).", ""]
    return lines


def _table_lines(plan: dict) -> list[str]:
    """The rows as a markdown table, and how time and layouts were computed."""
    s = plan["settings"]
    lines = ["| row | law | C | extrapolation | N / largest run | N_active [interval] | "
             "tokens [interval] | passes | N_total | loss [interval] | EL [interval] | "
             "layout | GPU-hours |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in plan["rows"]:
        f = _sig(r)
        iv = r["intervals"]
        lay = r["layout"]
        lay_s = (f"ep {lay['ep']}, ZeRO {lay['zero']}, {lay['states_gib_per_gpu']:.3g} GiB/GPU"
                 if lay else ("does not fit" if s["gpus"] else "-"))
        ext = r["extrapolation"]
        ext_s = (f"**BEYOND FITTED RANGE x{ext:.2g}**" if r.get("extrapolated") else
                 f"**{ext:.3g}x** the largest run" if ext > 1.0 + 1e-9 else "within")
        unb = "" if r["law_status"] == "ok" else f" ({r['law_status']})"
        el = "-" if r["el"] is None else f"{r['el']:.3g} {_iv(iv['el']['lo'], iv['el']['hi'], '{:.3g}')}"
        if r["experts"] == 0:
            el = "1 (dense)"
        name = r["name"] + (" **REFUSED**" if r.get("refused") else "")
        lf = "{:.2f}" if r.get("extrapolated") else "{:.4f}"
        lines.append(
            f"| {name} | {r['law']}{unb} | {r['flops']:.3g} | {ext_s} | "
            f"{r['extrapolation_n']:.3g}x | "
            f"{f.format(r['n_active'])} {_iv(iv['n_active']['lo'], iv['n_active']['hi'], f)} | "
            f"{f.format(r['tokens'])} {_iv(iv['tokens']['lo'], iv['tokens']['hi'], f)} | "
            f"{_passes_s(r)} | {f.format(r['n_total'])} | {lf.format(r['loss']['value'])} "
            f"{_iv(r['loss']['lo'], r['loss']['hi'], lf)} | {el} | {lay_s} | "
            f"{r['gpu_hours']:{'.2g' if r.get('extrapolated') else '.3g'}} |")
    lines += ["", f"GPU-hours at MFU {s['mfu']:.3g} ({s['mfu_source']}) of "
              f"{s['peak_tflops']:g} TFLOP/s per GPU. N / largest run: the planned N_active "
              "over the largest fitted run's (of the row's level when it has runs)."]
    if s["gpus"]:
        lines.append(f"Layouts: model states (weights, gradients, AdamW) per GPU on {s['gpus']} "
                     f"x {s['gpu_mem_gib']:g} GiB, tp 1, {int(s['headroom'] * 100)}% left for "
                     "activations and buffers (not modelled).")
    return lines


def _check_lines(plan: dict) -> list[str]:
    """Each level's approach-2 check."""
    checks = {}
    for r in plan["rows"]:
        chk = r.get("isoflop_check")
        key = "dense" if r["experts"] == 0 else f"{r['experts']} experts"
        if key in checks:
            continue
        if chk is None:
            checks[key] = f"- {key}: no approach-2 optima to check {r['law']} against"
        elif chk["agrees"]:
            at = ", ".join(f"{b['flops']:.3g}" for b in chk["budgets"])
            checks[key] = (f"- {key}: {r['law']} agrees with approach 2 (N* inside its "
                           f"intervals at {at} FLOPs)")
        else:
            checks[key] = f"- {key}: DISAGREES: {chk['disagreement']}"
    return ["", "Approach-2 check (the planning law's N*(C) against the IsoFLOP optima at "
            "the measured budgets):", ""] + list(checks.values())


def _config_lines(plan: dict) -> list[str]:
    """Each row's config, or why it was refused."""
    lines = ["", "Each row's config (`moe-testbed train <row>.yaml`):", ""]
    for r in plan["rows"]:
        g = r["geometry"]
        if r.get("refused"):
            lines.append(f"- {r['name']}: REFUSED, no config written: {r['refused']}")
            continue
        lines.append(f"- `{r['config']}`: d_model {g['d_model']}, {g['n_layers']} layers, "
                     f"{g['n_heads']} heads" + (f", {r['experts']} routed experts of "
                                                f"{g['expert_ffn_dim']} (top-{r['top_k']}, "
                                                f"{g['n_shared']} shared)" if r["experts"] else
                                                f", FFN {g['ffn_dim']}")
                     + f"; active {g['config_active']:,} ({g['config_active_rel_err']:+.2%} of "
                     f"the plan), total {g['config_total']:,}; replicates with an optimum "
                     f"{r['replicates']['used']}/{r['replicates']['total']}"
                     + (f"; {r['passes_note']}" if r.get("passes") is None else "")
                     + (f"; EL: {r['el_reason']}" if r["el_reason"] else "")
                     + (f"; memory: {r['layout_reason']}" if r["layout_reason"] else "")
                     + (f"; BEYOND FITTED RANGE: {r['extrapolated_reason']}"
                        if r.get("extrapolated") else ""))
    return lines


def render_plan(plan: dict) -> str:
    """plan.md."""
    lines = (_header_lines(plan) + _table_lines(plan) + _check_lines(plan)
             + _config_lines(plan))
    if plan["missing"]:
        lines += ["", "Not planned:", ""] + [f"- {m}" for m in plan["missing"]]
    if plan["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in plan["notes"]]
    return "\n".join(lines) + "\n"


def plan_curves(plan: dict) -> dict:
    """Data for plan.png: loss vs N_active at each row's budget (with bands) and N* vs C,
    from each row's law (``_choice``)."""
    families_rows = [(r, r["_choice"]) for r in plan["rows"]]
    level = plan["level"]
    kappa = plan["settings"]["kappa"]
    cmin = plan["settings"]["fitted_flops"][0]
    cmax_plan = max(plan["settings"]["flops"])
    cs = np.logspace(math.log10(cmin), math.log10(cmax_plan * 10), 40)
    q = 100.0 * (1.0 - level) / 2.0
    out = {"budgets": [], "frontier": [], "level": level}
    for C in plan["settings"]["flops"]:
        curves = []
        for r, choice in families_rows:
            if r["flops"] != C:
                continue
            n0 = r["n_active"]
            ns = np.logspace(math.log10(n0) - 1.2, math.log10(n0) + 1.2, 50)
            ds = C / kappa / (6.0 * ns)
            val = choice.point.loss(ns, ds)
            reps = np.array([f.loss(ns, ds) for f in choice.replicates if f.ok]) \
                if choice.replicates else np.empty((0, ns.size))
            lo, hi = ((np.nanpercentile(reps, q, axis=0), np.nanpercentile(reps, 100 - q, axis=0))
                      if len(reps) >= 2 else (None, None))
            curves.append({"label": "dense" if r["experts"] == 0 else f"{r['experts']} experts",
                           "n": ns, "loss": val, "lo": lo, "hi": hi,
                           "opt": (n0, r["loss"]["value"])})
        out["budgets"].append({"flops": C, "curves": curves})
    seen = set()
    for r, choice in families_rows:
        if r["experts"] in seen:
            continue
        seen.add(r["experts"])
        pts = [frontier(choice.point, c / kappa) for c in cs]
        nstar = np.array([p[0] if p else np.nan for p in pts])
        reps = np.array([[(frontier(f, c / kappa) or (np.nan,))[0] for c in cs]
                         for f in choice.replicates]) if choice.replicates else None
        lo = hi = None
        if reps is not None and len(reps) >= 2:
            lo, hi = np.nanpercentile(reps, q, axis=0), np.nanpercentile(reps, 100 - q, axis=0)
        out["frontier"].append({"label": "dense" if r["experts"] == 0 else
                                f"{r['experts']} experts", "c": cs, "n": nstar, "lo": lo,
                                "hi": hi})
    out["fitted_flops"] = plan["settings"]["fitted_flops"]
    return out
