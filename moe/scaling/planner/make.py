"""The plan as a dict: settings, notes and one row per budget and expert count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from moe.accounting import count_params
from moe.scaling.planner.geometry import Family, choose_layout, fit_geometry
from moe.scaling.planner.laws import (USABLE_STATUSES, choose_law, dense_compute_for_loss,
                                      flops_ratio, frontier, law_candidates, level_of,
                                      token_variation)
from moe.scaling.planner.limits import (DEFAULT_PEAK_TFLOPS, DEFAULT_MFU, MAX_EXTRAPOLATION,
                                        MAX_FLOPS, PlanError, check_extrapolation,
                                        n_extrapolation, passes_check)


def _interval(vals: Sequence[float], level: float) -> tuple[Optional[float], Optional[float]]:
    v = np.asarray([x for x in vals if x is not None and math.isfinite(x)], float)
    if v.size < 2:
        return None, None
    q = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(v, [q, 100.0 - q])
    return float(lo), float(hi)


def _fmt_c(c: float) -> str:
    m, e = f"{c:.3g}".split("e") if "e" in f"{c:.3g}" else (f"{c:.3g}", "0")
    return f"{m}e{int(e)}"


@dataclass
class PlanSettings:
    flops: list[float]
    experts: list[int]  # 0 = dense
    top_k: int
    gpus: Optional[int] = None
    gpu_mem_gib: Optional[float] = None
    mfu: Optional[float] = None
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    headroom: float = 0.25
    family: Optional[Family] = None
    notes: list = field(default_factory=list)
    max_extrapolation: float = MAX_EXTRAPOLATION  # x the largest fitted run's compute
    extrapolate: bool = False  # plan (flagged) beyond max_extrapolation
    max_epochs: Optional[float] = None  # None: the ladder's max_epochs (its default 1)


def check_inputs(fits: dict, s: PlanSettings) -> None:
    runs = [r for r in fits.get("runs", []) if not r.get("held_out")]
    if not runs:
        raise PlanError("fits.json has no fitted runs")
    cmin = min(r["flops"] for r in runs)
    for c in s.flops:
        if not (isinstance(c, float) and math.isfinite(c)) or c <= 0:
            raise PlanError(f"--flops {c!r} is invalid: allowed a positive number of FLOPs")
        if c > MAX_FLOPS:
            raise PlanError(f"--flops {c:.3g} is invalid: above {MAX_FLOPS:.0e} FLOPs, "
                            "beyond any plan a fitted law can support")
        if c < cmin:
            raise PlanError(f"--flops {c:.3g} is invalid: below the smallest fitted run "
                            f"({cmin:.3g} FLOPs); plan at or above the ladder's range")
    if any(e < 0 or e == 1 for e in s.experts):
        raise PlanError(f"--experts {s.experts} is invalid: 0 (dense) or >= 2 routed experts")
    if s.top_k < 1 or any(e and s.top_k > e for e in s.experts):
        raise PlanError(f"--top-k {s.top_k} is invalid: allowed 1..min(experts)")
    if (s.gpus is None) != (s.gpu_mem_gib is None):
        raise PlanError("--gpus and --gpu-mem-gib go together")
    if s.gpus is not None and (s.gpus < 1 or s.gpu_mem_gib <= 0):
        raise PlanError(f"--gpus {s.gpus} / --gpu-mem-gib {s.gpu_mem_gib} are invalid: "
                        "allowed >= 1 GPU of > 0 GiB")
    if s.mfu is not None and not 0 < s.mfu <= 1:
        raise PlanError(f"--mfu {s.mfu} is invalid: allowed a fraction in (0, 1]")
    if not 0 <= s.headroom < 1:
        raise PlanError(f"--headroom {s.headroom} is invalid: allowed a fraction in [0, 1)")
    if s.max_epochs is not None and not (math.isfinite(s.max_epochs) and s.max_epochs > 0):
        raise PlanError(f"--max-epochs {s.max_epochs} is invalid: allowed a number > 0")
    check_extrapolation(fits, s.flops, s.max_extrapolation, s.extrapolate)


def _max_epochs(s: PlanSettings) -> tuple[float, str]:
    """The passes over the corpus a row may take, and where that limit comes from."""
    if s.max_epochs is not None:
        return float(s.max_epochs), "--max-epochs"
    lad = s.family.ladder if s.family is not None else None
    if lad is not None:
        return float(lad.max_epochs), f"max_epochs of {s.family.name}"
    from moe.scaling.ladder.design import LadderConfig

    default = float(LadderConfig.__dataclass_fields__["max_epochs"].default)
    return default, "the ladder default max_epochs (moe/scaling/ladder/design.py)"


@dataclass
class _Basis:
    """What every row of a plan shares: the fitted runs, the FLOP convention, the MFU, the
    law of each expert count and the dense laws EL compares with, the passes limit."""

    level_ci: float
    runs: list
    cmax: float
    kappa: float
    mfu: float
    mfu_src: str
    laws: dict  # expert count -> (LawChoice or None, why)
    dense_by_kind: dict
    dense_cwhy: list
    max_epochs: float
    epochs_src: str
    top_ks: list
    fitted_e: list
    corpora: dict = field(default_factory=dict)


def _plan_basis(fits: dict, s: PlanSettings, notes: list) -> _Basis:
    """The plan's shared inputs (appending their notes); PlanError without token variation."""
    runs = [r for r in fits.get("runs", []) if not r.get("held_out")]
    kappa = flops_ratio(fits)
    spread = token_variation(fits)
    notes.append(f"FLOP convention: the fitted runs spend kappa = {kappa:.4g} x 6 N_active D "
                 "(median flops / (6 N D)); a budget C is planned as 6 N D = C / kappa.")
    if spread <= 0.1:
        raise PlanError(
            f"no token variation in the fitted runs (residual std of log D on log N = "
            f"{spread:.3g}): the D trade-off cannot be planned; fit a ladder that trains "
            "sizes at several token budgets (e.g. configs/ladder/cpu-isoflop.yaml)")
    mfu, mfu_src = s.mfu, "--mfu"
    if mfu is None:
        m = [r["mfu"] for r in runs if isinstance(r.get("mfu"), (int, float)) and r["mfu"] > 0]
        mfu, mfu_src = ((float(np.median(m)), "median MFU of the fitted runs") if m else
                        (DEFAULT_MFU, "ASSUMED (no MFU in the fits' runs; pass --mfu)"))
    # the law of each expert count: the same for every budget
    laws = {E: choose_law(fits, E, level_of(fits, E), kappa)
            for E in dict.fromkeys([0, *s.experts])}
    for E in s.experts:
        ch = laws[E][0]
        if ch is not None and ch.isoflop and ch.isoflop["disagreement"]:
            notes.append(f"{'dense' if E == 0 else f'{E} experts'}: "
                         f"{ch.isoflop['disagreement']}")
    # EL is measured within one law: a MoE row's loss against the dense form of the same
    # law (the joint law at E = 1, or dense approach 3 for a per-level approach 3), whichever
    # law the dense rows were planned with (the approach-2 check may pick another)
    dense_cands, dense_cwhy = law_candidates(fits, 0, level_of(fits, 0))
    if any(s.experts):
        notes.append("EL: each MoE row's optimum loss against the dense form of the same law "
                     "(the joint law at E = 1; dense approach 3 for a per-level approach 3), "
                     "row field el_basis")
    max_epochs, epochs_src = _max_epochs(s)
    top_ks = sorted({int(r["top_k"]) for r in runs if r.get("kind") == "moe"})
    fitted_e = sorted({int(r["n_experts"]) for r in runs if r.get("kind") == "moe"})
    _transfer_notes(s, top_ks, fitted_e, notes)
    return _Basis(level_ci=float((fits.get("settings") or {}).get("level", 0.95)), runs=runs,
                  cmax=max(r["flops"] for r in runs), kappa=kappa, mfu=mfu, mfu_src=mfu_src,
                  laws=laws, dense_by_kind={c.kind: c for c in dense_cands},
                  dense_cwhy=dense_cwhy, max_epochs=max_epochs, epochs_src=epochs_src,
                  top_ks=top_ks, fitted_e=fitted_e)


