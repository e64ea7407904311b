"""The law a plan row uses: Chinchilla-form laws (`LawForm`) from a fits.json entry, their
compute-optimal frontier, and the choice among the usable laws (the package docstring has
the preference order and the approach-2 check)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from moe.scaling.analysis.entries import params_of, replicate_params
from moe.scaling.analysis.selection import independent_spread
from moe.scaling.laws.moe_laws import clark_expert_transform


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
#: status and reason quoted: "not_converged", "not_fitted", and (moe/scaling/analysis/schema.py)
#: "degenerate" (a parameter on a box bound, or the irreducible term collapsed to ~0) and
#: "unidentified" (bootstrap replicates split into separate modes).
USABLE_STATUSES = ("ok", "unbounded")


def usable(entry) -> bool:
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
    if usable(joint):
        fx = joint.get("fixed") or {}
        es, em = float(fx.get("e_start", 2.0)), float(fx.get("e_max", 256.0))
        E = 1 if experts == 0 else experts
        point = joint_form(params_of(joint, _JOINT), E, es, em)
        reps = [joint_form(p, E, es, em) for p in replicate_params(joint, _JOINT)]
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
    if usable(entry):
        point = chinchilla_form(params_of(entry, _CHIN))
        reps = [chinchilla_form(p) for p in replicate_params(entry, _CHIN)]
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
    exponent interval (>= 4 kept budgets; moe/scaling/laws/isoflop.py, step 4). fits.json holds
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
    return independent_spread(np.array([r["params_active"] for r in runs], float),
                              np.array([r["tokens"] for r in runs], float))


def flops_ratio(fits: dict) -> float:
    """kappa: median of flops / (6 N_active D) over the fitted runs (1 when absent)."""
    k = [r["flops"] / (6.0 * r["params_active"] * r["tokens"]) for r in fits.get("runs", [])
         if not r.get("held_out") and r.get("flops") and r.get("tokens")]
    return float(np.median(k)) if k else 1.0


def level_of(fits: dict, experts: int) -> Optional[str]:
    for r in fits.get("runs", []):
        if experts == 0 and r.get("kind") == "dense":
            return r.get("level")
        if experts and r.get("kind") == "moe" and int(r.get("n_experts") or 0) == experts:
            return r.get("level")
    return None
