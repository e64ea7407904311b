"""Scaling ladders: a grid of runs over active size x sparsity x token budget, a resumable
runner that trains them through the training entry point, and the results table.

    moe-testbed ladder configs/ladder/cpu.yaml --dry-run     # the plan, before training
    moe-testbed ladder configs/ladder/cpu.yaml               # train, collect, fit, report

Every run is the ladder's ``train_config`` plus overrides generated from the
grid; its parameter, non-embedding and FLOP counts come from :func:`moe.count_params`
(never re-derived here). Sparsity variants keep ACTIVE FFN parameters equal to the dense
model of the same size: a dense FFN of hidden ``ffn_ratio * d_model`` becomes
``(top_k + n_shared)`` experts of hidden ``ffn / (top_k + n_shared)`` -- so within a
size the total grows with the expert count while the active count stays (up to the
router's ``d_model * E`` parameters).

Runner guarantees: a run whose ``summary.json`` says ``done`` is never trained again; a
run with a checkpoint resumes from it (``--resume``); a run that fails is recorded in
``failures.jsonl`` with its error and the ladder goes on; killing the ladder at any point
and re-running the same command loses nothing. Results are rewritten atomically into
``results.csv`` (one row per run) after every run; the report (fits.json, report.md, PNGs)
is written to ``<out>/report`` at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..accounting import count_params
from ..config import ConfigError, build_dataclass, load_config, read_yaml


# --------------------------------------------------------------------------------------
# Ladder config
# --------------------------------------------------------------------------------------


@dataclass
class SizeSpec:
    name: str
    d_model: int
    n_layers: int
    n_heads: int


@dataclass
class SparsitySpec:
    name: str
    n_routed: int = 0  # 0: dense
    top_k: int = 1
    n_shared: int = 0


@dataclass
class TokenSpec:
    # fixed: `value` tokens per run; per_active_param: value x active non-embedding params
    # (Chinchilla-style ratio); flops: a compute budget of `value` FLOPs per run
    mode: Literal["fixed", "per_active_param", "flops"] = "fixed"
    value: float = 1e6
    min_tokens: int = 0  # floor so the smallest runs see enough data to leave warm-up


@dataclass
class VariantSpec:
    name: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class CompareSpec:
    size: str
    sparsity: str
    variants: list[VariantSpec] = field(default_factory=list)


@dataclass
class LadderConfig:
    name: str
    train_config: str  # training config the runs start from (relative to the ladder file)
    sizes: list[SizeSpec]
    sparsities: list[SparsitySpec]
    tokens: TokenSpec = field(default_factory=TokenSpec)
    ffn_ratio: float = 4.0
    overrides: list[str] = field(default_factory=list)  # applied to every run
    holdout: list[str] = field(default_factory=list)  # run names, or ["largest"]
    compare: Optional[CompareSpec] = None
    launcher: str = ""  # e.g. "torchrun --nproc_per_node 8"; empty: one local process
    est_flops_per_s: float = 2e10  # achieved training FLOP/s assumed by --dry-run
    gpus: int = 0  # devices one run occupies; > 0 makes --dry-run print GPU-hours
    n_boot: int = 200


@dataclass
class Run:
    name: str
    size: str
    sparsity: str
    overrides: list[str]
    group: str  # "grid" or "compare"
    counts: dict
    tokens: int
    flops: float
    n_experts: int
    top_k: int
    held_out: bool = False

    @property
    def est_seconds(self) -> float:
        return self.flops  # placeholder replaced in plan(); kept for dataclass order


def load_ladder(path: str | os.PathLike) -> tuple[LadderConfig, Path]:
    """Read and validate a ladder YAML; returns (config, path of its training config).
    A ladder file may extend another with ``base:`` like model configs do."""
    path = Path(path)
    data = read_yaml(path)
    cfg = build_dataclass(LadderConfig, data, "")
    base = Path(cfg.train_config)
    base = base if base.is_absolute() else path.parent / base
    if not base.is_file():
        raise ConfigError(f"train_config={cfg.train_config!r} is invalid: no such config file ({base})")
    if not cfg.sizes:
        raise ConfigError("sizes=[] is invalid: allowed at least one size")
    if not cfg.sparsities:
        raise ConfigError("sparsities=[] is invalid: allowed at least one sparsity level")
    for what, items in (("sizes", cfg.sizes), ("sparsities", cfg.sparsities)):
        names = [i.name for i in items]
        if len(set(names)) != len(names):
            raise ConfigError(f"{what} names {names} are invalid: allowed unique names")
    for s in cfg.sparsities:
        if s.n_routed and s.top_k > s.n_routed:
            raise ConfigError(f"sparsities[{s.name}].top_k={s.top_k} is invalid: "
                              f"allowed <= n_routed={s.n_routed}")
    if cfg.ffn_ratio <= 0:
        raise ConfigError(f"ffn_ratio={cfg.ffn_ratio} is invalid: allowed a value > 0")
    if cfg.tokens.value <= 0:
        raise ConfigError(f"tokens.value={cfg.tokens.value} is invalid: allowed a value > 0")
    if cfg.compare is not None:
        if cfg.compare.size not in {s.name for s in cfg.sizes}:
            raise ConfigError(f"compare.size={cfg.compare.size!r} is invalid: allowed one of "
                              f"{[s.name for s in cfg.sizes]}")
        if cfg.compare.sparsity not in {s.name for s in cfg.sparsities}:
            raise ConfigError(f"compare.sparsity={cfg.compare.sparsity!r} is invalid: allowed one "
                              f"of {[s.name for s in cfg.sparsities]}")
    return cfg, base


def _size_overrides(size: SizeSpec, sp: SparsitySpec, ratio: float) -> list[str]:
    ffn = int(round(ratio * size.d_model))
    ov = [f"model.d_model={size.d_model}", f"model.n_layers={size.n_layers}",
          f"model.n_heads={size.n_heads}", "model.head_dim=null", "model.n_kv_heads=null",
          f"model.ffn_dim={ffn}"]
    if sp.n_routed == 0:
        ov += ["moe.n_routed=0", f"model.first_k_dense={size.n_layers}"]
    else:
        per = sp.top_k + sp.n_shared
        if ffn % per:
            raise ConfigError(f"ffn_ratio*d_model={ffn} for size {size.name} is invalid with "
                              f"sparsity {sp.name}: allowed a multiple of top_k + n_shared = {per}")
        ov += [f"moe.n_routed={sp.n_routed}", f"moe.top_k={sp.top_k}",
               f"moe.n_shared={sp.n_shared}", f"moe.expert_ffn_dim={ffn // per}",
               "moe.n_groups=1", "moe.topk_groups=1"]
    return ov


def plan(cfg: LadderConfig, base: Path) -> list[Run]:
    """Expand the ladder into runs, validating every run's config before anything trains."""
    runs: list[Run] = []

    def make(name, size, sp, extra, group):
        ov = list(cfg.overrides) + _size_overrides(size, sp, cfg.ffn_ratio) + list(extra)
        probe = load_config(base, ov + [f"name={name}"])
        c = count_params(probe)
        tok_per_step = probe.train.micro_batch_size * probe.train.seq_len * probe.train.grad_accum
        if cfg.tokens.mode == "fixed":
            tokens = cfg.tokens.value
        elif cfg.tokens.mode == "per_active_param":
            tokens = cfg.tokens.value * c.active_nonembed
        else:
            tokens = cfg.tokens.value / c.flops_per_token_train
        tokens = max(int(tokens), cfg.tokens.min_tokens, tok_per_step)
        tokens = int(math.ceil(tokens / tok_per_step) * tok_per_step)  # whole steps
        ov += [f"name={name}", "train.max_steps=null", f"train.token_budget={tokens}",
               "train.flop_budget=null"]
        load_config(base, ov)  # the exact config the run will use must be valid too
        runs.append(Run(name=name, size=size.name, sparsity=sp.name, overrides=ov, group=group,
                        counts=c.as_dict(), tokens=tokens,
                        flops=tokens * c.flops_per_token_train,
                        n_experts=sp.n_routed, top_k=sp.top_k if sp.n_routed else 0))

    for size in cfg.sizes:
        for sp in cfg.sparsities:
            try:
                make(f"{size.name}-{sp.name}", size, sp, [], "grid")
            except ConfigError as exc:
                raise ConfigError(f"ladder run {size.name}-{sp.name}: {exc}") from None
    if cfg.compare is not None:
        size = next(s for s in cfg.sizes if s.name == cfg.compare.size)
        sp = next(s for s in cfg.sparsities if s.name == cfg.compare.sparsity)
        for v in cfg.compare.variants:
            try:
                make(f"cmp-{v.name}", size, sp, v.overrides, "compare")
            except ConfigError as exc:
                raise ConfigError(f"ladder compare variant {v.name}: {exc}") from None
    names = [r.name for r in runs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"run names {sorted(dup)} repeat: allowed unique size/sparsity/variant names")
    grid = [r for r in runs if r.group == "grid"]
    if cfg.holdout == ["largest"]:
        largest = max(grid, key=lambda r: r.flops)
        for r in grid:
            r.held_out = r.size == largest.size
    else:
        unknown = set(cfg.holdout) - set(names)
        if unknown:
            raise ConfigError(f"holdout={sorted(unknown)} is invalid: allowed run names {names} "
                              "or ['largest']")
        for r in runs:
            r.held_out = r.name in cfg.holdout
    return runs


