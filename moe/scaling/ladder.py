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

Runner guarantees: a run whose ``summary.json`` says ``done`` is never trained again
while its config is unchanged; a run whose config changed (its fingerprint, see
:func:`moe.config.config_fingerprint`, recorded in ``runs/<run>/fingerprint.json``) is
moved aside to ``runs/<run>.stale-<UTC>`` and trained again; a run with a checkpoint
resumes from it (``--resume``); a run that fails is recorded in
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
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..accounting import count_params
from ..config import (ConfigError, build_dataclass, config_fingerprint, fingerprint_fields,
                      changed_fields, fingerprint_of_fields, load_config, read_yaml)


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
    """How many tokens each run trains on (its own budget; the LR schedule ends there).

    per_active_param: `value` tokens per active NON-embedding parameter (Chinchilla's 20 by
    default; Kaplan's convention for N, so the rule does not bend with the vocabulary);
    isoflop: every size at each FLOP budget of `budgets` whose tokens/param (active
    non-embedding) falls in [min_ratio, max_ratio], i.e. sizes spread around each budget's
    optimum, the runs approach 2 needs; flops: one budget of `value` FLOPs per run;
    fixed: `value` tokens per run (kept for comparison: it over-trains the small sizes and
    starves the large ones).
    """
    mode: Literal["fixed", "per_active_param", "flops", "isoflop"] = "per_active_param"
    value: float = 20.0
    budgets: list[float] = field(default_factory=list)  # isoflop: FLOP budgets
    min_ratio: float = 2.0  # isoflop: tokens per active non-embedding param kept per budget
    max_ratio: float = 200.0
    min_tokens: int = 0  # floor so the smallest runs see enough data to leave warm-up


@dataclass
class LRSpec:
    """Learning rate per run: lr = base * (base_width / d_model) ** exponent, times
    moe_multiplier for MoE levels. exponent 0 is one LR for every width; 1 is the
    muP-style 1/width of Adam's hidden-layer LR (the constants come from a sweep; see the
    ladder config's comments). base None: the train config's train.lr."""
    base: Optional[float] = None
    base_width: int = 64
    exponent: float = 0.0
    moe_multiplier: float = 1.0


@dataclass
class ScheduleSpec:
    """Warm-up as a fraction of each run's own steps (at least min_warmup steps); the
    cosine decays to min_lr_ratio at the end of EACH run's budget (the trainer plans the
    schedule over the run's token budget)."""
    warmup_fraction: float = 0.05
    min_warmup: int = 5


