"""Plot a run directory: ``moe-testbed plot-run RUN_DIR`` -> RUN_DIR/training.png.

Three panels from metrics.jsonl: train and eval LM loss, MTP losses (train and eval),
and MaxVio per MoE layer over steps (per-step MaxVio of the global batch as lines, the
eval set's MaxVio_global as markers).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from .metrics import METRICS, read_rows

PNG = "training.png"


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _moe_layer_names(run_dir: Path, n: int) -> list[str]:
    """Names of the MaxVio entries: main-model MoE layers by index, then MTP blocks
    (the order of ``Transformer.moe_layers()``), from the run's config.yaml."""
    try:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        m = cfg["model"]
        names = [f"layer {i}" for i in range(m["first_k_dense"], m["n_layers"])]
        names += [f"MTP {k + 1}" for k in range(cfg["mtp"]["depth"])]
        if len(names) == n:
            return names
    except Exception:  # no/odd config: fall back to positions
        pass
    return [f"MoE layer {i}" for i in range(n)]


def _is_step(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plottable(row) -> bool:
    """A metrics row the plot can use: a mapping with kind train/eval, a numeric step,
    an lm_loss, and list-valued MaxVio fields when present."""
    if not isinstance(row, dict) or row.get("kind", "train") not in ("train", "eval"):
        return False
    if not _is_step(row.get("step")) or "lm_loss" not in row:
        return False
    return all(isinstance(row[k], list) for k in ("maxvio", "maxvio_global")
               if row.get(k) is not None)


def read_plot_rows(path: Path) -> tuple[list[dict], int]:
    """(the plottable rows of a metrics file, how many other non-empty lines were skipped:
    not JSON, not a mapping, or missing/mistyped step, lm_loss, maxvio)."""
    not_json: list = []
    rows = read_rows(path, skipped=not_json, missing_ok=False)
    good = [r for r in rows if _plottable(r)]
    return good, not_json[0] + len(rows) - len(good)


def plot_run(run_dir: str | Path, out: str | Path | None = None, *,
             skipped: Optional[list] = None) -> Path:
    """Write the training plot of ``run_dir``; return the PNG path. Malformed metrics rows
    are left out; their number is appended to ``skipped`` when given."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (CI, ssh)
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows, n_bad = read_plot_rows(run_dir / METRICS)
    if skipped is not None:
        skipped.append(n_bad)
    if not rows:
        raise FileNotFoundError(f"{run_dir / METRICS} has no usable rows"
                                + (f" ({n_bad} malformed)" if n_bad else ""))
    train = [r for r in rows if r.get("kind", "train") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [_num(r["lm_loss"]) for r in train],
                label="train lm_loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [_num(r["lm_loss"]) for r in evals], "o-",
                label="eval lm_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("LM loss")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1]
    keys = sorted({k for r in rows for k in r if k.startswith("mtp_loss_")})
    for k in keys:
        tr = [r for r in train if k in r]
        ev = [r for r in evals if k in r]
        if tr:
            ax.plot([r["step"] for r in tr], [_num(r[k]) for r in tr], lw=1, label=f"train {k}")
        if ev:
            ax.plot([r["step"] for r in ev], [_num(r[k]) for r in ev], "o-", label=f"eval {k}")
    ax.set_title("MTP losses" if keys else "MTP losses (mtp.depth = 0)")
    ax.set_xlabel("step")
    if keys:
        ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[2]
    tv = [r for r in train if r.get("maxvio")]
    n_layers = max((len(r["maxvio"]) for r in tv), default=0)
    names = _moe_layer_names(run_dir, n_layers)
    for i in range(n_layers):
        line, = ax.plot([r["step"] for r in tv], [_num(r["maxvio"][i]) if i < len(r["maxvio"])
                                                      else math.nan for r in tv], lw=1,
                        label=names[i])
        ev = [r for r in evals if len(r.get("maxvio_global") or []) > i]
        if ev:
            ax.plot([r["step"] for r in ev], [_num(r["maxvio_global"][i]) for r in ev], "o",
                    color=line.get_color())
    ax.set_title("MaxVio per MoE layer (lines: batch, dots: eval global)"
                 if n_layers else "MaxVio (dense model)")
    ax.set_xlabel("step")
    if n_layers:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / PNG
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run_main(argv: list[str] | None = None) -> int:
    """``moe-testbed plot-run [RUN_DIR]`` (default: the newest directory under runs/)."""
    p = argparse.ArgumentParser(prog="moe-testbed plot-run",
                                description="Plot loss curves, MTP losses and MaxVio of a run.")
    p.add_argument("run_dir", nargs="?", help="run directory (default: newest under runs/)")
    p.add_argument("--out", help=f"PNG path (default RUN_DIR/{PNG})")
    a = p.parse_args(argv)
    run_dir = a.run_dir
    if run_dir is None:
        runs = [d for d in Path("runs").glob("*") if (d / METRICS).is_file()]
        if not runs:
            print("error: no run directory given and none under runs/", file=sys.stderr)
            return 2
        run_dir = max(runs, key=lambda d: (d / METRICS).stat().st_mtime)
    if not (Path(run_dir) / METRICS).is_file():
        print(f"error: {run_dir} is not a run directory (no {METRICS})", file=sys.stderr)
        return 2
    skipped: list = []
    try:
        out = plot_run(run_dir, a.out, skipped=skipped)
    except FileNotFoundError as e:  # no usable rows
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # metrics unreadable or the PNG not writable
        print(f"error: {e.filename or a.out or run_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    if skipped and skipped[0]:
        print(f"warning: skipped {skipped[0]} malformed row(s) of {Path(run_dir) / METRICS}",
              file=sys.stderr)
    print(f"wrote {out}")
    return 0
