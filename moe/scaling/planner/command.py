"""`moe-testbed plan FITS --flops C[,C...]`: read fits.json, choose the config family, make
the plan and write it (the package docstring says what a plan is)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from moe.config import ConfigError
from moe.scaling.analysis.schema import read_fits
from moe.scaling.planner.geometry import (family_from_config, family_from_ladder,
                                          ladder_for_fits, nearest_family, preset_families, rel)
from moe.scaling.planner.limits import (DEFAULT_MFU, DEFAULT_PEAK_TFLOPS, MAX_EXTRAPOLATION,
                                        PlanError)
from moe.scaling.planner.make import PlanSettings, check_inputs, make_plan, make_plan_probe
from moe.scaling.planner.output import plan_curves, write_plan
from moe.scaling.table import ResultsError


def _floats(text: str, name: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PlanError(f"{name} {text!r} is invalid: allowed comma-separated numbers") from None
    if not vals:
        raise PlanError(f"{name} {text!r} is invalid: allowed comma-separated numbers")
    return vals


def build_plan(fits_path, flops: Sequence[float], *, experts: Optional[Sequence[int]] = None,
               top_k: Optional[int] = None, gpus=None, gpu_mem_gib=None, mfu=None,
               peak_tflops: float = DEFAULT_PEAK_TFLOPS, headroom: float = 0.25,
               base=None, ladder=None, max_extrapolation: float = MAX_EXTRAPOLATION,
               extrapolate: bool = False, max_epochs: Optional[float] = None) -> dict:
    """Read fits.json, check the inputs (the budgets against the extrapolation limit before
    any law is chosen), choose the config family, make the plan (with figure data)."""
    fits_path = Path(fits_path)
    fits = read_fits(fits_path)
    runs = [r for r in fits.get("runs", []) if not r.get("held_out")]
    if experts is None:
        experts = [0] + sorted({int(r["n_experts"]) for r in runs if r.get("kind") == "moe"})
    if top_k is None:
        ks = sorted({int(r["top_k"]) for r in runs if r.get("kind") == "moe"})
        top_k = ks[0] if ks else 1
    notes = []
    s = PlanSettings(flops=[float(c) for c in flops], experts=[int(e) for e in experts],
                     top_k=int(top_k), gpus=gpus, gpu_mem_gib=gpu_mem_gib, mfu=mfu,
                     peak_tflops=peak_tflops, headroom=headroom, notes=notes,
                     max_extrapolation=max_extrapolation, extrapolate=extrapolate,
                     max_epochs=max_epochs)
    check_inputs(fits, s)
    fp = fits_path / "fits.json" if fits_path.is_dir() else fits_path
    if base is not None:
        s.family = family_from_config(base)
    else:
        lp = Path(ladder) if ladder else ladder_for_fits(fits, fp)
        if lp is not None:
            s.family = family_from_ladder(lp)
            notes.append(f"configs follow the ladder the fits came from ({rel(lp)}): its base "
                         "config, size rule, LR rule and schedule")
        else:
            s.family = None
    if s.family is None:
        # nearest preset, judged at the first dense-or-MoE optimum of the first budget
        probe = make_plan_probe(fits, s)
        s.family = nearest_family(preset_families(), probe, s.experts[0], s.top_k)
        notes.append(f"configs scaled from the nearest preset, {s.family.name}; pass --ladder "
                     "or --base to use the fitted runs' own setup")
    plan = make_plan(fits, s)
    plan["_curves"] = plan_curves(plan)
    plan["_family"] = s.family
    return plan


def plan_main(argv: list[str] | None = None) -> int:
    """`moe-testbed plan FITS --flops C[,C...] [...]` (module doc)."""
    ap = argparse.ArgumentParser(prog="moe-testbed plan",
                                 description="Plan compute-optimal dense and MoE runs at a FLOP "
                                             "budget from a fits.json; write plan.md, "
                                             "plan.json, plan.png and one config per row.")
    ap.add_argument("fits", help="a fits.json, or a directory holding one")
    ap.add_argument("--flops", required=True, help="FLOP budget(s), comma-separated")
    ap.add_argument("--experts", default=None,
                    help="expert counts, comma-separated, 0 = dense (default: dense and the "
                         "fitted runs' expert counts)")
    ap.add_argument("--top-k", type=int, default=None,
                    help="routed experts per token (default: the fitted MoE runs')")
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--gpu-mem-gib", type=float, default=None)
    ap.add_argument("--mfu", type=float, default=None,
                    help=f"model FLOPs utilisation (default: measured in the fits' runs, else "
                         f"{DEFAULT_MFU} assumed)")
    ap.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                    help="peak dense bf16 TFLOP/s per GPU (default: H100/H200 SXM, 989)")
    ap.add_argument("--headroom", type=float, default=0.25,
                    help="fraction of GPU memory left for activations (default 0.25)")
    ap.add_argument("--ladder", default=None, help="ladder config the fits came from")
    ap.add_argument("--base", default=None, help="model config to scale instead of a preset")
    ap.add_argument("--max-extrapolation", type=float, default=MAX_EXTRAPOLATION,
                    help="largest budget as a multiple of the largest fitted run's compute "
                         f"(default {MAX_EXTRAPOLATION:g}); beyond it plan refuses unless "
                         "--extrapolate")
    ap.add_argument("--extrapolate", action="store_true",
                    help="plan budgets beyond --max-extrapolation anyway; those rows are "
                         "flagged in plan.json and plan.md")
    ap.add_argument("--max-epochs", type=float, default=None,
                    help="passes over the training corpus a row may take (default: the "
                         "ladder's max_epochs, 1 unless it sets one); rows beyond it are "
                         "refused")
    ap.add_argument("--out", default=None, help="output directory (default: plan/ next to FITS)")
    try:
        a = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    fits_path = Path(a.fits)
    out = Path(a.out) if a.out else (fits_path if fits_path.is_dir() else fits_path.parent) / "plan"
    try:
        if not fits_path.exists():
            raise PlanError(f"no fits.json at {fits_path}")
        flops = _floats(a.flops, "--flops")
        experts = None if a.experts is None else [int(v) for v in _floats(a.experts, "--experts")]
        plan = build_plan(fits_path, flops, experts=experts, top_k=a.top_k, gpus=a.gpus,
                          gpu_mem_gib=a.gpu_mem_gib, mfu=a.mfu, peak_tflops=a.peak_tflops,
                          headroom=a.headroom, base=a.base, ladder=a.ladder,
                          max_extrapolation=a.max_extrapolation, extrapolate=a.extrapolate,
                          max_epochs=a.max_epochs)
        if out.exists() and not out.is_dir():
            raise PlanError(f"--out {out} is an existing file")
        md = write_plan(plan, out)
    except (PlanError, ResultsError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write the plan to {out}: {exc}", file=sys.stderr)
        return 2
    print(md.read_text())
    print(md)
    return 0
