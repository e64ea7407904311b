"""Report figures, drawn from a fits.json dict alone (no fitting here).

    python -c "from moe.scaling.analysis.schema import read_fits; from moe.scaling.figures import draw_all; print(draw_all(read_fits('runs/ladder-cpu/report'), 'runs/ladder-cpu/report'))"

Figures are made without pyplot (a Figure with an Agg canvas), so writing a report neither
switches the caller's backend (a notebook, a GUI) nor leaves figures in pyplot's registry.
Each function returns the PNG's file name, or None when the analysis has nothing to draw.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["draw_all"]


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    fig.clear()
    return name


def _color(i):
    import matplotlib

    cs = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return cs[i % len(cs)]


def _levels(fits):
    """Level names in the analysis' order (power_laws keys first, then any other)."""
    names = list(fits["power_laws"])
    for r in fits["runs"]:
        if r["level"] not in names:
            names.append(r["level"])
    return names


def _arr(v):
    return np.array([np.nan if x is None else x for x in v], float)


def _clip_y(ax, runs):
    """Keep the data in view: bootstrap bands of a 4-run fit can reach 10x the losses."""
    L = np.array([r["loss"] for r in runs])
    ax.set_ylim(L.min() / 1.15, L.max() * 1.3)


def _band(ax, entry, c):
    if not entry or entry.get("status") == "not_fitted" or "band" not in entry:
        return
    b = entry["band"]
    x = _arr(b["x"])
    ax.plot(x, _arr(b["value"]), color=c, lw=1.2, ls="-" if entry["bounded"] else "--")
    if entry["bounded"]:  # an unbounded interval is not drawn as if it meant something
        ax.fill_between(x, _arr(b["lo"]), _arr(b["hi"]), color=c, alpha=0.2, lw=0)


def loss_vs(fits, out, xkey, laws_key, name, xlabel, title):
    fig, ax = _figure((7, 5))
    for gi, g in enumerate(_levels(fits)):
        c = _color(gi)
        rs = [r for r in fits["runs"] if r["level"] == g]
        tr = [r for r in rs if not r["held_out"]]
        ho = [r for r in rs if r["held_out"]]
        ax.scatter([r[xkey] for r in tr], [r["loss"] for r in tr], color=c, s=18, label=g)
        if ho:
            ax.scatter([r[xkey] for r in ho], [r["loss"] for r in ho], color=c, s=70,
                       marker="*", edgecolor="k", zorder=5)
        if laws_key:
            _band(ax, fits[laws_key].get(g), c)
        else:  # no law over this axis: join the level's runs so its trend can be read
            xy = sorted((r[xkey], r["loss"]) for r in rs)
            ax.plot(*zip(*xy), color=c, lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final eval loss")
    _clip_y(ax, fits["runs"])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out, name)