def format_plan(cfg: LadderConfig, runs: list[Run]) -> str:
    head = (f"{'run':20s} {'d':>4s} {'L':>2s} {'E':>3s} {'k':>2s} {'total':>10s} {'active':>10s} "
            f"{'act-nonemb':>10s} {'tokens':>10s} {'FLOPs':>9s} {'est':>7s}  note")
    lines = [f"ladder {cfg.name}: {len(runs)} runs", head, "-" * len(head)]
    tot_s = 0.0
    for r in runs:
        c = r.counts
        est = r.flops / cfg.est_flops_per_s
        tot_s += est
        d = next(s for s in cfg.sizes if s.name == r.size)
        note = ("held out" if r.held_out else "") + (" compare" if r.group == "compare" else "")
        lines.append(f"{r.name:20s} {d.d_model:4d} {d.n_layers:2d} {r.n_experts:3d} {r.top_k:2d} "
                     f"{c['total']:10.3e} {c['active']:10.3e} {c['active_nonembed']:10.3e} "
                     f"{r.tokens:10.3e} {r.flops:9.2e} {_hms(est):>7s}  {note.strip()}")
    lines.append(f"estimated training time {_hms(tot_s)} at {cfg.est_flops_per_s:.2e} FLOP/s "
                 f"(est_flops_per_s); total compute {sum(r.flops for r in runs):.3e} FLOPs")
    if cfg.gpus:
        lines.append(f"estimated cost {tot_s / 3600 * cfg.gpus:,.1f} GPU-hours "
                     f"({cfg.gpus} GPUs per run, runs one after another)")
    return "\n".join(lines)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------

