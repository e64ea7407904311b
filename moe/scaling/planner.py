"""`moe-testbed plan`: from fitted laws to the run you cannot yet afford.

    moe-testbed plan benchmarks/results/ladder_cpu_isoflop --flops 1e13,1e14 --out runs/plan

Reads a fits.json (moe/scaling/analysis.py) and answers, for each FLOP budget C and for
dense and each expert count: the compute-optimal active parameters and tokens, the total
parameters of a model of that size, the predicted loss, and the efficiency leverage
against the dense optimum at the same C, each with an interval propagated from the
bootstrap replicates stored in fits.json (never refitted).

Limits, checked in this order:
  - extrapolation: a budget more than MAX_EXTRAPOLATION (100) x the compute of the largest
    fitted (not held-out) run (--max-extrapolation) is refused with one line naming the
    factor, before any law is chosen (check_extrapolation); --extrapolate plans it anyway
    and flags each such row (`extrapolated`, `extrapolated_reason`; plan.md: a warning line,
    "BEYOND FITTED RANGE xF" and 2 significant figures). Every row also records
    `extrapolation` (C / the largest fitted run's FLOPs) and `extrapolation_n` (N_opt / the
    largest fitted run's params_active, over the runs of the row's level when it has
    fitted runs, else over all fitted runs: `extrapolation_n_basis` says which).
  - passes: tokens / the training tokens of the corpus the row's config trains on (the
    ladder's, when configs follow the ladder), from moe.data.train_token_count without
    building: exact from a prepared cache; when the corpus is not prepared, `passes` is
    None with the reason and the on-disk estimate (`passes_estimate`), not checked. A row
    whose passes exceed max_epochs (--max-epochs, else the ladder's max_epochs, default 1)
    is refused: it keeps its numbers, gets `refused` (why) and no config; every row refused
    is an error.

Laws, in order of preference (every row names the one it used), only those whose status
is in USABLE_STATUSES ("ok", "unbounded"); "degenerate", "unidentified", "not_converged",
"not_fitted" are passed over with their status and reason quoted (`laws_not_used`):
  1. Ludziejewski et al. 2025's joint law L(N_active, D, E) (`joint_laws.joint`): at a
     fixed expert count E it is a Chinchilla law in (N_active, D) with
     A_E = a E'^delta, alpha_E = -(alpha + gamma ln E'), B_E = b E'^omega,
     beta_E = -(beta + zeta ln E'), irreducible loss c (E' Clark's saturating transform);
  2. per-level approach 3: `chinchilla` for dense (and `chinchilla_levels.<level>` for a
     MoE level when a fits.json carries it);
  otherwise the row is refused with what is missing (e.g. no token variation).
Where the row's level has approach-2 optima (`isoflop.<level>` with status "ok"), the
preference yields to agreement (choose_law): the first law whose N*(C) lies inside approach
2's interval at every measured budget is used, else the closest in RMS log N, and the
disagreement is recorded (`isoflop_check`, a note, a line in plan.md). The interval of a
budget's N* is the pair of trained sizes bracketing it (widened to the approach-2 line's
bootstrap interval when fit_isoflop gave one): isoflop_optima. EL always compares a MoE
row with the dense form of its own law (`el_basis`).

Compute-optimal point of L = E0 + A/N^alpha + B/D^beta under C = 6 N D (Hoffmann et al.
2022, eq. 4): N* = G (C/6)^(beta/(alpha+beta)), D* = (C/6)^(alpha/(alpha+beta)) / G,
G = (alpha A / (beta B))^(1/(alpha+beta)), computed in log space (raw-unit amplitudes can
be 1e60). On the frontier L*(C) = E0 + K (C/6)^(-alpha beta/(alpha+beta)) with
K = A G^-alpha + B G^beta, so the dense compute that reaches a loss L is
C_d(L) = 6 ((L - E0)/K)^(-(alpha+beta)/(alpha beta)) and the efficiency leverage of a MoE
optimum is EL = C_d(L_moe*(C)) / C (infinite when L_moe* is below the dense asymptote).

FLOPs: the laws are fitted on the table's N_active and D; the table's `flops` column may
count more than 6 N D (attention, the output head: the ladder records exact matmul
FLOPs). The plan converts a budget C to the law's 6 N D with kappa = median over the
fitted runs of flops / (6 N_active D), and says so (kappa = 1 for 6ND tables).

Memory (with --gpus/--gpu-mem-gib): weights + gradients + AdamW states per GPU, bf16 mixed
precision 2 + 2 + 12 bytes per parameter (fp32 master, m, v), fp32 4 + 4 + 8; ZeRO stage 1
partitions the optimizer states, stage 2 also the gradients, over the data-parallel ranks
(dense parameters over all G, routed experts over the G / ep replicas of each expert);
expert parallelism ep keeps 1/ep of the routed experts per GPU; tp = 1. The layout chosen
is the first that fits in the order zero 0, 1, 2 and, within each, ep ascending, leaving
`headroom` of the memory for activations and buffers (activations are not modelled: choose
micro-batch and activation checkpointing to fit them).

Time: GPU-hours = C / (peak x MFU) / 3600; wall hours = that / G. MFU: --mfu, else the
median `mfu` of the fits' runs when the table carried one, else an assumption stated in
plan.md.

Configs: each row gets `<name>.yaml`, a complete training config whose geometry follows
the ladder the fits came from (its base config, size rule, LR rule and schedule) when that
ladder is known, else the nearest preset in configs/ scaled at the preset's aspect ratio;
its `count_params` active parameters are within 5% of the plan (checked).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from moe.accounting import GIB, bytes_per_param, count_params
from moe.config import Config, ConfigError, apply_overrides, config_from_dict, read_yaml
from moe.scaling.analysis import (_independent_spread, _params_of, _replicate_params,
                                  read_fits)
from moe.scaling.fits import clark_expert_transform
from moe.scaling.results import ResultsError

__all__ = ["PlanError", "LawForm", "frontier", "dense_compute_for_loss", "make_plan",
           "write_plan", "plan_main", "MAX_FLOPS", "MAX_EXTRAPOLATION", "USABLE_STATUSES",
           "choose_law", "check_extrapolation", "corpus_size"]

MAX_FLOPS = 1e28  # a budget above this is a typo, not a plan
#: Default limit on a budget's compute over the largest fitted run's: `plan` refuses a
#: budget beyond it unless --extrapolate is passed (then those rows are flagged).
#: --max-extrapolation changes it.
MAX_EXTRAPOLATION = 100.0
DEFAULT_MFU = 0.35
DEFAULT_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16 tensor-core peak (NVIDIA datasheet)
CONFIG_RTOL = 0.05
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class PlanError(ValueError):
    """The fits, the budget or the machine cannot give a plan; the message says why."""


# ----------------------------------------------------------------------------- laws


@dataclass
class LawForm:
    """A Chinchilla-form law L = E0 + exp(A_log) / N^alpha + exp(B_log) / D^beta."""

    E0: float
    A_log: float
    alpha: float
    B_log: float
    beta: float

    @property
    def ok(self) -> bool:
        vals = (self.E0, self.A_log, self.alpha, self.B_log, self.beta)
        return all(math.isfinite(v) for v in vals) and self.alpha > 0 and self.beta > 0

    def loss(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return (self.E0 + np.exp(self.A_log - self.alpha * np.log(N))
                + np.exp(self.B_log - self.beta * np.log(D)))


def chinchilla_form(p: dict) -> LawForm:
    """From a `chinchilla` law's parameters (E, A, B, alpha, beta)."""
    return LawForm(float(p["E"]), _log(p["A"]), float(p["alpha"]), _log(p["B"]),
                   float(p["beta"]))