@dataclass
class SeedSpec:
    """Seed repeats: each grid run named in `runs` is trained again with every seed in
    `seeds` (group "seed" in results.csv, `repeat_of` naming the grid run); their spread is
    the report's seed-noise floor."""
    runs: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [1])


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
    lr: LRSpec = field(default_factory=LRSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    seeds: SeedSpec = field(default_factory=SeedSpec)
    ffn_ratio: float = 4.0
    overrides: list[str] = field(default_factory=list)  # applied to every run
    holdout: list[str] = field(default_factory=list)  # run names, or ["largest"]
    compare: Optional[CompareSpec] = None
    launcher: str = ""  # e.g. "torchrun --nproc_per_node 8"; empty: one local process
    # refuse to start when a run would pass over its training split more often than this
    # (repeated data changes the loss curve; a law fitted over 1- and 10-epoch runs is a law
    # of the repetition). Checked against the prepared corpus' token count before training.
    max_epochs: float = 1.0
    est_flops_per_s: float = 2e10  # achieved training FLOP/s assumed by --dry-run
    gpus: int = 0  # devices one run occupies; > 0 makes --dry-run print GPU-hours
    n_boot: int = 200


@dataclass
class Run:
    name: str
    size: str
    sparsity: str
    overrides: list[str]
    group: str  # "grid", "compare" or "seed"
    counts: dict
    tokens: int
    flops: float
    n_experts: int
    top_k: int
    held_out: bool = False
    lr: float = 0.0
    warmup_steps: int = 0
    steps: int = 0
    seed: int = 0
    flop_budget: Optional[float] = None  # isoflop ladders: the nominal budget
    repeat_of: str = ""  # seed repeats: the grid run repeated
    fingerprint: str = ""  # moe.config.config_fingerprint of the run's exact config
    # (corpus, tokenizer, vocab_size, cache_dir, val_fraction, text_field, on_bad_record,
    # tokenizer_sample_bytes) of the run's config
    data_key: tuple = ()
    train_tokens: Optional[int] = None  # its corpus' training split (attach_epochs)
    epochs: Optional[float] = None  # tokens / train_tokens; None: corpus size unknown
    epochs_exact: bool = False  # False: from an estimated corpus size (--dry-run)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


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
    # names become directory names (runs/<size>-<sparsity>, runs/cmp-<variant>)
    named = [("name", cfg.name)] + [(f"{what}[{i}].name", x.name) for what, items in
                                    (("sizes", cfg.sizes), ("sparsities", cfg.sparsities),
                                     ("compare.variants", cfg.compare.variants
                                      if cfg.compare is not None else []))
                                    for i, x in enumerate(items)]
    for where, nm in named:
        if not _PLAIN_NAME.fullmatch(nm):
            raise ConfigError(f"{where}={nm!r} is invalid: allowed a plain file name (letters, "
                              "digits, '_', '.', '+', '-'; not starting with '.' or '-'): it "
                              "names run directories")
    if cfg.n_boot < 1:
        raise ConfigError(f"n_boot={cfg.n_boot} is invalid: allowed an integer >= 1")
    if not cfg.est_flops_per_s > 0 or not math.isfinite(cfg.est_flops_per_s):
        raise ConfigError(f"est_flops_per_s={cfg.est_flops_per_s} is invalid: allowed a "
                          "finite value > 0 (FLOP/s one run achieves)")
    if cfg.gpus < 0:
        raise ConfigError(f"gpus={cfg.gpus} is invalid: allowed an integer >= 0")
    if cfg.launcher:
        try:
            shlex.split(os.path.expandvars(cfg.launcher))
        except ValueError as exc:  # unbalanced quotes: shlex's "No closing quotation"
            raise ConfigError(f"launcher={cfg.launcher!r} is invalid: {exc}") from None
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
    if not cfg.max_epochs > 0:
        raise ConfigError(f"max_epochs={cfg.max_epochs} is invalid: allowed a value > 0")
    if cfg.tokens.value <= 0:
        raise ConfigError(f"tokens.value={cfg.tokens.value} is invalid: allowed a value > 0")
    if cfg.tokens.mode == "isoflop":
        if not cfg.tokens.budgets or any(b <= 0 for b in cfg.tokens.budgets):
            raise ConfigError(f"tokens.budgets={cfg.tokens.budgets} is invalid: allowed a "
                              "non-empty list of FLOP budgets > 0 (tokens.mode=isoflop)")
        if not 0 < cfg.tokens.min_ratio < cfg.tokens.max_ratio:
            raise ConfigError(f"tokens.min_ratio={cfg.tokens.min_ratio} is invalid: allowed "
                              f"0 < min_ratio < max_ratio={cfg.tokens.max_ratio}")
    if cfg.lr.base is not None and cfg.lr.base <= 0:
        raise ConfigError(f"lr.base={cfg.lr.base} is invalid: allowed a value > 0")
    if cfg.lr.base_width <= 0 or cfg.lr.moe_multiplier <= 0:
        raise ConfigError(f"lr.base_width={cfg.lr.base_width}, lr.moe_multiplier="
                          f"{cfg.lr.moe_multiplier} are invalid: allowed values > 0")
    if not 0 <= cfg.schedule.warmup_fraction < 1:
        raise ConfigError(f"schedule.warmup_fraction={cfg.schedule.warmup_fraction} is "
                          "invalid: allowed [0, 1)")
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


def run_lr(cfg: LadderConfig, base_lr: float, d_model: int, moe: bool) -> float:
    """The ladder's LR rule (LRSpec): base * (base_width / d_model) ** exponent [* moe]."""
    lr = (cfg.lr.base or base_lr) * (cfg.lr.base_width / d_model) ** cfg.lr.exponent
    return lr * (cfg.lr.moe_multiplier if moe else 1.0)


def warmup_for(cfg: LadderConfig, steps: int) -> int:
    """Warm-up steps of a run of `steps` steps (ScheduleSpec), never the whole run."""
    w = max(cfg.schedule.min_warmup, int(round(cfg.schedule.warmup_fraction * steps)))
    return max(0, min(w, steps - 1))


def _token_budgets(cfg: LadderConfig, c) -> list[tuple[float, Optional[float]]]:
    """(tokens, nominal FLOP budget or None) for one size x sparsity, before rounding."""
    t = cfg.tokens
    if t.mode == "fixed":
        return [(t.value, None)]
    if t.mode == "per_active_param":
        return [(t.value * c.active_nonembed, None)]
    if t.mode == "flops":
        return [(t.value / c.flops_per_token_train, None)]
    out = []
    for b in t.budgets:  # isoflop: this size at every budget where its ratio is in range
        tokens = b / c.flops_per_token_train
        if t.min_ratio <= tokens / c.active_nonembed <= t.max_ratio:
            out.append((tokens, b))
    return out


def plan(cfg: LadderConfig, base: Path) -> list[Run]:
    """Expand the ladder into runs, validating every run's config before anything trains.

    Every run gets its token budget, learning rate and warm-up from the ladder's rules
    (TokenSpec, LRSpec, ScheduleSpec), recorded on the Run and in results.csv.
    """
    runs: list[Run] = []
    base_cfg = load_config(base, list(cfg.overrides))
    isoflop = cfg.tokens.mode == "isoflop"

    def make(name, size, sp, extra, group, seed=None, repeat_of=""):
        ov = list(cfg.overrides) + _size_overrides(size, sp, cfg.ffn_ratio) + list(extra)
        probe = load_config(base, ov + [f"name={name}"])
        c = count_params(probe)
        tok_per_step = probe.train.micro_batch_size * probe.train.seq_len * probe.train.grad_accum
        budgets = _token_budgets(cfg, c)
        for tokens, flop_budget in budgets:
            rname = f"{name}-c{cfg.tokens.budgets.index(flop_budget)}" if isoflop else name
            tokens = max(int(tokens), cfg.tokens.min_tokens, tok_per_step)
            tokens = int(math.ceil(tokens / tok_per_step) * tok_per_step)  # whole steps
            steps = tokens // tok_per_step
            lr = run_lr(cfg, base_cfg.train.lr, size.d_model, sp.n_routed > 0)
            warm = warmup_for(cfg, steps)
            rseed = probe.train.seed if seed is None else seed
            rov = ov + [f"name={rname}", "train.max_steps=null", f"train.token_budget={tokens}",
                        "train.flop_budget=null", f"train.lr={lr:.6g}",
                        f"train.warmup_steps={warm}", f"train.seed={rseed}"]
            rov += [o for o in extra if o.startswith("train.lr=") or o.startswith(
                "train.warmup_steps=")]  # a variant's own LR/warm-up wins over the rule
            exact = load_config(base, rov)  # the exact config the run will use must be valid too
            dc = exact.data
            corpus = dc.corpus if isinstance(dc.corpus, str) else tuple(dc.corpus)
            dkey = (corpus, dc.tokenizer, exact.model.vocab_size, dc.cache_dir,
                    dc.val_fraction, tuple(dc.options().items()))
            runs.append(Run(name=rname, size=size.name, sparsity=sp.name, overrides=rov,
                            group=group, counts=c.as_dict(), tokens=tokens,
                            flops=tokens * c.flops_per_token_train,
                            n_experts=sp.n_routed, top_k=sp.top_k if sp.n_routed else 0,
                            lr=float(f"{lr:.6g}"), warmup_steps=warm, steps=steps,
                            seed=rseed, flop_budget=flop_budget,
                            repeat_of=(f"{repeat_of}-c{cfg.tokens.budgets.index(flop_budget)}"
                                       if repeat_of and isoflop else repeat_of),
                            fingerprint=config_fingerprint(exact), data_key=dkey))

    for size in cfg.sizes:
        for sp in cfg.sparsities:
            try:
                make(f"{size.name}-{sp.name}", size, sp, [], "grid")
            except ConfigError as exc:
                raise ConfigError(f"ladder run {size.name}-{sp.name}: {exc}") from None
    grid_names = {f"{r.size}-{r.sparsity}" for r in runs}
    unknown = set(cfg.seeds.runs) - grid_names
    if unknown:
        raise ConfigError(f"seeds.runs={sorted(unknown)} is invalid: allowed grid runs "
                          f"{sorted(grid_names)}")
    for rn in cfg.seeds.runs:
        size = next(s for s in cfg.sizes if rn.startswith(s.name + "-")
                    and rn[len(s.name) + 1:] in {p.name for p in cfg.sparsities})
        sp = next(p for p in cfg.sparsities if p.name == rn[len(size.name) + 1:])
        for sd in cfg.seeds.seeds:
            make(f"{rn}-seed{sd}", size, sp, [], "seed", seed=sd, repeat_of=rn)
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


def attach_epochs(runs: list[Run], build: bool = False, progress: bool = False) -> list:
    """Set every run's ``train_tokens``/``epochs`` from its corpus' training split.

    Each distinct data key (corpus, tokenizer, vocab, cache, val_fraction, data options)
    is counted once (:func:`moe.data.train_token_count`): ``build=True`` prepares what is
    not cached yet (so the runs then find it) and raises DataError for an unusable corpus;
    ``build=False`` (``--dry-run``) reads a prepared cache or estimates, and leaves
    ``epochs`` None with the reason when the corpus cannot be found. Returns the CorpusSize
    of each corpus.
    """
    from ..data import train_token_count

    sizes: dict = {}
    for r in runs:
        if r.data_key not in sizes:
            corpus, tok, vocab, cache, vf, options = r.data_key
            sizes[r.data_key] = train_token_count(
                list(corpus) if isinstance(corpus, tuple) else corpus, tok, vocab, cache, vf,
                build=build, progress=progress, **dict(options))
        cs = sizes[r.data_key]
        r.train_tokens = cs.train_tokens
        r.epochs = r.tokens / cs.train_tokens if cs.train_tokens else None
        r.epochs_exact = cs.exact
    return list(sizes.values())


def over_epochs(cfg: LadderConfig, runs: list[Run]) -> list[Run]:
    """Runs whose (known) epochs exceed ``cfg.max_epochs``, most epochs first."""
    over = [r for r in runs if r.epochs is not None and r.epochs > cfg.max_epochs]
    return sorted(over, key=lambda r: -r.epochs)


def epochs_message(cfg: LadderConfig, over: list[Run]) -> str:
    """One line naming the worst run, its epochs and the corpus size."""
    w = over[0]
    more = f"; {len(over) - 1} more run(s) exceed it" if len(over) > 1 else ""
    est = "" if w.epochs_exact else " (corpus size ESTIMATED, not prepared yet)"
    return (f"ladder {cfg.name}: run {w.name} would train {w.epochs:.2f} epochs "
            f"({w.tokens:,} tokens over data.corpus {w.data_key[0]!r} of {w.train_tokens:,} "
            f"training tokens{est}) > max_epochs={cfg.max_epochs:g}{more}; use a larger "
            "corpus, fewer tokens per run, or raise max_epochs")


def design_notes(cfg: LadderConfig, runs: list[Run]) -> list[str]:
    """The ladder's design rules, as sentences for the report header."""
    t, lr, sc = cfg.tokens, cfg.lr, cfg.schedule
    tok = {"fixed": f"fixed {t.value:.4g} tokens per run",
           "per_active_param": f"{t.value:g} tokens per active non-embedding parameter",
           "flops": f"{t.value:.3g} FLOPs per run",
           "isoflop": f"IsoFLOP budgets {', '.join(f'{b:.3g}' for b in t.budgets)} FLOPs, sizes "
                      f"with {t.min_ratio:g}-{t.max_ratio:g} tokens per active non-embedding "
                      "parameter at each"}[t.mode]
    rule = (f"lr = {lr.base or 'train.lr'} x ({lr.base_width} / d_model)^{lr.exponent:g}"
            + (f", x {lr.moe_multiplier:g} for MoE" if lr.moe_multiplier != 1 else ""))
    lrs = sorted({(r.size, r.lr) for r in runs if r.group == "grid"}, key=lambda x: -x[1])
    notes = [f"ladder {cfg.name}: tokens: {tok}",
             f"learning rate: {rule} ({', '.join(f'{s} {v:.3g}' for s, v in lrs)})",
             f"schedule: linear warm-up over {sc.warmup_fraction:.0%} of each run's steps (at "
             f"least {sc.min_warmup}), cosine decay to the end of each run's own budget"]
    seeds = [r for r in runs if r.group == "seed"]
    if seeds:
        notes.append("seed repeats: " + ", ".join(f"{r.repeat_of} (seed {r.seed})" for r in seeds))
    known = [r for r in runs if r.epochs is not None]
    if known:
        hi = max(known, key=lambda r: r.epochs)
        notes.append(f"data: at most {hi.epochs:.3g} epochs per run ({hi.name}; "
                     f"max_epochs {cfg.max_epochs:g})")
    return notes


def _fmt_epochs(r: Run) -> str:
    if r.epochs is None:
        return "?"
    return ("" if r.epochs_exact else "~") + f"{r.epochs:.3g}"


def format_plan(cfg: LadderConfig, runs: list[Run], sizes: Optional[list] = None) -> str:
    """The --dry-run table; ``sizes`` (attach_epochs' CorpusSize list) adds the data lines.
    The epochs column is ``?`` when the corpus size is unknown, ``~x`` when estimated."""
    head = (f"{'run':20s} {'d':>4s} {'L':>2s} {'E':>3s} {'k':>2s} {'total':>10s} {'active':>10s} "
            f"{'act-nonemb':>10s} {'tokens':>10s} {'tok/p':>6s} {'epochs':>7s} {'lr':>8s} "
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


FINGERPRINT_FILE = "fingerprint.json"


def recorded_fingerprint(run_dir: Path) -> tuple[Optional[str], Optional[dict]]:
    """(fingerprint, fields) of the config a run directory was trained with: the ladder's
    record (fingerprint.json), else computed from the trainer's saved config.yaml;
    (None, None) when neither says."""
    try:
        rec = json.loads((run_dir / FINGERPRINT_FILE).read_text())
        return rec["fingerprint"], rec.get("fields")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        import yaml

        fields = fingerprint_fields(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
        return fingerprint_of_fields(fields), fields
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return None, None


def _changed_fields(old: Optional[dict], new: dict) -> str:
    if old is None:
        return "no record of the config it was trained with"
    return changed_fields(old, new, 6)[1] or "fingerprint"


def _set_aside_if_stale(run_dir: Path, r: Run, base: Path) -> Optional[Path]:
    """If ``run_dir`` holds results (summary or checkpoint) of a config other than ``r``'s,
    move it to ``<run>.stale-<UTC>`` and return the new path; else None."""
    if not r.fingerprint or not run_dir.is_dir():
        return None
    if not ((run_dir / "summary.json").exists() or _has_checkpoint(run_dir)):
        return None  # nothing that could be reused
    fp, fields = recorded_fingerprint(run_dir)
    if fp == r.fingerprint:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = run_dir.with_name(f"{run_dir.name}.stale-{stamp}")
    n = 1
    while dest.exists():
        dest = run_dir.with_name(f"{run_dir.name}.stale-{stamp}-{n}")
        n += 1
    os.rename(run_dir, dest)
    new = fingerprint_fields(load_config(base, r.overrides))
    print(f"ladder: run {r.name} changed since it was trained ({_changed_fields(fields, new)}); "
          f"old results moved to {dest}; retraining", file=sys.stderr, flush=True)
    return dest


def _record_fingerprint(run_dir: Path, r: Run, base: Path) -> None:
    from ..train.checkpoint import write_text_atomic

    try:
        current = json.loads((run_dir / FINGERPRINT_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        current = None
    if not r.fingerprint or current == r.fingerprint:
        return
    fields = fingerprint_fields(load_config(base, r.overrides))
    write_text_atomic(run_dir / FINGERPRINT_FILE, json.dumps(
        {"run": r.name, "fingerprint": r.fingerprint, "fields": fields}, indent=1) + "\n")


def default_train_cmd(cfg: LadderConfig) -> list[str]:
    """``python -m moe.cli train``, or ``<launcher> -m moe.cli train`` (torchrun/srun take
    ``-m``); $VARS in the launcher are expanded from the environment (e.g. SLURM_NNODES)."""
    if not cfg.launcher:
        return [sys.executable, "-m", "moe.cli", "train"]
    return shlex.split(os.path.expandvars(cfg.launcher)) + ["-m", "moe.cli", "train"]


def check_runnable(cfg: LadderConfig, base: Path, runs: list[Run]) -> Optional[str]:
    """Before training anything (not for --dry-run, which may plan for another machine):
    the launcher's executable exists here, and each run of the plan (done ones too: the
    check is from the configs alone, not the run directories) fits this machine when it
    runs as one local process. One line naming the problem, or None."""
    if cfg.launcher:
        exe = default_train_cmd(cfg)[0]
        if shutil.which(exe) is None:
            return (f"launcher={cfg.launcher!r} is invalid: {exe!r} is not an executable "
                    "found on PATH")
        return None  # a launcher decides the world size: train checks each rank itself
    import torch

    from ..train.memguard import check_fits

    if torch.cuda.is_available():
        # measuring free GPU memory here would give this parent a CUDA context for the
        # whole ladder; each run's train checks its own device before allocating
        return None
    for r in runs:
        err = check_fits(load_config(base, r.overrides), "cpu", 1)
        if err is not None:
            return f"ladder run {r.name}: {err}"
    return None


def run_ladder(cfg: LadderConfig, base: Path, out: Path, runs: list[Run],
               train_cmd: Optional[list[str]] = None, progress: bool = True) -> list[dict]:
    """Train every run not yet done (resuming where a checkpoint exists); return result rows."""
    from ..rundir import lock_dir

    # one ladder per directory: a second one on the same --out is refused (RunDirError)
    with lock_dir(out, "ladder directory"), _ChildReaper() as reaper:
        return _run_ladder(cfg, base, out, runs, train_cmd, progress, reaper)


def _run_ladder(cfg: LadderConfig, base: Path, out: Path, runs: list[Run],
                train_cmd: Optional[list[str]], progress: bool,
                reaper: "_ChildReaper") -> list[dict]:
    from tqdm import tqdm

    (out / "plan.json").write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=str))
    cmd0 = list(train_cmd) if train_cmd is not None else default_train_cmd(cfg)
    # One local process per run: fork it from a warm server (same isolation, no ~7 s of
    # imports per run); a launcher (torchrun, srun) or a custom command runs as given.
    forked = train_cmd is None and not cfg.launcher and _can_fork()
    bar = tqdm(runs, desc=f"ladder {cfg.name}", unit="run", disable=not progress)
    for r in bar:
        run_dir = out / "runs" / r.name
        # a result of another config is never reused: set aside, retrain
        _set_aside_if_stale(run_dir, r, base)
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
        _record_fingerprint(run_dir, r, base)
        t0 = time.time()
        if forked:
            rc = _train_forked(cmd[len(cmd0):], run_dir / "train.log", reaper)
        else:
            with open(run_dir / "train.log", "ab") as log:
                rc = _train_subprocess(cmd, log, reaper)
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


def _can_fork() -> bool:
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods() and \
        os.environ.get("MOE_TESTBED_LADDER_FORK", "1") != "0"


_FORK_CTX = None


def _forkserver():
    """The multiprocessing context whose server has moe.train.preload imported."""
    global _FORK_CTX
    if _FORK_CTX is None:
        import multiprocessing

        _FORK_CTX = multiprocessing.get_context("forkserver")
        _FORK_CTX.set_forkserver_preload(["moe.train.preload"])
    return _FORK_CTX


class _ChildReaper:
    """The ladder's current child trainer runs in its own process group; on SIGTERM /
    SIGINT the ladder takes that group down (SIGTERM, SIGKILL after ``grace_s``) before it
    exits itself (SIGINT: KeyboardInterrupt; SIGTERM: exit 143). Handlers are installed
    only in the main thread and restored on exit."""

    def __init__(self, grace_s: float = 10.0):
        self.grace_s = grace_s
        self.pgid: Optional[int] = None
        self.wait = None  # callable(timeout) -> bool (True once the child is gone)
        self._old: dict = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old.clear()

    def track(self, pgid: Optional[int], wait=None) -> None:
        self.pgid, self.wait = pgid, wait

    def stop_child(self) -> None:
        import signal

        pgid, self.pgid = self.pgid, None
        if pgid is None:
            return
        def send(sig) -> bool:
            for kill in (os.killpg, os.kill):  # the group may not exist yet (just forked)
                try:
                    kill(pgid, sig)
                    return True
                except ProcessLookupError:
                    continue
            return False

        if send(signal.SIGTERM) and (self.wait is None or not self.wait(self.grace_s)):
            send(signal.SIGKILL)

    def _on_signal(self, signum, frame) -> None:
        import signal

        print(f"ladder: {signal.Signals(signum).name}: stopping run process group "
              f"{self.pgid}", file=sys.stderr)
        self.stop_child()
        self.__exit__()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


def _train_subprocess(cmd: list[str], log, reaper: _ChildReaper) -> int:
    """Run ``cmd`` in its own process group, dying with the ladder (PR_SET_PDEATHSIG);
    its exit code (128 + signal for a signal, as a shell reports it)."""
    from ..rundir import child_preexec

    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=child_preexec(os.getpid()))

    def wait(timeout):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    return _wait_tracked(reaper, proc.pid, wait, lambda: proc.returncode)


def _wait_tracked(reaper: _ChildReaper, pid: int, wait, exit_code) -> int:
    """Wait for child ``pid`` while ``reaper`` can stop it on a signal (``wait(timeout)``:
    True once it ended); its exit code, 128 + the signal number for a signal, as a shell
    reports it."""
    reaper.track(pid, wait)
    try:
        wait(None)
    finally:
        reaper.track(None)
    rc = exit_code()
    return rc if rc >= 0 else 128 - rc


def _train_child(argv: list[str], log_path: str, parent_pid: Optional[int] = None) -> None:
    # runs in the forked process: own process group, ends when the ladder process is gone
    # (its OS parent is the fork server, so PR_SET_PDEATHSIG alone would not see it)
    from moe.rundir import watch_parent

    os.setpgid(0, 0)
    if parent_pid is not None:
        watch_parent(parent_pid)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from moe.cli import main

    try:
        rc = main(["train", *argv])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report like an interpreter would, then exit 1
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc or 0))