def _transfer_notes(s: PlanSettings, top_ks: list, fitted_e: list, notes: list) -> None:
    """Notes for rows the fitted runs do not cover: another top-k, untrained expert counts."""
    if any(e for e in s.experts) and top_ks and s.top_k not in top_ks:
        notes.append(f"top-k {s.top_k} differs from the fitted MoE runs' {top_ks}: the joint "
                     "law has no top-k term, so the plan assumes it transfers")
    new_e = [e for e in s.experts if e and e not in fitted_e]
    if new_e:
        notes.append(f"expert counts {new_e} were not trained (fitted: {fitted_e or 'none'}): "
                     "their rows extrapolate the joint law in E"
                     + ("; with one trained expert count besides dense the law's E terms "
                        "are not identified beyond it, so read these rows as illustrations "
                        "(see their intervals)" if len(fitted_e) < 2 else ""))


def _row_el(b: _Basis, choice, E: int, c_law: float, L: float, reps: list) -> tuple:
    """(EL, lo, hi, reason) of a row: its optimum loss against the dense form of its law."""
    el = el_lo = el_hi = None
    el_reason = ""
    if E == 0:
        el = 1.0
    elif choice.kind in b.dense_by_kind:
        dense_choice = b.dense_by_kind[choice.kind]
        cd = dense_compute_for_loss(dense_choice.point, L)
        el = cd / c_law if math.isfinite(cd) else None
        if el is None:
            el_reason = "the MoE optimum is below the dense law's irreducible loss"
        if dense_choice.kind == choice.kind == "joint" or len(dense_choice.replicates) \
                == len(choice.replicates):
            els = []
            for fd, r in zip(dense_choice.replicates, reps):
                if r is None:
                    continue
                cdr = dense_compute_for_loss(fd, r[2])
                els.append(cdr / c_law if math.isfinite(cdr) else float("nan"))
            el_lo, el_hi = _interval(els, b.level_ci)
    else:
        el_reason = (f"no dense form of the {choice.kind} law to compare with: "
                     + "; ".join(b.dense_cwhy))
    return el, el_lo, el_hi, el_reason