def joint_form(p: dict, experts: float, e_start: float = 2.0, e_max: float = 256.0) -> LawForm:
    """Ludziejewski et al.'s joint law at a fixed expert count (1 = dense) as a Chinchilla
    form (exponents in the paper's sign: negative for a falling law)."""
    lE = float(np.log(clark_expert_transform(max(1.0, float(experts)), e_start, e_max)))
    return LawForm(float(p["c"]), _log(p["a"]) + p["delta"] * lE,
                   -(p["alpha"] + p["gamma"] * lE), _log(p["b"]) + p["omega"] * lE,
                   -(p["beta"] + p["zeta"] * lE))


def _log(v) -> float:
    v = float(v)
    return math.log(v) if v > 0 else float("nan")


def frontier(f: LawForm, C: float) -> Optional[tuple[float, float, float]]:
    """(N*, D*, L*) under 6 N D = C, or None for a law with no interior optimum."""
    if not f.ok:
        return None
    s = f.alpha + f.beta
    logG = (math.log(f.alpha) + f.A_log - math.log(f.beta) - f.B_log) / s
    lc = math.log(C / 6.0)
    ln_n = logG + f.beta / s * lc
    ln_d = f.alpha / s * lc - logG
    n, d = math.exp(ln_n), math.exp(ln_d)
    return n, d, float(f.loss(n, d))


def dense_compute_for_loss(f: LawForm, loss: float) -> float:
    """Compute the dense law needs, on its frontier, to reach `loss` (inf below E0)."""
    if not f.ok:
        return float("nan")
    s = f.alpha + f.beta
    logG = (math.log(f.alpha) + f.A_log - math.log(f.beta) - f.B_log) / s
    logK = np.logaddexp(f.A_log - f.alpha * logG, f.B_log + f.beta * logG)
    gap = loss - f.E0
    if gap <= 0:
        return float("inf")
    return 6.0 * math.exp(-(math.log(gap) - logK) * s / (f.alpha * f.beta))


@dataclass
class LawChoice:
    kind: str  # "joint" | "chinchilla"
    label: str
    point: LawForm
    replicates: list  # [LawForm]
    bounded: bool
    status: str
    # approach-2 agreement of this law (isoflop_check), or None when the level has no
    # approach-2 optima; set by choose_law
    isoflop: Optional[dict] = None
    # the laws passed over before this one, each with why (status, no optimum, or
    # disagreement with approach 2)
    not_used: list = field(default_factory=list)


_JOINT = ("a", "alpha", "gamma", "delta", "b", "beta", "zeta", "omega", "c")
_CHIN = ("E", "A", "B", "alpha", "beta")

#: The law statuses the planner plans with. Every other status is refused with the law's
#: status and reason quoted: "not_converged", "not_fitted", and (moe/scaling/analysis.py)
#: "degenerate" (a parameter on a box bound, or the irreducible term collapsed to ~0) and
#: "unidentified" (bootstrap replicates split into separate modes).
USABLE_STATUSES = ("ok", "unbounded")


def _usable(entry) -> bool:
    """A law entry with a status in USABLE_STATUSES and a fitted `alpha` value."""
    return isinstance(entry, dict) and entry.get("status") in USABLE_STATUSES and all(
        isinstance(entry.get(k), dict) and entry[k].get("value") is not None
        for k in ("alpha",))


def _unusable_why(name: str, entry) -> str:
    """Why a law entry is not planned with: its status and reason quoted."""
    if entry is None:
        return f"no {name} in fits.json"
    if not isinstance(entry, dict):
        return f"{name} is not a law entry ({type(entry).__name__})"
    st = entry.get("status", "missing")
    reason = str(entry.get("reason") or "").strip()
    if st in USABLE_STATUSES:
        return f"{name} (status {st!r}) has no fitted parameter values"
    return f"{name} is {st}" + (f" ({reason})" if reason else "")