def chinchilla_fit(fits, out):
    ch = fits["chinchilla"]
    if ch.get("status") == "not_fitted":
        return None
    by = {r["name"]: r for r in fits["runs"]}
    act = np.array([by[f["run"]]["loss"] for f in ch["fitted"]])
    pred = np.array([f["predicted"] for f in ch["fitted"]])
    flops = np.array([by[f["run"]]["flops"] for f in ch["fitted"]])
    fig, ax = _figure((5.5, 5))
    sc = ax.scatter(act, pred, c=np.log10(flops), s=12, cmap="viridis")
    lo, hi = min(act.min(), pred.min()), max(act.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    fig.colorbar(sc, ax=ax, label="log10 FLOPs")
    ax.set_xlabel("actual loss")
    ax.set_ylabel("approach-3 prediction")
    ax.set_title("Chinchilla approach 3: predicted vs actual")
    return _save(fig, out, "chinchilla_fit.png")


def isoflop(fits, out):
    fitted = {g: e for g, e in fits["isoflop"].items() if e.get("status") == "ok"}
    if not fitted:
        return None
    fig, ax = _figure((7, 5))
    for gi, (g, e) in enumerate(fitted.items()):
        c = _color(gi)
        b = e["budgets"]
        ax.scatter([x["flops"] for x in b], [x["n_opt"] for x in b], color=c, s=25,
                   label=f"{g}: N* ~ C^{e['exponent']:.3f}")
        cs = np.array([x["flops"] for x in b])
        grid = np.logspace(np.log10(cs.min()) - 0.3, np.log10(cs.max()) + 0.3, 20)
        ax.plot(grid, np.exp(e["intercept"]) * grid ** e["exponent"], color=c, lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (budget)")
    ax.set_ylabel("compute-optimal N*")
    ax.set_title("IsoFLOP (approach 2): per-budget optimum and fitted line", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out, "isoflop.png")


def efficiency_leverage(fits, out):
    el = fits["efficiency_leverage"]
    if not el:
        return None
    sp = {r["name"]: r["sparsity"] for r in fits["runs"]}
    # spread each level's runs a little along x, smallest size left, so their bars part
    size = {r["name"]: r["params_active"] for r in fits["runs"]}
    by_level: dict = {}
    for e in el:
        by_level.setdefault(e["level"], []).append(e["run"])
    for runs in by_level.values():
        runs.sort(key=lambda n: size[n])
        for i, n in enumerate(runs):
            sp[n] = sp[n] + 0.03 * (i / max(1, len(runs) - 1) - 0.5)
    fig, ax = _figure((6, 4.5))
    for j, (k, m) in enumerate((("el_params", "o"), ("el_compute", "s"))):
        pts = [e for e in el if e[k] is not None]
        if not pts:
            continue
        # nudge the two series apart so their error bars do not overlap
        x = np.array([sp[e["run"]] for e in pts]) + (j - 0.5) * 0.0015
        y = np.array([e[k] for e in pts], float)
        lo = np.array([np.nan if e.get(f"{k}_lo") is None else e[f"{k}_lo"] for e in pts])
        hi = np.array([np.nan if e.get(f"{k}_hi") is None else e[f"{k}_hi"] for e in pts])
        has = np.isfinite(lo) & np.isfinite(hi)
        label = k.replace("el_", "EL ")
        if has.any():  # error bars: the dense fit's bootstrap interval
            # a percentile interval from few replicates can miss the point estimate: clip
            err = np.maximum(0.0, [y[has] - lo[has], hi[has] - y[has]])
            ax.errorbar(x[has], y[has], yerr=err, fmt=m,
                        color=_color(j), capsize=3, lw=0.8, label=label)
            label = None
        up = np.isfinite(lo) & ~np.isfinite(hi)
        if up.any():  # upper edge unbounded: bar from lo, open upwards
            ax.errorbar(x[up], y[up], yerr=[np.maximum(0.0, y[up] - lo[up]), np.zeros(up.sum())],
                        fmt=m,
                        color=_color(j), capsize=3, lw=0.8, lolims=True, label=label)
            label = None
        rest = ~has & ~up
        if rest.any():
            ax.scatter(x[rest], y[rest], marker=m, color=_color(j), label=label)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("sparsity (1 - top_k / n_experts); runs of one level spread by size")
    ax.set_ylabel("efficiency leverage vs dense")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title("Efficiency leverage vs sparsity (bars: dense fit's bootstrap interval)",
                 fontsize=9)
    return _save(fig, out, "efficiency_leverage.png")


MAXVIO_MAX_WIDTH_IN = 24.0
MAXVIO_NAMED = 68  # 0.35 in per run fits the capped width


def maxvio(fits, out):
    mv = [r for r in fits["runs"] if r.get("maxvio") is not None]
    if not mv:
        return None
    # one named bar per run up to MAXVIO_NAMED runs; the width is capped, so a 100,000-row
    # table does not render a 0.35 in x N canvas (at 20,000 rows: ~1 GB of pixels)
    fig, ax = _figure((min(max(5, 0.35 * len(mv)), MAXVIO_MAX_WIDTH_IN), 4))
    if len(mv) <= MAXVIO_NAMED:
        ax.bar(range(len(mv)), [r["maxvio"] for r in mv], color=_color(0))
        ax.set_xticks(range(len(mv)))
        ax.set_xticklabels([r["name"] for r in mv], rotation=70, fontsize=6)
    else:  # one line collection, not a Rectangle artist per run (1 GB at 66,000 runs)
        ax.vlines(range(len(mv)), 0, [r["maxvio"] for r in mv], color=_color(0), lw=0.5)
        ax.set_xlabel(f"run ({len(mv)} runs in fits.json order)")
    ax.set_ylabel("MaxVio")
    ax.set_title("MaxVio per run")
    return _save(fig, out, "maxvio.png")


def draw_all(fits: dict, out_dir) -> list[str]:
    """Draw every figure the analysis supports into out_dir; returns the PNG names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [
        loss_vs(fits, out, "params_active", "power_laws", "loss_vs_active_params.png",
                "active parameters", "Loss vs active params (stars: held out; bands: "
                "bootstrap; dashed: interval unbounded)"),
        loss_vs(fits, out, "params_total", None, "loss_vs_total_params.png",
                "total parameters", "Loss vs total params"),
        loss_vs(fits, out, "flops", "compute_laws", "loss_vs_flops.png", "training FLOPs",
                "Loss vs compute (stars: held out; bands: bootstrap)"),
        chinchilla_fit(fits, out), isoflop(fits, out), efficiency_leverage(fits, out),
        maxvio(fits, out)]
    return [n for n in names if n]


def draw_plan(curves: dict, path) -> str:
    """`moe-testbed plan`'s figure: left, predicted loss vs active params at each budget
    (one curve per expert count, bootstrap band, optimum marked); right, the optimal
    N_active vs compute with its band (shaded: the fitted runs' FLOP range)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(12, 4.6))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    labels = []
    for bi, b in enumerate(curves["budgets"]):
        for c in b["curves"]:
            if c["label"] not in labels:
                labels.append(c["label"])
            col = _color(labels.index(c["label"]))
            ls = styles[bi % len(styles)]
            ax1.plot(c["n"], c["loss"], ls, color=col,
                     label=f"{c['label']}, C={b['flops']:.2g}")
            if c["lo"] is not None:
                ax1.fill_between(c["n"], c["lo"], c["hi"], color=col, alpha=0.12, lw=0)
            ax1.plot(*c["opt"], "o", color=col, ms=6, mec="k")
    ax1.set_xscale("log")
    ax1.set_xlabel("active parameters")
    ax1.set_ylabel("predicted loss")
    ax1.set_title(f"Loss at each budget ({int(curves['level'] * 100)}% bands; dots: optimum)")
    lo_all = [c["opt"][1] for b in curves["budgets"] for c in b["curves"]]
    if lo_all:
        ax1.set_ylim(min(lo_all) * 0.95, max(lo_all) * 1.25)
    ax1.legend(fontsize=7)
    for f in curves["frontier"]:
        col = _color(labels.index(f["label"]) if f["label"] in labels else 0)
        ax2.plot(f["c"], f["n"], color=col, label=f["label"])
        if f["lo"] is not None:
            ax2.fill_between(f["c"], f["lo"], f["hi"], color=col, alpha=0.12, lw=0)
    a, b = curves["fitted_flops"]
    ax2.axvspan(a, b, color="0.85", zorder=0, label="fitted runs' FLOPs")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("training FLOPs")
    ax2.set_ylabel("compute-optimal active parameters")
    ax2.set_title("Optimal N_active vs compute (right of grey: extrapolation)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clear()
    return path.name
