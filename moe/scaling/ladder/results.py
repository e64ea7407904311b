"""results.csv: one row per run of the ladder (finished or not), rewritten atomically
after every run; the table `moe.scaling.table` reads and the fits use."""

from __future__ import annotations

import csv
from pathlib import Path

from moe.runs import atomic_open
from moe.scaling.ladder.design import Run
from moe.scaling.ladder.staleness import read_summary, recorded_fingerprint

RESULT_COLUMNS = ["name", "group", "size", "sparsity", "kind", "n_experts", "top_k",
                  "params_total", "params_active", "params_total_nonembed",
                  "params_active_nonembed", "params_embedding", "tokens", "flops",
                  "final_eval_loss", "maxvio", "tokens_per_s", "wall_time_s", "held_out",
                  "status", "lr", "warmup_steps", "steps", "seed", "precision", "flop_budget",
                  "repeat_of", "config_fingerprint", "epochs"]


def write_results(out: Path, runs: list[Run]) -> list[dict]:
    """Collect every finished run's summary into results.csv (atomic replace)."""
    rows = []
    for r in runs:
        run_dir = out / "runs" / r.name
        s = read_summary(run_dir) or {}
        stale = bool(s) and bool(r.fingerprint) and \
            recorded_fingerprint(run_dir)[0] != r.fingerprint
        if stale:
            s = {"status": "stale"}  # another config's result: never paired with this row
        c = r.counts
        mv = s.get("maxvio_global")
        if isinstance(mv, list):
            mv = max(mv) if mv else None
        rows.append({
            "name": r.name, "group": r.group, "size": r.size, "sparsity": r.sparsity,
            "kind": "moe" if r.n_experts else "dense", "n_experts": r.n_experts, "top_k": r.top_k,
            "params_total": c["total"], "params_active": c["active"],
            "params_total_nonembed": c["total_nonembed"],
            "params_active_nonembed": c["active_nonembed"], "params_embedding": c["embedding"],
            "tokens": s.get("tokens", r.tokens), "flops": s.get("total_flops", r.flops),
            "final_eval_loss": s.get("final_eval_loss"), "maxvio": mv,
            "tokens_per_s": s.get("tokens_per_s"), "wall_time_s": s.get("wall_time_s"),
            "held_out": r.held_out, "status": s.get("status", "pending"),
            "lr": r.lr, "warmup_steps": r.warmup_steps, "steps": r.steps, "seed": r.seed,
            "precision": s.get("precision"), "flop_budget": r.flop_budget,
            "repeat_of": r.repeat_of, "config_fingerprint": r.fingerprint,
            # a finished run's own count (summary.json); else the plan's (None: unknown)
            "epochs": s.get("epochs", r.epochs),
        })
    with atomic_open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return rows