def law_candidates(fits: dict, experts: int, level: Optional[str]) -> tuple[list, list]:
    """The usable laws for a row, in preference order (module doc), and why each other one
    is not usable: ([LawChoice], [str])."""
    joint = (fits.get("joint_laws") or {}).get("joint")
    cands, why = [], []
    if _usable(joint):
        fx = joint.get("fixed") or {}
        es, em = float(fx.get("e_start", 2.0)), float(fx.get("e_max", 256.0))
        E = 1 if experts == 0 else experts
        point = joint_form(_params_of(joint, _JOINT), E, es, em)
        reps = [joint_form(p, E, es, em) for p in _replicate_params(joint, _JOINT)]
        if point.ok:
            cands.append(LawChoice("joint", "Ludziejewski et al. joint L(N_active, D, E)", point,
                                   reps, bool(joint.get("bounded")), joint["status"]))
        else:
            why.append(f"the joint law has no optimum at {experts or 'dense'} experts "
                       f"(alpha_E {point.alpha:.3g}, beta_E {point.beta:.3g})")
    else:
        why.append(_unusable_why("joint law", joint))
    if experts == 0:
        entry, name = fits.get("chinchilla"), "chinchilla (dense approach 3)"
    else:
        entry = (fits.get("chinchilla_levels") or {}).get(level) if level else None
        name = f"chinchilla_levels.{level} (approach 3 for {experts} experts)"
    if _usable(entry):
        point = chinchilla_form(_params_of(entry, _CHIN))
        reps = [chinchilla_form(p) for p in _replicate_params(entry, _CHIN)]
        if point.ok:
            cands.append(LawChoice("chinchilla",
                                   f"Chinchilla approach 3 L(N, D), {level or 'dense'}",
                                   point, reps, bool(entry.get("bounded")), entry["status"]))
        else:
            why.append(f"{name} has a non-positive exponent")
    else:
        why.append(_unusable_why(name, entry))
    return cands, why


def isoflop_optima(fits: dict, level: Optional[str]) -> tuple[Optional[list], str]:
    """Approach 2's measured optima for a level: ([{flops, n_opt, lo, hi}], "") or
    (None, why there are none).

    The interval of each budget's N*: the two trained sizes of that budget's profile that
    bracket N* (the profile's resolution: fit_isoflop drops a budget whose argmin is at an
    edge, so a kept N* always has a trained size on each side; the runs are fits.json's
    runs of the level within the budget's flops_range), widened to the percentile interval
    of the approach-2 line's bootstrap replicates at that budget when fit_isoflop gave an
    exponent interval (>= 4 kept budgets; moe/scaling/isoflop.py, step 4). fits.json holds
    no other per-budget interval.
    """
    if not level:
        return None, "no fitted runs at this expert count"
    iso = (fits.get("isoflop") or {}).get(level)
    if not isinstance(iso, dict):
        return None, f"no isoflop.{level} in fits.json"
    if iso.get("status") != "ok" or not iso.get("budgets"):
        return None, (f"isoflop.{level} status {iso.get('status')!r}: "
                      f"{iso.get('reason', '')}").rstrip(": ")
    runs = [r for r in fits.get("runs", []) if r.get("level") == level]
    q = 100.0 * (1.0 - float(iso.get("level", 0.95))) / 2.0
    reps = list(zip(iso.get("intercept_replicates") or [], iso.get("exponent_replicates") or []))
    out = []
    for b in iso["budgets"]:
        c, n = float(b["flops"]), float(b["n_opt"])
        f0, f1 = b.get("flops_range") or (c, c)
        sizes = sorted({float(r["params_active"]) for r in runs
                        if f0 * (1 - 1e-9) <= r["flops"] <= f1 * (1 + 1e-9)})
        below = [x for x in sizes if x <= n]
        above = [x for x in sizes if x >= n]
        lo = below[-1] if below else n
        hi = above[0] if above else n
        basis = "bracketing trained sizes"
        if iso.get("exponent_interval") and len(reps) >= 2:
            line = np.exp([i + e * math.log(c) for i, e in reps])
            rl, rh = np.percentile(line, [q, 100.0 - q])
            lo, hi = min(lo, float(rl)), max(hi, float(rh))
            basis += " and the approach-2 line's bootstrap interval"
        out.append({"flops": c, "n_opt": n, "lo": lo, "hi": hi, "basis": basis})
    return out, ""


def isoflop_check(choice: LawChoice, optima: list, kappa: float) -> dict:
    """Compare a law's N*(C) with approach 2's optima at the measured budgets (the law at
    6 N D = C / kappa, the budgets being the table's FLOPs): per budget the law's N*, whether
    it lies in [lo, hi], and the law's log-distance; `agrees` when inside at every budget,
    `rms_log_dev` the root mean square of ln(N*_law / N*_approach2) over the budgets."""
    rows, devs = [], []
    for o in optima:
        fr = frontier(choice.point, o["flops"] / kappa)
        n_law = fr[0] if fr else float("nan")
        inside = bool(fr) and o["lo"] * (1 - 1e-9) <= n_law <= o["hi"] * (1 + 1e-9)
        dev = math.log(n_law / o["n_opt"]) if fr else float("inf")
        devs.append(dev)
        rows.append(dict(o, law_n_opt=n_law, inside=inside, log_dev=dev))
    worst = max(rows, key=lambda r: abs(r["log_dev"]))
    return {"law": choice.label, "budgets": rows, "agrees": all(r["inside"] for r in rows),
            "rms_log_dev": float(math.sqrt(np.mean(np.square(devs)))),
            "worst": (f"planning law {choice.label} puts N*({worst['flops']:.3g}) at "
                      f"{worst['law_n_opt']:.2g}; approach 2 measured {worst['n_opt']:.2g} "
                      f"[{worst['lo']:.2g}, {worst['hi']:.2g}]")}