def _train_forked(argv: list[str], log_path: Path, reaper: _ChildReaper) -> int:
    """`moe-testbed train ARGV` in a process forked from the warm server; its exit code.
    A run killed by a signal returns 128 + the signal number, as a shell reports it."""
    p = _forkserver().Process(target=_train_child,
                              args=(list(argv), str(log_path), os.getpid()))
    p.start()

    def wait(timeout):
        p.join(timeout)
        return p.exitcode is not None

    return _wait_tracked(reaper, p.pid, wait, lambda: p.exitcode)


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
        s = _read_summary(run_dir) or {}
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
    from ..data import DataError

    # Epoch accounting before anything trains: --dry-run reads the prepared caches (or
    # estimates); a real ladder prepares each corpus once here, then the runs find it.
    try:
        sizes = attach_epochs(runs, build=not a.dry_run, progress=not a.no_progress)
    except DataError as exc:
        print(f"error: ladder {cfg.name}: {exc}", file=sys.stderr)
        return 2
    print(format_plan(cfg, runs, sizes))
    over = over_epochs(cfg, runs)
    if over and (not a.dry_run or over[0].epochs_exact):
        print(f"error: {epochs_message(cfg, over)}", file=sys.stderr)
        return 2
    if over:
        print(f"warning: {epochs_message(cfg, over)}", file=sys.stderr)
    if a.dry_run:
        return 0
    out = Path(a.out or f"runs/ladder-{cfg.name}")
    problem = check_runnable(cfg, base, runs)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    t0 = time.time()
    from ..rundir import RunDirError

    try:
        rows = run_ladder(cfg, base, out, runs, progress=not a.no_progress)
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
                            source=str(out / "results.csv"), notes=design_notes(cfg, runs))
    except ResultsError as exc:
        print(f"error: no report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0 if len(done) == len(rows) else 1
