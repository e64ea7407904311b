"""The --dry-run table: every run's size, tokens, epochs, learning rate, FLOPs and
estimated time, before anything trains."""

from __future__ import annotations

from typing import Optional

from moe.scaling.ladder.design import LadderConfig, Run
from moe.scaling.ladder.epochs import over_epochs


def _fmt_epochs(r: Run) -> str:
    if r.epochs is None:
        return "?"
    return ("" if r.epochs_exact else "~") + f"{r.epochs:.3g}"


def format_plan(cfg: LadderConfig, runs: list[Run], sizes: Optional[list] = None) -> str:
    """The --dry-run table; ``sizes`` (attach_epochs' CorpusSize list) adds the data lines.
    The epochs column is ``?`` when the corpus size is unknown, ``~x`` when estimated."""
    head = (f"{'run':20s} {'d':>4s} {'L':>2s} {'E':>3s} {'k':>2s} {'total':>10s} {'active':>10s} "
            f"{'act-nonemb':>10s} {'tokens':>10s} {'tok/p':>6s} {'mb':>3s} {'steps':>6s} "
            f"{'epochs':>7s} {'lr':>8s} "
            f"{'FLOPs':>9s} {'est':>7s}  note")
    lines = [f"ladder {cfg.name}: {len(runs)} runs", head, "-" * len(head)]
    tot_s = 0.0
    for r in runs:
        c = r.counts
        est = r.flops / cfg.est_flops_per_s
        tot_s += est
        d = next(s for s in cfg.sizes if s.name == r.size)
        note = ("held out" if r.held_out else "") + (f" {r.group}" if r.group != "grid" else "")
        lines.append(f"{r.name:20s} {d.d_model:4d} {d.n_layers:2d} {r.n_experts:3d} {r.top_k:2d} "
                     f"{c['total']:10.3e} {c['active']:10.3e} {c['active_nonembed']:10.3e} "
                     f"{r.tokens:10.3e} {r.tokens / c['active_nonembed']:6.1f} "
                     f"{r.micro_batch:3d} {r.steps:6d} "
                     f"{_fmt_epochs(r):>7s} {r.lr:8.2e} "
                     f"{r.flops:9.2e} {_hms(est):>7s}  {note.strip()}")
    lines.append(f"estimated training time {_hms(tot_s)} at {cfg.est_flops_per_s:.2e} FLOP/s "
                 f"(est_flops_per_s); total compute {sum(r.flops for r in runs):.3e} FLOPs")
    if cfg.gpus:
        lines.append(f"estimated cost {tot_s / 3600 * cfg.gpus:,.1f} GPU-hours "
                     f"({cfg.gpus} GPUs per run, runs one after another)")
    for cs in sizes or []:
        if cs.train_tokens is None:
            lines.append(f"data.corpus {cs.corpus!r}: epochs unknown: {cs.note}; point "
                         "data.corpus at your corpus (the ladder's overrides)")
        else:
            lines.append(f"data.corpus {cs.corpus!r}: {cs.train_tokens:,} training tokens; "
                         f"{cs.note}")
    if sizes is not None:
        known = [r for r in runs if r.epochs is not None]
        over = over_epochs(cfg, runs)
        if known:
            hi = max(known, key=lambda r: r.epochs)
            lines.append(f"epochs per run {min(r.epochs for r in known):.3g}..{hi.epochs:.3g} "
                         f"(max_epochs {cfg.max_epochs:g}): "
                         + (f"{len(over)} run(s) over it, worst {over[0].name}" if over
                            else "every run within it"))
        if len(known) < len(runs):
            lines.append(f"epochs of {len(runs) - len(known)} run(s) unknown until their "
                         "data.corpus exists; the ladder checks max_epochs before training")
    return "\n".join(lines)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