def choose_law(fits: dict, experts: int, level: Optional[str],
               kappa: Optional[float] = None) -> tuple[Optional[LawChoice], str]:
    """The law a row is planned with, or (None, why no law is usable).

    Candidates: law_candidates (joint, then per-level approach 3). Where the level has
    approach-2 optima (fits["isoflop"][level] with status "ok"), each candidate's N*(C) is
    compared with them (isoflop_check): the first candidate inside approach 2's intervals
    at every measured budget is chosen; if none agrees, the one with the smallest RMS log
    deviation, its `isoflop["disagreement"]` saying where it misses. Without approach-2
    optima the first candidate is chosen and `isoflop` is None. kappa: flops_ratio(fits)
    by default.
    """
    cands, why = law_candidates(fits, experts, level)
    if not cands:
        return None, "; ".join(why)
    optima, iso_why = isoflop_optima(fits, level)
    not_used = list(why)
    if optima is None:
        ch = cands[0]
        ch.not_used = not_used + [f"{c.label}: a later preference" for c in cands[1:]]
        return ch, ""
    k = flops_ratio(fits) if kappa is None else kappa
    checks = [isoflop_check(c, optima, k) for c in cands]
    agree = [i for i, chk in enumerate(checks) if chk["agrees"]]
    pick = agree[0] if agree else min(range(len(cands)),
                                      key=lambda i: checks[i]["rms_log_dev"])
    ch = cands[pick]
    ch.isoflop = dict(checks[pick], level=level, candidates=[
        {"law": c.label, "agrees": chk["agrees"], "rms_log_dev": chk["rms_log_dev"],
         "worst": chk["worst"]} for c, chk in zip(cands, checks)])
    ch.isoflop["disagreement"] = "" if agree else checks[pick]["worst"] + (
        " (no candidate law agrees with approach 2; this one is the closest in log N)"
        if len(cands) > 1 else " (the only usable law; it disagrees with approach 2)")
    for i, (c, chk) in enumerate(zip(cands, checks)):
        if i == pick:
            continue
        not_used.append(f"{c.label}: " + (
            "agrees with approach 2 but is a later preference" if chk["agrees"] else
            f"disagrees with approach 2 ({chk['worst']})"
            + ("" if agree else "; farther from it in log N than the law used")))
    ch.not_used = not_used
    return ch, ""


def token_variation(fits: dict) -> float:
    """Residual std of log D on log N over the fitted runs (0: tokens follow size)."""
    runs = [r for r in fits.get("runs", []) if not r.get("held_out")]
    if len(runs) < 3:
        return 0.0
    return _independent_spread(np.array([r["params_active"] for r in runs], float),
                               np.array([r["tokens"] for r in runs], float))


def flops_ratio(fits: dict) -> float:
    """kappa: median of flops / (6 N_active D) over the fitted runs (1 when absent)."""
    k = [r["flops"] / (6.0 * r["params_active"] * r["tokens"]) for r in fits.get("runs", [])
         if not r.get("held_out") and r.get("flops") and r.get("tokens")]
    return float(np.median(k)) if k else 1.0


# ------------------------------------------------------------------------ geometry


@dataclass
class Family:
    """How a model of a given width is built: from a ladder (its base config, size and
    sparsity rules, LR rule and schedule) or from a preset config scaled at its aspect."""

    name: str
    source: str
    base: dict  # resolved config dict (base chain followed, ladder overrides applied)
    aspect: float  # d_model / n_layers
    head_dim: int
    ffn_ratio: float
    expert_ratio: float  # expert_ffn_dim / d_model (preset families)
    n_shared: int
    first_k_dense: int
    granule: int
    ladder: object = None  # LadderConfig when from a ladder
    min_layers: int = 1
    max_layers: int = 256

    def overrides(self, d_model: int, n_layers: int, experts: int, top_k: int) -> list[str]:
        if self.ladder is not None:
            from moe.scaling.ladder import SizeSpec, SparsitySpec, _size_overrides

            sp = SparsitySpec("plan", n_routed=experts, top_k=top_k if experts else 1,
                              n_shared=self.n_shared if experts else 0)
            size = SizeSpec("plan", d_model, n_layers, _heads(d_model, self.head_dim))
            return _size_overrides(size, sp, self.ffn_ratio)
        n_heads = _heads(d_model, self.head_dim)
        ov = [f"model.d_model={d_model}", f"model.n_layers={n_layers}",
              f"model.n_heads={n_heads}", "model.head_dim=null", "model.n_kv_heads=null",
              f"model.ffn_dim={int(round(self.ffn_ratio * d_model))}"]
        if experts == 0:
            return ov + ["moe.n_routed=0", f"model.first_k_dense={n_layers}"]
        ex = max(2, int(round(self.expert_ratio * d_model / 2)) * 2)
        return ov + [f"moe.n_routed={experts}", f"moe.top_k={top_k}",
                     f"moe.n_shared={self.n_shared}", f"moe.expert_ffn_dim={ex}",
                     "moe.n_groups=1", "moe.topk_groups=1",
                     f"model.first_k_dense={min(self.first_k_dense, n_layers - 1)}"]

    def config(self, d_model: int, n_layers: int, experts: int, top_k: int,
               extra: Sequence[str] = ()) -> Config:
        data = apply_overrides(copy.deepcopy(self.base),
                               self.overrides(d_model, n_layers, experts, top_k) + list(extra))
        return config_from_dict(data)


