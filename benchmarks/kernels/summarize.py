"""Markdown summary and plot of kernel benchmark rows.

    python benchmarks/kernels/summarize.py benchmarks/results/kernels_<device>.jsonl [--out DIR]

Writes <DIR>/kernels_summary.md (one table per op: median ms, TFLOP/s or GB/s, % of the
dense matmul of the same run) and kernels_mlp_fwd_bwd.png (TFLOP/s by shape and T).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("rows")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = [json.loads(l) for l in Path(a.rows).read_text().splitlines() if l.strip()]
    if not rows:
        raise SystemExit(f"error: {a.rows} has no rows")
    out = Path(a.out) if a.out else Path(a.rows).parent
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    lines = [f"# Kernel benchmarks ({rows[0]['device']}, torch {rows[0]['torch']}, "
             f"triton {rows[0]['triton']}, commit {rows[0]['commit'][:10]})", ""]
    for op, rs in by_op.items():
        lines += [f"## {op}", "", "| shape | T | routing | impl | median ms | TFLOP/s | GB/s | % dense |",
                  "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in rs:
            f = lambda k, fmt: format(r[k], fmt) if k in r else ""  # noqa: E731
            lines.append(f"| {r['shape']} | {r['T']} | {r['routing']} | {r['impl']} | "
                         f"{r['median_ms']:.3f} | {f('tflops', '.1f')} | {f('gb_per_s', '.0f')} | "
                         f"{f('pct_of_dense', '.0f')} |")
        lines.append("")
    (out / "kernels_summary.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    sel = [r for r in by_op.get("mlp_fwd_bwd", []) if r["routing"] == "balanced"]
    labels = sorted({(r["shape"], r["T"]) for r in sel})
    impls = sorted({r["impl"] for r in sel})
    for j, impl in enumerate(impls):
        vals = [next((r["tflops"] for r in sel if (r["shape"], r["T"]) == lab and r["impl"] == impl), 0)
                for lab in labels]
        ax.bar([i + 0.8 * j / len(impls) for i in range(len(labels))], vals, width=0.8 / len(impls), label=impl)
    ax.set_xticks(range(len(labels)), [f"{s}\nT={t}" for s, t in labels], fontsize=7)
    ax.set_ylabel("TFLOP/s (active, fwd+bwd)")
    ax.set_title("Grouped SwiGLU MLP fwd+bwd, balanced routing")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "kernels_mlp_fwd_bwd.png", dpi=110)
    print(f"wrote {out / 'kernels_summary.md'} and {out / 'kernels_mlp_fwd_bwd.png'}")


if __name__ == "__main__":
    main()