DONE = "done"


def _read_summary(run_dir: Path) -> Optional[dict]:
    p = run_dir / "summary.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn summary is treated as "not done": the run resumes


def _has_checkpoint(run_dir: Path) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and (run_dir / "checkpoints" / latest.read_text().strip()).is_dir()


def default_train_cmd(cfg: LadderConfig) -> list[str]:
    """``python -m moe.cli train``, or ``<launcher> -m moe.cli train`` (torchrun/srun take
    ``-m``); $VARS in the launcher are expanded from the environment (e.g. SLURM_NNODES)."""
    if not cfg.launcher:
        return [sys.executable, "-m", "moe.cli", "train"]
    return shlex.split(os.path.expandvars(cfg.launcher)) + ["-m", "moe.cli", "train"]


def run_ladder(cfg: LadderConfig, base: Path, out: Path, runs: list[Run],
               train_cmd: Optional[list[str]] = None, progress: bool = True) -> list[dict]:
    """Train every run not yet done (resuming where a checkpoint exists); return result rows."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=str))
    cmd0 = list(train_cmd) if train_cmd is not None else default_train_cmd(cfg)
    bar = tqdm(runs, desc=f"ladder {cfg.name}", unit="run", disable=not progress)
    for r in bar:
        run_dir = out / "runs" / r.name
        s = _read_summary(run_dir)
        if s is not None and s.get("status") == DONE:
            continue
        bar.set_postfix_str(r.name)
        cmd = cmd0 + [str(base), *r.overrides, "--out", str(run_dir)]
        if _has_checkpoint(run_dir):
            cmd.append("--resume")
        if not progress:
            cmd.append("--no-progress")
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(run_dir / "train.log", "ab") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        s = _read_summary(run_dir)
        if rc != 0 or s is None or s.get("status") != DONE:
            tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
            rec = {"run": r.name, "exit_code": rc, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "seconds": round(time.time() - t0, 1), "error": " | ".join(tail),
                   "command": shlex.join(cmd)}
            with open(out / "failures.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            tqdm.write(f"run {r.name} failed (exit {rc}); see {run_dir / 'train.log'}")
        write_results(out, runs)
    return write_results(out, runs)


RESULT_COLUMNS = ["name", "group", "size", "sparsity", "kind", "n_experts", "top_k",
                  "params_total", "params_active", "params_total_nonembed",
                  "params_active_nonembed", "params_embedding", "tokens", "flops",
                  "final_eval_loss", "maxvio", "tokens_per_s", "wall_time_s", "held_out", "status"]


def write_results(out: Path, runs: list[Run]) -> list[dict]:
    """Collect every finished run's summary into results.csv (atomic replace)."""
    rows = []
    for r in runs:
        s = _read_summary(out / "runs" / r.name) or {}
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
        })
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / "results.csv")
    return rows