def _rel(path) -> str:
    """A path as the user would type it: relative to the working directory when under it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _resolved_dict(path: Path, overrides: Sequence[str] = ()) -> dict:
    return apply_overrides(read_yaml(Path(path)), list(overrides))


def family_from_ladder(path) -> Family:
    from moe.scaling.ladder import load_ladder

    lcfg, base = load_ladder(path)
    data = _resolved_dict(base, lcfg.overrides)
    big = max(lcfg.sizes, key=lambda s: s.d_model * s.n_layers)
    shared = [s.n_shared for s in lcfg.sparsities if s.n_routed]
    layers = sorted({s.n_layers for s in lcfg.sizes})
    return Family(name=f"ladder {lcfg.name}", source=_rel(path), base=data,
                  aspect=big.d_model / big.n_layers, head_dim=big.d_model // big.n_heads,
                  ffn_ratio=lcfg.ffn_ratio, expert_ratio=0.0,
                  n_shared=shared[0] if shared else 0, first_k_dense=0,
                  granule=max(4, big.d_model // big.n_heads), ladder=lcfg,
                  min_layers=layers[0])


def family_from_config(path) -> Family:
    data = _resolved_dict(Path(path))
    cfg = config_from_dict(copy.deepcopy(data))
    m, e = cfg.model, cfg.moe
    hd = m.hdim
    return Family(name=f"preset {cfg.name}", source=_rel(path), base=data,
                  aspect=m.d_model / m.n_layers, head_dim=hd, ffn_ratio=m.ffn_dim / m.d_model,
                  expert_ratio=(e.expert_ffn_dim / m.d_model) if e.enabled else
                  m.ffn_dim / m.d_model / 4,
                  n_shared=e.n_shared if e.enabled else 1,
                  first_k_dense=m.first_k_dense if e.enabled else 1,
                  granule=max(2, hd), min_layers=2 if e.enabled else 1)


def ladder_for_fits(fits: dict, fits_path: Path) -> Optional[Path]:
    """configs/ladder/<name>.yaml when fits.json came from `moe-testbed ladder` (its source is
    runs/ladder-<name>/results.csv, or a results.csv beside it names it)."""
    src = str(fits.get("source") or "")
    names = []
    for part in Path(src).parts + (fits_path.parent.name,):
        if part.startswith("ladder-"):
            names.append(part[len("ladder-"):])
        elif part.startswith("ladder_"):
            names.append(part[len("ladder_"):].replace("_", "-"))
    for n in names:
        p = REPO_CONFIGS / "ladder" / f"{n}.yaml"
        if p.is_file():
            return p
    return None


def preset_families() -> list[Family]:
    out = []
    for p in sorted(REPO_CONFIGS.glob("*.yaml")):
        try:
            out.append(family_from_config(p))
        except (ConfigError, OSError, KeyError, ValueError):
            continue
    return out


def _heads(d_model: int, head_dim: int) -> int:
    """Head count for a width: the divisor of d_model with an even head size nearest
    d_model / head_dim (RoPE needs an even head dimension)."""
    want = max(1.0, d_model / head_dim)
    opts = [h for h in range(1, d_model // 2 + 1) if d_model % h == 0 and (d_model // h) % 2 == 0]
    return min(opts, key=lambda h: (abs(math.log(h / want)), h)) if opts else 1


def fit_geometry(fam: Family, target: float, experts: int,
                 top_k: int) -> tuple[Config, int, int, float]:
    """(config, d_model, n_layers, relative error) of the family member whose active
    parameters are nearest `target`: widths in steps of 2, depths around the family's
    aspect ratio (d_model / n_layers); among members within 2% of the target the one
    nearest that aspect, else the nearest count."""
    cands = []
    per = (top_k + fam.n_shared) if experts else 1
    d = max(4, fam.granule) - 2
    hd = fam.head_dim
    while d < 200_000:
        # small widths in steps of 2; from 8 heads up, whole heads of the family's size
        # (d_model = n_heads x head_dim, as presets are), depth then gives the fine steps
        d = d + 2 if d + 2 < 8 * hd or hd % 2 else (d // hd + 1) * hd
        if experts and fam.ladder is not None and int(round(fam.ffn_ratio * d)) % per:
            continue
        L0 = max(fam.min_layers, min(fam.max_layers, int(round(d / fam.aspect))))
        over = True
        steps = (-1, 0, 1) if d < 8 * hd else (-3, -2, -1, 0, 1, 2, 3)
        for L in sorted({max(fam.min_layers, L0 + k) for k in steps}):
            try:
                cfg = fam.config(d, L, experts, top_k)
            except ConfigError:
                continue
            a = count_params(cfg).active
            over = over and a > 1.5 * target
            shape = (abs(math.log(d / L / fam.aspect))
                     + abs(math.log(cfg.model.hdim / fam.head_dim)))
            cands.append((abs(math.log(a / target)), shape, cfg, d, L, a / target - 1.0))
        if over and cands:
            break
    if not cands:
        raise PlanError(f"{fam.name}: no geometry for {target:.3g} active params")
    near = [c for c in cands if c[0] <= 0.02]
    best = min(near, key=lambda c: (c[1], c[0])) if near else min(cands, key=lambda c: c[0])
    return best[2], best[3], best[4], best[5]


def nearest_family(families: list[Family], target: float, experts: int,
                   top_k: int) -> Family:
    """The preset whose own active size (at this expert count) is nearest the target among
    those whose embeddings leave room for it (< half the target)."""
    best = None
    for fam in families:
        own_cfg = config_from_dict(copy.deepcopy(fam.base))
        try:
            own = fam.config(own_cfg.model.d_model, own_cfg.model.n_layers, experts, top_k)
        except ConfigError:
            continue
        c = count_params(own)
        if c.embedding > 0.5 * target:
            continue
        d = abs(math.log(c.active / target))
        if best is None or d < best[0]:
            best = (d, fam)
    if best is None:
        raise PlanError(f"no preset in {REPO_CONFIGS} can be scaled to {target:.3g} active "
                        "params (embeddings alone exceed half of it); pass --base CONFIG")
    return best[1]


# -------------------------------------------------------------------- memory, time


def choose_layout(cfg: Config, gpus: int, mem_gib: float, headroom: float = 0.25,
                  precision: Optional[str] = None) -> tuple[Optional[dict], float]:
    """The first (zero, ep) layout whose model states fit; (None, least GiB needed) if none."""
    c = count_params(cfg)
    prec = precision or ("fp32" if cfg.train.precision == "fp32" else "bf16")
    w, g, o = bytes_per_param(prec)
    expert_per_layer = c.routed_experts / c.n_moe_layers if c.n_moe_layers else 0.0
    mtp_routed = (cfg.mtp.depth * expert_per_layer
                  if cfg.is_moe and cfg.model.n_layers > cfg.model.first_k_dense else 0.0)
    routed = c.routed_experts + mtp_routed
    dense = c.total_with_mtp - routed
    budget = mem_gib * GIB * (1.0 - headroom)
    E = cfg.moe.n_routed if cfg.is_moe else 0
    eps = [ep for ep in range(1, gpus + 1) if gpus % ep == 0 and (E == 0 and ep == 1 or
                                                                  E and E % ep == 0)]
    least = float("inf")
    for zero in (0, 1, 2):
        for ep in eps:
            dp, edp = gpus, gpus // ep

            def per(n, ranks):
                return n * (w + (g / ranks if zero >= 2 else g) + (o / ranks if zero >= 1 else o))

            need = per(dense, dp) + per(routed / ep, edp)
            least = min(least, need)
            if need <= budget:
                return {"tp": 1, "ep": ep, "dp": gpus, "zero": zero, "precision": prec,
                        "states_gib_per_gpu": need / GIB, "gpus": gpus,
                        "gpu_mem_gib": mem_gib, "headroom": headroom}, need / GIB
    return None, least / GIB


# ---------------------------------------------------------------------------- plan


def _interval(vals: Sequence[float], level: float) -> tuple[Optional[float], Optional[float]]:
    v = np.asarray([x for x in vals if x is not None and math.isfinite(x)], float)
    if v.size < 2:
        return None, None
    q = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(v, [q, 100.0 - q])
    return float(lo), float(hi)


def _level_of(fits: dict, experts: int) -> Optional[str]:
    for r in fits.get("runs", []):
        if experts == 0 and r.get("kind") == "dense":
            return r.get("level")
        if experts and r.get("kind") == "moe" and int(r.get("n_experts") or 0) == experts:
            return r.get("level")
    return None


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


def largest_fitted_flops(fits: dict) -> float:
    """The compute of the largest fitted (not held-out) run."""
    return max(r["flops"] for r in fits.get("runs", []) if not r.get("held_out"))


def check_extrapolation(fits: dict, flops: Sequence[float], limit: float = MAX_EXTRAPOLATION,
                        extrapolate: bool = False) -> None:
    """PlanError (one line, naming the largest budget and its factor) when a budget is more
    than `limit` x the compute of the largest fitted run and `extrapolate` is False. Reads
    only the runs: it runs before any law is chosen, so it holds when no law is usable."""
    if not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit >= 1):
        raise PlanError(f"--max-extrapolation {limit!r} is invalid: allowed a number >= 1")
    cmax = largest_fitted_flops(fits)
    worst = max(flops)
    if worst / cmax > limit and not extrapolate:
        default = "the default limit" if limit == MAX_EXTRAPOLATION else "--max-extrapolation"
        raise PlanError(f"--flops {worst:.3g} is {worst / cmax:.3g}x the compute of the largest "
                        f"fitted run ({cmax:.3g} FLOPs); {default} is {limit:g}x: pass "
                        "--extrapolate to plan anyway (every row beyond it is then flagged)")


def _max_epochs(s: PlanSettings) -> tuple[float, str]:
    """The passes over the corpus a row may take, and where that limit comes from."""
    if s.max_epochs is not None:
        return float(s.max_epochs), "--max-epochs"
    lad = s.family.ladder if s.family is not None else None
    if lad is not None:
        return float(lad.max_epochs), f"max_epochs of {s.family.name}"
    from moe.scaling.ladder import LadderConfig

    default = float(LadderConfig.__dataclass_fields__["max_epochs"].default)
    return default, "the ladder default max_epochs (moe/scaling/ladder.py)"


def corpus_size(cfg: Config):
    """The training split of `cfg`'s corpus in tokens, without building anything:
    moe.data.train_token_count(build=False) reads a prepared cache's meta.json (or a
    Megatron index), else estimates from the bytes on disk (`exact` False), else gives
    train_tokens None with the reason."""
    from moe.data import train_token_count

    dc = cfg.data
    return train_token_count(dc.corpus, dc.tokenizer, cfg.model.vocab_size, dc.cache_dir,
                             dc.val_fraction, build=False, **dc.options())


def _passes(cfg: Config, tokens: float, max_epochs: float, src: str, cache: dict) -> dict:
    """A row's passes over its config's corpus: tokens / the corpus' training tokens when
    the count is exact (a prepared cache); otherwise passes None with the reason and the
    on-disk estimate, and the row is not checked. Refused when exact passes > max_epochs."""
    dc = cfg.data
    key = (str(dc.corpus), dc.tokenizer, cfg.model.vocab_size, str(dc.cache_dir),
           dc.val_fraction, tuple(dc.options().items()))
    if key not in cache:
        cache[key] = corpus_size(cfg)
    cs = cache[key]
    out = {"corpus": cs.corpus, "train_tokens": cs.train_tokens if cs.exact else None,
           "passes": None, "passes_estimate": None, "passes_note": cs.note,
           "max_epochs": max_epochs, "refused": None}
    if not cs.train_tokens:
        out["passes_note"] = f"passes unknown: {cs.note}"
        return out
    p = tokens / cs.train_tokens
    if not cs.exact:
        out["passes_estimate"] = p
        out["passes_note"] = (f"passes unknown, ~{p:.3g} estimated ({cs.note}); not checked "
                              f"against max_epochs {max_epochs:g}")
        return out
    out["passes"] = p
    if p > max_epochs:
        out["refused"] = (f"would train {p:.3g} passes over data.corpus {cs.corpus!r} "
                          f"({tokens:.3g} tokens over {cs.train_tokens:,} training tokens) > "
                          f"max_epochs {max_epochs:g} ({src}); use a larger corpus or pass "
                          "--max-epochs")
    return out


def _n_extrapolation(fits: dict, experts: int, n: float) -> tuple[float, str]:
    """N_opt / the largest fitted (not held-out) run's params_active: over the runs of this
    expert count's level when it has fitted runs, else over all fitted runs; and which."""
    runs = [r for r in fits.get("runs", []) if not r.get("held_out")]
    level = _level_of(fits, experts)
    own = [r for r in runs if level is not None and r.get("level") == level]
    if own:
        return n / max(r["params_active"] for r in own), f"largest fitted {level} run"
    return n / max(r["params_active"] for r in runs), "largest fitted run (any level)"