def _plan_row(fits: dict, s: PlanSettings, b: _Basis, C: float, E: int, choice) -> dict:
    """One row: the law's optimum at budget C for E experts, its intervals, EL, the config
    nearest it, its layout, time and passes."""
    c_law = C / b.kappa
    opt = frontier(choice.point, c_law)
    ext_n, ext_n_basis = n_extrapolation(fits, E, opt[0])
    extrapolated = C / b.cmax > s.max_extrapolation
    n, d, L = opt
    reps = [frontier(f, c_law) for f in choice.replicates]
    good = [r for r in reps if r is not None]
    el, el_lo, el_hi, el_reason = _row_el(b, choice, E, c_law, L, reps)
    n_lo, n_hi = _interval([r[0] for r in good], b.level_ci)
    d_lo, d_hi = _interval([r[1] for r in good], b.level_ci)
    l_lo, l_hi = _interval([r[2] for r in good], b.level_ci)
    name = f"{'dense' if E == 0 else f'moe{E}'}_{_fmt_c(C)}".replace("+", "")
    cfg, dm, nl, err = fit_geometry(s.family, n, E, s.top_k if E else 0)
    cnt = count_params(cfg)
    ratio = cnt.total / cnt.active
    layout, least = (choose_layout(cfg, s.gpus, s.gpu_mem_gib, s.headroom)
                     if s.gpus else (None, None))
    gpu_h = C / (s.peak_tflops * 1e12 * b.mfu) / 3600.0
    row = {
        "name": name, "experts": E, "top_k": s.top_k if E else 0,
        "law": choice.label, "law_status": choice.status,
        "n_active": n, "n_total": n * ratio, "tokens": d, "flops": C,
        "loss": {"value": L, "lo": l_lo, "hi": l_hi},
        "el": el,
        "el_basis": (None if E == 0 else f"dense {b.dense_by_kind[choice.kind].label}"
                     if choice.kind in b.dense_by_kind else None),
        "intervals": {
            "n_active": {"lo": n_lo, "hi": n_hi},
            "n_total": {"lo": None if n_lo is None else n_lo * ratio,
                        "hi": None if n_hi is None else n_hi * ratio},
            "tokens": {"lo": d_lo, "hi": d_hi},
            "el": {"lo": el_lo, "hi": el_hi}},
        "el_reason": el_reason,
        "replicates": {"used": len(good), "total": len(reps),
                       "no_optimum": len(reps) - len(good)},
        "extrapolation": C / b.cmax,
        "extrapolation_n": ext_n,
        "extrapolation_n_basis": ext_n_basis,
        "extrapolated": extrapolated,
        "extrapolated_reason": (
            f"{C / b.cmax:.3g}x the compute of the largest fitted run ({b.cmax:.3g} "
            f"FLOPs), beyond the {s.max_extrapolation:g}x limit; planned because "
            "--extrapolate was passed" if extrapolated else ""),
        "isoflop_check": choice.isoflop,
        "laws_not_used": list(choice.not_used),
        "layout": layout,
        "layout_reason": ("" if layout or not s.gpus else
                          f"no (ep, zero) layout with tp = 1 fits: needs at least "
                          f"{least:.1f} GiB of model states per GPU, "
                          f"{s.gpu_mem_gib * (1 - s.headroom):.1f} usable"),
        "gpu_hours": gpu_h,
        "wall_hours": gpu_h / s.gpus if s.gpus else None,
        "config": f"{name}.yaml",
        "geometry": {"d_model": dm, "n_layers": nl, "n_heads": cfg.model.n_heads,
                     "ffn_dim": cfg.model.ffn_dim,
                     "expert_ffn_dim": cfg.moe.expert_ffn_dim if E else None,
                     "n_shared": cfg.moe.n_shared if E else None,
                     "config_active": cnt.active, "config_total": cnt.total,
                     "config_active_rel_err": err},
        "_cfg": cfg,
        "_choice": choice,
    }
    row.update(passes_check(cfg, d, b.max_epochs, b.epochs_src, b.corpora))
    if row["refused"]:
        row["config"] = None
    return row