def ladder_main(argv: list[str]) -> int:
    """``moe-testbed ladder CONFIG [--dry-run] [--out DIR] [--no-report]``."""
    p = argparse.ArgumentParser(prog="moe-testbed ladder", description="Run or plan a scaling ladder.")
    p.add_argument("config")
    p.add_argument("--dry-run", action="store_true", help="print the runs and estimated time; train nothing")
    p.add_argument("--out", help="ladder directory (default runs/ladder-<name>)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg, base = load_ladder(a.config)
    runs = plan(cfg, base)
    print(format_plan(cfg, runs))
    if a.dry_run:
        return 0
    out = Path(a.out or f"runs/ladder-{cfg.name}")
    t0 = time.time()
    rows = run_ladder(cfg, base, out, runs, progress=not a.no_progress)
    done = [r for r in rows if r["status"] == DONE]
    print(f"{len(done)}/{len(rows)} runs done in {time.time() - t0:.0f} s; results: {out / 'results.csv'}")
    if a.no_report:
        return 0 if len(done) == len(rows) else 1
    from . import ResultsError, validate_rows, write_report

    report_dir = out / "report"
    try:
        side: dict = {}
        grid = validate_rows(done, source="results.csv", side=side)  # compare rows -> side
        path = write_report(grid, report_dir, n_boot=cfg.n_boot, holdout="flag", side=side,
                            source=str(out / "results.csv"))
    except ResultsError as exc:
        print(f"error: no report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0 if len(done) == len(rows) else 1