def make_plan(fits: dict, s: PlanSettings) -> dict:
    """The plan as a dict: settings, notes, rows (module doc); PlanError when impossible."""
    check_inputs(fits, s)
    level_ci = float((fits.get("settings") or {}).get("level", 0.95))
    runs = [r for r in fits.get("runs", []) if not r.get("held_out")]
    cmax = max(r["flops"] for r in runs)
    kappa = flops_ratio(fits)
    spread = token_variation(fits)
    notes = list(s.notes)
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
    rows, missing = [], []
    # the law of each expert count: the same for every budget
    laws = {E: choose_law(fits, E, _level_of(fits, E), kappa)
            for E in dict.fromkeys([0, *s.experts])}
    for E in s.experts:
        ch = laws[E][0]
        if ch is not None and ch.isoflop and ch.isoflop["disagreement"]:
            notes.append(f"{'dense' if E == 0 else f'{E} experts'}: "
                         f"{ch.isoflop['disagreement']}")
    # EL is measured within one law: a MoE row's loss against the dense form of the same
    # law (the joint law at E = 1, or dense approach 3 for a per-level approach 3), whichever
    # law the dense rows were planned with (the approach-2 check may pick another)
    dense_cands, dense_cwhy = law_candidates(fits, 0, _level_of(fits, 0))
    dense_by_kind = {c.kind: c for c in dense_cands}
    if any(s.experts):
        notes.append("EL: each MoE row's optimum loss against the dense form of the same law "
                     "(the joint law at E = 1; dense approach 3 for a per-level approach 3), "
                     "row field el_basis")
    max_epochs, epochs_src = _max_epochs(s)
    corpora: dict = {}
    top_ks = sorted({int(r["top_k"]) for r in runs if r.get("kind") == "moe"})
    if any(e for e in s.experts) and top_ks and s.top_k not in top_ks:
        notes.append(f"top-k {s.top_k} differs from the fitted MoE runs' {top_ks}: the joint "
                     "law has no top-k term, so the plan assumes it transfers")
    fitted_e = sorted({int(r["n_experts"]) for r in runs if r.get("kind") == "moe"})
    new_e = [e for e in s.experts if e and e not in fitted_e]
    if new_e:
        notes.append(f"expert counts {new_e} were not trained (fitted: {fitted_e or 'none'}): "
                     "their rows extrapolate the joint law in E"
                     + ("; with one trained expert count besides dense the law's E terms "
                        "are not identified beyond it, so read these rows as illustrations "
                        "(see their intervals)" if len(fitted_e) < 2 else ""))
    for C in s.flops:
        c_law = C / kappa
        for E in s.experts:
            choice, why = laws[E]
            if choice is None:
                line = f"{'dense' if E == 0 else f'{E} experts'}: {why}"
                if line not in missing:  # one line per level, not one per budget
                    missing.append(line)
                continue
            opt = frontier(choice.point, c_law)
            ext_n, ext_n_basis = _n_extrapolation(fits, E, opt[0])
            extrapolated = C / cmax > s.max_extrapolation
            n, d, L = opt
            reps = [frontier(f, c_law) for f in choice.replicates]
            good = [r for r in reps if r is not None]
            el = el_lo = el_hi = None
            el_reason = ""
            if E == 0:
                el = 1.0
            elif choice.kind in dense_by_kind:
                dense_choice = dense_by_kind[choice.kind]
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
                    el_lo, el_hi = _interval(els, level_ci)
            else:
                el_reason = (f"no dense form of the {choice.kind} law to compare with: "
                             + "; ".join(dense_cwhy))
            n_lo, n_hi = _interval([r[0] for r in good], level_ci)
            d_lo, d_hi = _interval([r[1] for r in good], level_ci)
            l_lo, l_hi = _interval([r[2] for r in good], level_ci)
            name = f"{'dense' if E == 0 else f'moe{E}'}_{_fmt_c(C)}".replace("+", "")
            fam = s.family
            cfg, dm, nl, err = fit_geometry(fam, n, E, s.top_k if E else 0)
            cnt = count_params(cfg)
            ratio = cnt.total / cnt.active
            layout, least = (choose_layout(cfg, s.gpus, s.gpu_mem_gib, s.headroom)
                             if s.gpus else (None, None))
            gpu_h = C / (s.peak_tflops * 1e12 * mfu) / 3600.0
            row = {
                "name": name, "experts": E, "top_k": s.top_k if E else 0,
                "law": choice.label, "law_status": choice.status,
                "n_active": n, "n_total": n * ratio, "tokens": d, "flops": C,
                "loss": {"value": L, "lo": l_lo, "hi": l_hi},
                "el": el,
                "el_basis": (None if E == 0 else f"dense {dense_by_kind[choice.kind].label}"
                             if choice.kind in dense_by_kind else None),
                "intervals": {
                    "n_active": {"lo": n_lo, "hi": n_hi},
                    "n_total": {"lo": None if n_lo is None else n_lo * ratio,
                                "hi": None if n_hi is None else n_hi * ratio},
                    "tokens": {"lo": d_lo, "hi": d_hi},
                    "el": {"lo": el_lo, "hi": el_hi}},
                "el_reason": el_reason,
                "replicates": {"used": len(good), "total": len(reps),
                               "no_optimum": len(reps) - len(good)},
                "extrapolation": C / cmax,
                "extrapolation_n": ext_n,
                "extrapolation_n_basis": ext_n_basis,
                "extrapolated": extrapolated,
                "extrapolated_reason": (
                    f"{C / cmax:.3g}x the compute of the largest fitted run ({cmax:.3g} "
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
            row.update(_passes(cfg, d, max_epochs, epochs_src, corpora))
            if row["refused"]:
                row["config"] = None
            rows.append(row)
    if not rows:
        raise PlanError(_no_law(missing))
    if all(r["refused"] for r in rows):
        worst = max(rows, key=lambda r: r["passes"])
        raise PlanError(f"every row is refused: {worst['name']} {worst['refused']}"
                        + (f" ({len(rows) - 1} more)" if len(rows) > 1 else ""))
    if s.gpus and not any(r["layout"] for r in rows):
        raise PlanError(f"memory: no planned model fits {s.gpus} x {s.gpu_mem_gib:g} GiB "
                        f"({rows[0]['layout_reason']} for the smallest row); add GPUs or memory")
    return {
        "schema_version": 1,
        "fits_source": fits.get("source"),
        "level": level_ci,
        "settings": {"flops": s.flops, "experts": s.experts, "top_k": s.top_k,
                     "gpus": s.gpus, "gpu_mem_gib": s.gpu_mem_gib, "mfu": mfu,
                     "mfu_source": mfu_src, "peak_tflops": s.peak_tflops,
                     "headroom": s.headroom, "kappa": kappa,
                     "template": f"{s.family.name} ({s.family.source})",
                     "fitted_flops": [min(r["flops"] for r in runs), cmax],
                     "fitted_experts": fitted_e, "fitted_top_k": top_ks,
                     "max_extrapolation": s.max_extrapolation, "extrapolate": s.extrapolate,
                     "max_epochs": max_epochs, "max_epochs_source": epochs_src},
        "notes": notes,
        "missing": missing,
        "rows": rows,
    }


# ---------------------------------------------------------------------------- output


def _train_overrides(fam: Family, cfg: Config, tokens: float, experts: int, name: str) -> list[str]:
    """LR, warm-up and token budget for the written config (the ladder's rules if known)."""
    t = cfg.train
    step_tokens = t.micro_batch_size * t.seq_len * t.grad_accum
    budget = max(step_tokens, int(math.ceil(tokens / step_tokens) * step_tokens))
    ov = [f"name={name}", "train.max_steps=null", f"train.token_budget={budget}",
          "train.flop_budget=null"]
    if fam.ladder is not None:
        from moe.scaling.ladder import run_lr, warmup_for

        lr = run_lr(fam.ladder, float(fam.base.get("train", {}).get("lr", t.lr)),
                    cfg.model.d_model, experts > 0)
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
    from moe.scaling.analysis import _jsonable

    (out / "plan.json").write_text(json.dumps(_jsonable({k: v for k, v in plan.items()
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


def render_plan(plan: dict) -> str:
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
    lines += ["| row | law | C | extrapolation | N / largest run | N_active [interval] | "
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
    lines += ["", "Approach-2 check (the planning law's N*(C) against the IsoFLOP optima at "
              "the measured budgets):", ""] + list(checks.values())
    lines += ["", "Each row's config (`moe-testbed train <row>.yaml`):", ""]
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


# ------------------------------------------------------------------------------ CLI


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
            notes.append(f"configs follow the ladder the fits came from ({_rel(lp)}): its base "
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


def make_plan_probe(fits: dict, s: PlanSettings) -> float:
    kappa = flops_ratio(fits)
    why = []
    for E in s.experts:
        ch, reason = choose_law(fits, E, _level_of(fits, E), kappa)
        if ch is not None:
            return frontier(ch.point, s.flops[0] / kappa)[0]
        why.append(f"{'dense' if E == 0 else f'{E} experts'}: {reason}")
    raise PlanError(_no_law(why))


def _no_law(why: list[str]) -> str:
    return ("fits.json has no law that can plan these rows (the planner uses only "
            f"{' and '.join(repr(u) for u in USABLE_STATUSES)} laws): " + "; ".join(why))


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