def _check_rows(rows: list, missing: list, s: PlanSettings) -> None:
    """PlanError when no row was planned, every row is refused, or no model fits."""
    if not rows:
        raise PlanError(_no_law(missing))
    if all(r["refused"] for r in rows):
        worst = max(rows, key=lambda r: r["passes"])
        raise PlanError(f"every row is refused: {worst['name']} {worst['refused']}"
                        + (f" ({len(rows) - 1} more)" if len(rows) > 1 else ""))
    if s.gpus and not any(r["layout"] for r in rows):
        raise PlanError(f"memory: no planned model fits {s.gpus} x {s.gpu_mem_gib:g} GiB "
                        f"({rows[0]['layout_reason']} for the smallest row); add GPUs or memory")


def make_plan(fits: dict, s: PlanSettings) -> dict:
    """The plan as a dict: settings, notes, rows (module doc); PlanError when impossible."""
    check_inputs(fits, s)
    notes = list(s.notes)
    b = _plan_basis(fits, s, notes)
    rows, missing = [], []
    for C in s.flops:
        for E in s.experts:
            choice, why = b.laws[E]
            if choice is None:
                line = f"{'dense' if E == 0 else f'{E} experts'}: {why}"
                if line not in missing:  # one line per level, not one per budget
                    missing.append(line)
                continue
            rows.append(_plan_row(fits, s, b, C, E, choice))
    _check_rows(rows, missing, s)
    return {
        "schema_version": 1,
        "fits_source": fits.get("source"),
        "level": b.level_ci,
        "settings": {"flops": s.flops, "experts": s.experts, "top_k": s.top_k,
                     "gpus": s.gpus, "gpu_mem_gib": s.gpu_mem_gib, "mfu": b.mfu,
                     "mfu_source": b.mfu_src, "peak_tflops": s.peak_tflops,
                     "headroom": s.headroom, "kappa": b.kappa,
                     "template": f"{s.family.name} ({s.family.source})",
                     "fitted_flops": [min(r["flops"] for r in b.runs), b.cmax],
                     "fitted_experts": b.fitted_e, "fitted_top_k": b.top_ks,
                     "max_extrapolation": s.max_extrapolation, "extrapolate": s.extrapolate,
                     "max_epochs": b.max_epochs, "max_epochs_source": b.epochs_src},
        "notes": notes,
        "missing": missing,
        "rows": rows,
    }


def make_plan_probe(fits: dict, s: PlanSettings) -> float:
    kappa = flops_ratio(fits)
    why = []
    for E in s.experts:
        ch, reason = choose_law(fits, E, level_of(fits, E), kappa)
        if ch is not None:
            return frontier(ch.point, s.flops[0] / kappa)[0]
        why.append(f"{'dense' if E == 0 else f'{E} experts'}: {reason}")
    raise PlanError(_no_law(why))


def _no_law(why: list[str]) -> str:
    return ("fits.json has no law that can plan these rows (the planner uses only "
            f"{' and '.join(repr(u) for u in USABLE_STATUSES)} laws): " + "; ".join(why))
