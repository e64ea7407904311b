"""The CPU ladders' targets (issue 25), judged from their fits.json files as data.

    python -m benchmarks.ladder_targets MAIN_FITS ISOFLOP_FITS [--out targets.json]

MAIN_FITS: the fits.json (or its directory) of configs/ladder/cpu.yaml; ISOFLOP_FITS: that
of configs/ladder/cpu-isoflop.yaml. Prints one markdown row per target with the numbers it
was judged on (and writes them as JSON with --out):

a. loss strictly decreasing in active size at every level (grid runs, held-out included);
b. dense > moe8 > moe32 at the two largest sizes, each gap significant by a paired t-test
   over seeds (p < 0.05, fits.json sparsity_comparison);
c. efficiency leverage above 1 at the two largest sizes with its bootstrap interval above 1
   (fits.json efficiency_leverage; judged on compute leverage, parameter leverage shown);
d. approach 2's dense exponent a (N_opt ~ C^a) with a 95% interval no wider than 0.25,
   approach 3's a = beta / (alpha + beta) inside it or overlapping, every budget bracketed;
e. the held-out runs predicted within 1% by the joint law selected without them;
f. aux-free MaxVio below aux loss's over >= 3 seeds, loss not worse beyond the paired noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe.scaling.analysis.schema import jsonable, read_fits


def _iv(v, lo=None, hi=None, d=3) -> str:
    if v is None:
        return "-"
    if lo is None or hi is None:
        return f"{v:.{d}f}"
    return f"{v:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"


def target_a(f) -> dict:
    by: dict = {}
    for r in f["runs"]:
        by.setdefault(r["level"], []).append(r)
    out, ok = {}, True
    for lvl, rs in by.items():
        rs = sorted(rs, key=lambda r: r["params_active"])
        losses = [r["loss"] for r in rs]
        mono = all(b < a for a, b in zip(losses, losses[1:]))
        ok &= mono
        out[lvl] = {"losses": losses, "runs": [r["name"] for r in rs], "strict": mono}
    text = "; ".join(f"{lvl} {v['losses'][0]:.3f} -> {v['losses'][-1]:.3f}"
                     + ("" if v["strict"] else " (NOT monotone)") for lvl, v in out.items())
    return {"met": ok, "levels": out, "text": text}


def _top_two(f) -> list[dict]:
    sc = [s for s in f["sparsity_comparison"] if len(s["losses"]) >= 2]
    return sorted(sc, key=lambda s: s["params_active"])[-2:]


def target_b(f) -> dict:
    rows, ok = [], True
    for s in _top_two(f):
        for g in s["gaps"]:
            p = g["paired"]
            good = p is not None and p["p"] is not None and p["mean"] < 0 and p["p"] < 0.05
            ok &= good
            rows.append({"size": s["size"], "from": g["from"], "to": g["to"],
                         "mean": None if p is None else p["mean"],
                         "lo": None if p is None else p["lo"],
                         "hi": None if p is None else p["hi"],
                         "p": None if p is None else p["p"],
                         "n": None if p is None else p["n"], "met": good})
    text = "; ".join(f"{r['size']} {r['from'].split('-')[-1]}->{r['to'].split('-')[-1]} "
                     f"{_iv(r['mean'], r['lo'], r['hi'])}, p {r['p']:.2g} (n {r['n']})"
                     if r["p"] is not None else f"{r['size']} {r['from']}->{r['to']}: no test"
                     for r in rows)
    return {"met": ok and bool(rows), "gaps": rows, "text": text}


def target_c(f) -> dict:
    sizes = {s["size"] for s in _top_two(f)}
    names = {n for s in _top_two(f) for n in s["runs"]}
    rows, ok = [], True
    for e in f["efficiency_leverage"]:
        if e["run"] not in names:
            continue
        lo = e.get("el_compute_lo")
        good = lo is not None and e["el_compute"] is not None and lo > 1
        ok &= good
        rows.append({**{k: e.get(k) for k in ("run", "el_compute", "el_compute_lo",
                                              "el_compute_hi", "el_params", "el_params_lo",
                                              "el_params_hi")}, "met": good})
    text = "; ".join(f"{r['run']} EL(C) {_iv(r['el_compute'], r['el_compute_lo'], r['el_compute_hi'], 2)}"
                     f", EL(N) {_iv(r['el_params'], r['el_params_lo'], r['el_params_hi'], 2)}"
                     for r in rows)
    return {"met": ok and bool(rows), "sizes": sorted(sizes), "runs": rows, "text": text}


def target_d(iso) -> dict:
    e = iso["isoflop"].get("dense") or {}
    ch = iso["chinchilla"]
    iv = e.get("exponent_interval") or e.get("exponent_profile_interval")
    lo, hi = (iv["lo"], iv["hi"]) if iv else (None, None)
    width = None if lo is None else hi - lo
    a3 = ch.get("a") or {}
    dropped = e.get("dropped") or []
    overlap = (lo is not None and a3.get("lo") is not None
               and a3["lo"] <= hi and lo <= a3["hi"])
    met = (e.get("status") == "ok" and width is not None and width <= 0.25 and overlap
           and not dropped)
    decides = None
    if lo is not None:
        decides = ("Chinchilla-like (0.5 inside, 0.73 outside)" if lo <= 0.5 <= hi < 0.73 else
                   "Kaplan-like (0.73 inside, 0.5 outside)" if 0.5 < lo <= 0.73 <= hi else
                   "neither 0.5 nor 0.73 inside" if not (lo <= 0.5 <= hi or lo <= 0.73 <= hi)
                   else "both inside: undecided")
    how = (f"width {width:.3f}; {decides}" if width is not None else
           (e.get("interval_note") or e.get("reason") or "no interval: not fitted"))
    text = (f"approach 2 a {_iv(e.get('exponent'), lo, hi)} ({how}); approach 3 a "
            f"{_iv(a3.get('value'), a3.get('lo'), a3.get('hi'))} ({ch.get('status')}); "
            f"{e.get('n_budgets')} budgets kept, dropped: "
            + (", ".join(f"{d.get('flops', 0):.3g} ({d.get('reason', '')})" for d in dropped)
               or "none"))
    return {"met": bool(met), "approach2": {"a": e.get("exponent"), "lo": lo, "hi": hi,
                                            "width": width, "status": e.get("status"),
                                            "interval_note": e.get("interval_note")},
            "approach3": {"a": a3.get("value"), "lo": a3.get("lo"), "hi": a3.get("hi"),
                          "status": ch.get("status"), "reason": ch.get("reason")},
            "dropped": dropped, "decides": decides, "text": text}


def target_e(f) -> dict:
    jl = f["joint_laws"]
    best = jl.get("better")
    from moe.scaling.analysis.kinds import JOINT_LABELS

    label = JOINT_LABELS.get(best, best)
    rows = [h for h in f["holdout"] if h["law"] == label and h["quantity"] == "loss"]
    met = bool(rows) and all(abs(h["rel_error"]) <= 0.01 for h in rows)
    text = (f"{best} (selected by {jl.get('selected_by', '?').split(';')[0]}): "
            + ", ".join(f"{h['run']} {h['rel_error'] * 100:+.2f}%" for h in rows))
    return {"met": met, "law": best, "runs": [{k: h[k] for k in ("run", "predicted", "lo", "hi",
                                                                "actual", "rel_error")}
                                             for h in rows], "text": text}


def target_f(f) -> dict:
    v = {x["variant"]: x for x in (f.get("compare_variants") or [])}
    free = next((x for k, x in v.items() if "free" in k), None)
    aux = next((x for k, x in v.items() if "aux-loss" in k), None)
    if free is None or aux is None:
        return {"met": False, "text": "no seeded aux-free / aux-loss comparison"}
    pm = free.get("paired_maxvio") if free["vs"] == aux["variant"] else None
    pl = free.get("paired_loss") if free["vs"] == aux["variant"] else None
    n_ok = min(free["maxvio"]["n"], aux["maxvio"]["n"]) >= 3
    below = pm is not None and pm["hi"] < 0
    loss_ok = pl is not None and pl["lo"] <= 0  # not worse beyond the paired noise
    met = n_ok and below and loss_ok

    def ms(x):
        return f"{x['mean']:.3f} ± {x['se']:.3f}" if x["se"] is not None else f"{x['mean']:.3f}"

    text = (f"MaxVio aux-free {ms(free['maxvio'])} vs aux loss {ms(aux['maxvio'])} "
            f"(n {free['maxvio']['n']}/{aux['maxvio']['n']}); paired MaxVio difference "
            + (_iv(pm["mean"], pm["lo"], pm["hi"]) + f", p {pm['p']:.2g}" if pm else "-")
            + "; paired loss difference "
            + (_iv(pl["mean"], pl["lo"], pl["hi"], 4) + f", p {pl['p']:.2g}" if pl else "-"))
    return {"met": met, "free": free, "aux": aux, "text": text}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("main_fits")
    ap.add_argument("isoflop_fits")
    ap.add_argument("--out", help="write the judged targets as JSON here")
    a = ap.parse_args(argv)
    f, iso = read_fits(a.main_fits), read_fits(a.isoflop_fits)
    t = {"a": target_a(f), "b": target_b(f), "c": target_c(f), "d": target_d(iso),
         "e": target_e(f), "f": target_f(f)}
    print("| target | result | met? |\n| --- | --- | --- |")
    for k, v in t.items():
        print(f"| {k} | {v['text']} | {'yes' if v['met'] else 'no'} |")
    if a.out:
        Path(a.out).write_text(json.dumps(jsonable(t), indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
