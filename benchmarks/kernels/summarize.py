"""python -m benchmarks.kernels.summarize benchmarks/results/kernels_<device>.jsonl [--out DIR] [--include-smoke]

Markdown summary and a plot of the rows written by bench_kernels.py:
<DIR>/<stem>_summary.md (per op: median and p20-p80 ms, TFLOP/s or GB/s, % of the dense
matmul of the same run, speed-up of the Triton kernel over each baseline) and
<DIR>/<stem>_mlp.png (TFLOP/s of the grouped MLP fwd+bwd and the MoE layer fwd+bwd by
shape and T, one bar per implementation, dashed line: the dense matmul). Smoke rows
(--cpu-smoke) are left out unless --include-smoke. Only numbers present in the rows are
written.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ORDER = ["dense_matmul", "route", "route_bwd", "permute", "unpermute", "mlp_fwd", "mlp_bwd",
         "mlp_fwd_bwd", "moe_layer_fwd", "moe_layer_fwd_bwd"]


def _fmt(r, key, fmt):
    return format(r[key], fmt) if r.get(key) is not None else ""


def table(rows):
    """Markdown tables, one per op; the Triton row of each case carries its speed-up."""
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    lines = []
    for op in sorted(by_op, key=lambda o: ORDER.index(o) if o in ORDER else len(ORDER)):
        rs = by_op[op]
        lines += [f"## {op}", "",
                  "| shape | T | routing | max/mean load | impl | median ms (p20-p80) | TFLOP/s | GB/s "
                  "| % dense | triton speed-up |",
                  "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        cases = defaultdict(list)
        for r in rs:
            cases[(r["shape"], r["T"], r["routing"])].append(r)
        for (shape, T, routing), cr in cases.items():
            tri = next((r for r in cr if r["impl"] == "triton" and "median_ms" in r), None)
            for r in cr:
                if "median_ms" not in r:
                    lines.append(f"| {shape} | {T} | {routing} | | {r['impl']} | failed: "
                                 f"{r.get('error', '?')} | | | | |")
                    continue
                speed = (f"{r['median_ms'] / tri['median_ms']:.2f}x"
                         if tri is not None and r is not tri else "")
                lines.append(
                    f"| {shape} | {T} | {routing} | {_fmt(r, 'max_over_mean_load', '.2f')} | "
                    f"{r['impl']} | {r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | "
                    f"{_fmt(r, 'tflops', '.1f')} | {_fmt(r, 'gb_per_s', '.0f')} | "
                    f"{_fmt(r, 'pct_of_dense', '.0f')} | {speed} |")
        lines.append("")
    return lines


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [o for o in ("mlp_fwd_bwd", "moe_layer_fwd_bwd") if any(r["op"] == o for r in rows)]
    if not ops:
        return False
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 4.2 * len(ops)), squeeze=False)
    dense = {(r["shape"], r["T"]): r.get("tflops") for r in rows if r["op"] == "dense_matmul"}
    for ax, op in zip(axes[:, 0], ops):
        sel = [r for r in rows if r["op"] == op and r.get("tflops") is not None]
        labels = sorted({(r["shape"], r["T"], r["routing"]) for r in sel})
        impls = sorted({r["impl"] for r in sel})
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            vals = [next((r["tflops"] for r in sel if (r["shape"], r["T"], r["routing"]) == lab
                          and r["impl"] == impl), 0.0) for lab in labels]
            ax.bar([i + width * j for i in range(len(labels))], vals, width=width, label=impl)
        for i, (shape, T, _) in enumerate(labels):
            if dense.get((shape, T)):
                ax.hlines(dense[(shape, T)], i - 0.1, i + 0.9, colors="k", linestyles="dashed",
                          linewidth=0.8, label="dense matmul" if i == 0 else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))],
                      [f"{s}\nT={t}\n{r}" for s, t, r in labels], fontsize=6)
        ax.set_ylabel("TFLOP/s (active FLOPs)")
        ax.set_title(f"{op} ({rows[0]['device']}, {rows[0].get('dtype', '')})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows")
    p.add_argument("--out", default=None)
    p.add_argument("--include-smoke", action="store_true")
    a = p.parse_args(argv)
    src = Path(a.rows)
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    if not a.include_smoke:
        rows = [r for r in rows if not r.get("smoke")]
    if not rows:
        raise SystemExit(f"error: {src} has no rows{'' if a.include_smoke else ' (smoke rows skipped)'}")
    out = Path(a.out) if a.out else src.parent
    out.mkdir(parents=True, exist_ok=True)
    envs = sorted({(r["device"], r["torch"], r["triton"], r["commit"]) for r in rows})
    lines = ["# Kernel benchmarks", ""]
    lines += [f"- device {d}, torch {t}, triton {tr}, commit {c}" for d, t, tr, c in envs]
    if any(r.get("smoke") for r in rows):
        lines.append("- **includes SMOKE rows (CPU interpreter): not performance results**")
    lines += ["", "TFLOP/s on active FLOPs (6*T*K*D*F forward); % dense = share of the dense "
              "matmul of the same FLOPs measured in the same run; speed-up = baseline time / "
              "Triton time.", ""]
    lines += table(rows)
    png = out / f"{src.stem}_mlp.png"
    if plot(rows, png):
        lines += [f"![grouped MLP and MoE layer TFLOP/s]({png.name})", ""]
    md = out / f"{src.stem}_summary.md"
    md.write_text("\n".join(lines))
    print(f"wrote {md}" + (f" and {png}" if png.exists() else ""))


if __name__ == "__main__":
    main()
