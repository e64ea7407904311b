"""Scaling ladders: a grid of runs over active size x sparsity x token budget, a resumable
runner that trains them through the training entry point, and the results table
(`moe.scaling.ladder.command`). This module is the design: the ladder file, its rules
(tokens, learning rate, warm-up, sizes) and the runs they expand into.

    moe-testbed ladder configs/ladder/cpu.yaml --dry-run     # the plan, before training
    moe-testbed ladder configs/ladder/cpu.yaml               # train, collect, fit, report

Every run is the ladder's ``train_config`` plus overrides generated from the
grid; its parameter, non-embedding and FLOP counts come from :func:`moe.count_params`
(never re-derived here). Sparsity variants keep ACTIVE FFN parameters equal to the dense
model of the same size: a dense FFN of hidden ``ffn_ratio * d_model`` becomes
``(top_k + n_shared)`` experts of hidden ``ffn / (top_k + n_shared)`` -- so within a
size the total grows with the expert count while the active count stays (up to the
router's ``d_model * E`` parameters).
"""

from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from moe.accounting import count_params
from moe.config import ConfigError, build_dataclass, config_fingerprint, load_config, read_yaml
from moe.scaling.ladder.slurm import SlurmConfig, load_slurm


@dataclass
class SizeSpec:
    name: str
    d_model: int
    n_layers: int
    n_heads: int = 0  # 0: d_model / the ladder's head_dim


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
    # every level at a size (and budget) trains on the FLOPs of the first level in
    # `sparsities` (tokens = those FLOPs / the level's own FLOPs per token), so a sparsity
    # gap is never a compute gap; off: each level its own `value` tokens per param
    equal_compute: bool = False


@dataclass
class LRSpec:
    """Learning rate per run: lr = base * (base_width / d_model) ** exponent, times
    moe_multiplier for MoE levels, times (micro_batch / base_batch) ** batch_exponent when
    base_batch is set (a run whose batch schedule.min_steps shrank; 0.5 is the square-root
    rule for Adam). exponent 0 is one LR for every width; 1 is the muP-style 1/width of
    Adam's hidden-layer LR (the constants come from a sweep; see the ladder config's
    comments). base None: the train config's train.lr."""
    base: Optional[float] = None
    base_width: int = 64
    exponent: float = 0.0
    moe_multiplier: float = 1.0
    base_batch: int = 0  # the micro-batch `base` was tuned at; 0: no batch scaling
    batch_exponent: float = 0.5


@dataclass
class ScheduleSpec:
    """Warm-up as a fraction of each run's own steps (at least min_warmup steps); the
    cosine decays to min_lr_ratio at the end of EACH run's budget (the trainer plans the
    schedule over the run's token budget). min_steps: the fewest optimizer steps a run may
    take, reached by shrinking its micro-batch; steps: about this many steps for EVERY run,
    each run's micro-batch sized to its tokens (so a loss gap between sizes is not a gap
    in the number of updates)."""
    warmup_fraction: float = 0.05
    min_warmup: int = 5
    # at least this many optimizer steps per run: a run whose budget gives fewer at the
    # train config's micro-batch trains with the largest smaller micro-batch that gives
    # them (1 at the least; every level at a size shares it). 0: the config's batch always
    min_steps: int = 0
    # about this many optimizer steps for every run: micro-batch = tokens / (steps x seq_len
    # x grad_accum), rounded to the nearest integer (>= 1; may exceed the config's, and
    # min_steps still floors the steps). 0: off (the config's micro-batch, min_steps)
    steps: int = 0


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
    """Variants of one grid cell (balancing, ...), each trained once per seed in `seeds`
    (run cmp-<variant>-seed<k>, `repeat_of` cmp-<variant>); no seeds: once, at the train
    config's seed. Pick seeds the grid does not use, so no comparison run is a grid run
    again; the report pairs the variants' runs by seed."""
    size: str
    sparsity: str
    variants: list[VariantSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


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
    # one attention head width for every size (sizes then leave n_heads out, or give
    # d_model / head_dim): a head width that changes between sizes bends the loss curve
    head_dim: Optional[int] = None
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
    # --executor slurm: sbatch resources per run (moe.scaling.ladder.slurm.SlurmConfig;
    # read by load_ladder, defaults when the file has no slurm: section)
    slurm: Optional[SlurmConfig] = None


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
    micro_batch: int = 0  # the run's train.micro_batch_size (schedule.min_steps may shrink it)
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
    precision: str = ""  # the run's train.precision (one for the whole ladder)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def load_ladder(path: str | os.PathLike) -> tuple[LadderConfig, Path]:
    """Read and validate a ladder YAML; returns (config, path of its training config).
    A ladder file may extend another with ``base:`` like model configs do."""
    path = Path(path)
    data = read_yaml(path)
    slurm = data.pop("slurm", None) if isinstance(data, dict) else None
    cfg = build_dataclass(LadderConfig, data, "")
    base = Path(cfg.train_config)
    base = base if base.is_absolute() else path.parent / base
    if not base.is_file():
        raise ConfigError(f"train_config={cfg.train_config!r} is invalid: no such config file ({base})")
    if not cfg.sizes:
        raise ConfigError("sizes=[] is invalid: allowed at least one size")
    if not cfg.sparsities:
        raise ConfigError("sparsities=[] is invalid: allowed at least one sparsity level")
    _check_names(cfg)
    _check_heads(cfg)
    _check_running(cfg)
    _check_grid(cfg)
    _check_rules(cfg)
    cfg.slurm = load_slurm(slurm, [x.name for x in cfg.sizes])
    return cfg, base


def _check_names(cfg: LadderConfig) -> None:
    """Names become directory names (runs/<size>-<sparsity>, runs/cmp-<variant>)."""
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


def _check_heads(cfg: LadderConfig) -> None:
    """n_heads from head_dim (or given with every size), consistent with it."""
    hd = cfg.head_dim
    if hd is not None and hd < 1:
        raise ConfigError(f"head_dim={hd} is invalid: allowed an integer >= 1")
    for i, s in enumerate(cfg.sizes):
        if hd is None:
            if s.n_heads < 1:
                raise ConfigError(f"sizes[{i}].n_heads={s.n_heads} is invalid: allowed an "
                                  "integer >= 1 (or set the ladder's head_dim)")
            continue
        if s.d_model % hd:
            raise ConfigError(f"sizes[{i}].d_model={s.d_model} is invalid with head_dim={hd}: "
                              "allowed a multiple of head_dim")
        if s.n_heads and s.n_heads * hd != s.d_model:
            raise ConfigError(f"sizes[{i}].n_heads={s.n_heads} is invalid with head_dim={hd}: "
                              f"allowed {s.d_model // hd} (d_model / head_dim) or left out")
        s.n_heads = s.d_model // hd


def _check_running(cfg: LadderConfig) -> None:
    """How the ladder runs: bootstrap replicates, dry-run estimates, launcher."""
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


def _check_grid(cfg: LadderConfig) -> None:
    """Sizes and sparsities: unique names, top_k within the experts, a positive FFN ratio,
    max_epochs."""
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


def _check_rules(cfg: LadderConfig) -> None:
    """The token, LR and schedule rules, and the compare block."""
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
    if cfg.lr.base_batch < 0:
        raise ConfigError(f"lr.base_batch={cfg.lr.base_batch} is invalid: allowed an integer "
                          ">= 0 (0: no batch scaling)")
    if cfg.lr.base_width <= 0 or cfg.lr.moe_multiplier <= 0:
        raise ConfigError(f"lr.base_width={cfg.lr.base_width}, lr.moe_multiplier="
                          f"{cfg.lr.moe_multiplier} are invalid: allowed values > 0")
    if not 0 <= cfg.schedule.warmup_fraction < 1:
        raise ConfigError(f"schedule.warmup_fraction={cfg.schedule.warmup_fraction} is "
                          "invalid: allowed [0, 1)")
    if cfg.schedule.min_steps < 0:
        raise ConfigError(f"schedule.min_steps={cfg.schedule.min_steps} is invalid: allowed "
                          "an integer >= 0")
    if cfg.schedule.steps < 0:
        raise ConfigError(f"schedule.steps={cfg.schedule.steps} is invalid: allowed an "
                          "integer >= 0 (0: the config's micro-batch)")
    if cfg.compare is not None:
        if cfg.compare.size not in {s.name for s in cfg.sizes}:
            raise ConfigError(f"compare.size={cfg.compare.size!r} is invalid: allowed one of "
                              f"{[s.name for s in cfg.sizes]}")
        if cfg.compare.sparsity not in {s.name for s in cfg.sparsities}:
            raise ConfigError(f"compare.sparsity={cfg.compare.sparsity!r} is invalid: allowed one "
                              f"of {[s.name for s in cfg.sparsities]}")
        if len(set(cfg.compare.seeds)) != len(cfg.compare.seeds):
            raise ConfigError(f"compare.seeds={cfg.compare.seeds} is invalid: allowed distinct "
                              "seeds")


def size_overrides(size: SizeSpec, sp: SparsitySpec, ratio: float) -> list[str]:
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


def run_lr(cfg: LadderConfig, base_lr: float, d_model: int, moe: bool,
           micro_batch: Optional[int] = None) -> float:
    """The ladder's LR rule (LRSpec): base * (base_width / d_model) ** exponent [* moe]
    [* (micro_batch / base_batch) ** batch_exponent]."""
    lr = (cfg.lr.base or base_lr) * (cfg.lr.base_width / d_model) ** cfg.lr.exponent
    if cfg.lr.base_batch and micro_batch:
        lr *= (micro_batch / cfg.lr.base_batch) ** cfg.lr.batch_exponent
    return lr * (cfg.lr.moe_multiplier if moe else 1.0)


def warmup_for(cfg: LadderConfig, steps: int) -> int:
    """Warm-up steps of a run of `steps` steps (ScheduleSpec), never the whole run."""
    w = max(cfg.schedule.min_warmup, int(round(cfg.schedule.warmup_fraction * steps)))
    return max(0, min(w, steps - 1))


def _token_budgets(cfg: LadderConfig, c, ref=None) -> list[tuple[float, Optional[float]]]:
    """(tokens, nominal FLOP budget or None) for one size x sparsity, before rounding.
    ``ref``: the counts of the size's reference level (the first in `sparsities`); with
    tokens.equal_compute every level gets the reference's FLOPs, in its own tokens."""
    t = cfg.tokens
    if t.equal_compute and ref is not None and t.mode in ("fixed", "per_active_param"):
        return [(tok * ref.flops_per_token_train / c.flops_per_token_train, b)
                for tok, b in _token_budgets(cfg, ref)]
    if t.mode == "fixed":
        return [(t.value, None)]
    if t.mode == "per_active_param":
        return [(t.value * c.active_nonembed, None)]
    if t.mode == "flops":
        return [(t.value / c.flops_per_token_train, None)]
    out = []
    r = ref or c  # the reference level decides which budgets a size trains at, for all levels
    for b in t.budgets:  # isoflop: this size at every budget where its ratio is in range
        if t.min_ratio <= b / r.flops_per_token_train / r.active_nonembed <= t.max_ratio:
            out.append((b / c.flops_per_token_train, b))
    return out


def micro_batch_for(cfg: LadderConfig, tokens: float, micro_batch: int, seq_len: int,
                    grad_accum: int) -> int:
    """The micro-batch of a run of `tokens` tokens: with schedule.steps the one that gives
    about that many steps, else the train config's; either way the largest smaller one
    that still gives schedule.min_steps optimizer steps where it gives fewer (at least 1)."""
    per = seq_len * grad_accum
    if cfg.schedule.steps > 0:
        micro_batch = max(1, int(round(tokens / (cfg.schedule.steps * per))))
    need = cfg.schedule.min_steps
    if need <= 0 or tokens / (micro_batch * per) >= need:
        return micro_batch
    return max(1, min(micro_batch, int(tokens // (need * per))))


def _runs_of(cfg: LadderConfig, base: Path, base_cfg, base_ov: list[str], name: str,
             size: SizeSpec, sp: SparsitySpec, extra, group: str, seed=None,
             repeat_of="") -> list[Run]:
    """The runs of one size x sparsity (one per token budget), each with its exact config
    validated, its tokens rounded to whole steps of its micro-batch, its LR, warm-up and
    seed. ``base_ov``: the ladder's overrides with its precision pinned
    (:func:`ladder_precision`). The size's reference level (the first sparsity) sets the
    FLOPs of every level with tokens.equal_compute; the level with the fewest tokens sets
    the micro-batch every level at the size shares (schedule.min_steps)."""
    isoflop = cfg.tokens.mode == "isoflop"
    out: list[Run] = []
    ov = list(base_ov) + size_overrides(size, sp, cfg.ffn_ratio) + list(extra)
    probe = load_config(base, ov + [f"name={name}"])
    c = count_params(probe)
    cell = [count_params(load_config(base, list(base_ov) + size_overrides(size, p, cfg.ffn_ratio)
                                     + [f"name={name}"])) for p in cfg.sparsities]
    ref = cell[0]
    # the fewest tokens any level at this size trains on, per budget: it sets their batch
    fewest: dict = {}
    for cc in cell:
        for tok, b in _token_budgets(cfg, cc, ref):
            fewest[b] = min(tok, fewest.get(b, tok))
    t = probe.train
    for tokens, flop_budget in _token_budgets(cfg, c, ref):
        rname = f"{name}-c{cfg.tokens.budgets.index(flop_budget)}" if isoflop else name
        mb = t.micro_batch_size if any(o.startswith("train.micro_batch_size=") for o in extra) \
            else micro_batch_for(cfg, fewest.get(flop_budget, tokens), t.micro_batch_size,
                                 t.seq_len, t.grad_accum)  # a variant's own batch wins
        tok_per_step = mb * t.seq_len * t.grad_accum
        tokens = max(int(tokens), cfg.tokens.min_tokens, tok_per_step)
        tokens = int(math.ceil(tokens / tok_per_step) * tok_per_step)  # whole steps
        steps = tokens // tok_per_step
        lr = run_lr(cfg, base_cfg.train.lr, size.d_model, sp.n_routed > 0, mb)
        warm = warmup_for(cfg, steps)
        rseed = probe.train.seed if seed is None else seed
        rov = ov + [f"name={rname}", "train.max_steps=null", f"train.token_budget={tokens}",
                    "train.flop_budget=null", f"train.lr={lr:.6g}",
                    f"train.warmup_steps={warm}", f"train.seed={rseed}",
                    f"train.micro_batch_size={mb}"]
        rov += [o for o in extra if o.startswith("train.lr=") or o.startswith(
            "train.warmup_steps=")]  # a variant's own LR/warm-up wins over the rule
        exact = load_config(base, rov)  # the exact config the run will use must be valid too
        dc = exact.data
        corpus = dc.corpus if isinstance(dc.corpus, str) else tuple(dc.corpus)
        dkey = (corpus, dc.tokenizer, exact.model.vocab_size, dc.cache_dir,
                dc.val_fraction, tuple(dc.options().items()))
        out.append(Run(name=rname, size=size.name, sparsity=sp.name, overrides=rov,
                       group=group, counts=c.as_dict(), tokens=tokens,
                       flops=tokens * c.flops_per_token_train,
                       n_experts=sp.n_routed, top_k=sp.top_k if sp.n_routed else 0,
                       lr=float(f"{lr:.6g}"), warmup_steps=warm, steps=steps,
                       micro_batch=mb, seed=rseed, flop_budget=flop_budget,
                       repeat_of=(f"{repeat_of}-c{cfg.tokens.budgets.index(flop_budget)}"
                                  if repeat_of and isoflop else repeat_of),
                       fingerprint=config_fingerprint(exact), data_key=dkey,
                       precision=exact.train.precision))
    return out


def ladder_precision(cfg: LadderConfig, base_cfg) -> list[str]:
    """The override that pins ``train.precision`` for every run when the base config says
    `auto` (else none): bf16 where the runs get GPUs (``gpus`` > 0 or CUDA here), fp32 on
    CPU. A ladder never lets `auto` decide per run: on CPU that is a timing probe of each
    run's own model, which can pick differently at different sizes, and a law fitted across
    a precision change fits the change too. fp32 on CPU is the measured choice at the CPU
    ladders' sizes (benchmarks/results/ladder_step_cpu.md: bf16 steps faster for dense at
    d 48-64 but slower for MoE at every size);
    set ``train.precision=bf16`` in the ladder's overrides to train a CPU ladder in bf16."""
    if base_cfg.train.precision != "auto":
        return []
    import torch

    gpu = cfg.gpus > 0 or torch.cuda.is_available()
    return [f"train.precision={'bf16' if gpu else 'fp32'}"]


def _check_one_precision(runs: list[Run]) -> None:
    """Every run of a ladder trains in one precision (a compare variant may not change it):
    a loss law fitted across sizes trained in different precisions fits the change too."""
    kinds = sorted({r.precision for r in runs})
    if len(kinds) > 1:
        by = {k: [r.name for r in runs if r.precision == k][:3] for k in kinds}
        raise ConfigError(f"train.precision differs between runs ({by}): allowed one "
                          "precision for every run of a ladder")


def plan(cfg: LadderConfig, base: Path) -> list[Run]:
    """Expand the ladder into runs, validating every run's config before anything trains.

    Every run gets its token budget, learning rate and warm-up from the ladder's rules
    (TokenSpec, LRSpec, ScheduleSpec), recorded on the Run and in results.csv.
    """
    base_cfg = load_config(base, list(cfg.overrides))
    base_ov = list(cfg.overrides) + ladder_precision(cfg, base_cfg)

    def make(name, size, sp, extra, group, seed=None, repeat_of=""):
        runs.extend(_runs_of(cfg, base, base_cfg, base_ov, name, size, sp, extra, group,
                             seed, repeat_of))

    runs: list[Run] = []
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
                if not cfg.compare.seeds:
                    make(f"cmp-{v.name}", size, sp, v.overrides, "compare")
                for sd in cfg.compare.seeds:
                    make(f"cmp-{v.name}-seed{sd}", size, sp, v.overrides, "compare", seed=sd,
                         repeat_of=f"cmp-{v.name}")
            except ConfigError as exc:
                raise ConfigError(f"ladder compare variant {v.name}: {exc}") from None
    _check_one_precision(runs)
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
            + (f" x (micro-batch / {lr.base_batch})^{lr.batch_exponent:g}" if lr.base_batch
               else "")
            + (f", x {lr.moe_multiplier:g} for MoE" if lr.moe_multiplier != 1 else ""))
    lrs = sorted({(r.size, r.lr) for r in runs if r.group == "grid"}, key=lambda x: -x[1])
    notes = [f"ladder {cfg.name}: tokens: {tok}",
             f"learning rate: {rule} ({', '.join(f'{s} {v:.3g}' for s, v in lrs)})",
             f"schedule: linear warm-up over {sc.warmup_fraction:.0%} of each run's steps (at "
             f"least {sc.min_warmup}), cosine decay to the end of each run's own budget"]
    if cfg.head_dim:
        notes.append(f"attention: head width {cfg.head_dim} at every size (n_heads = d_model / "
                     f"{cfg.head_dim})")
    grid = [r for r in runs if r.group == "grid"]
    if grid:
        lo = min(grid, key=lambda r: r.steps)
        mbs = sorted({r.micro_batch for r in grid})
        rule = (f"about {cfg.schedule.steps} steps per run" if cfg.schedule.steps else
                f"at least {cfg.schedule.min_steps} steps per run")
        notes.append(f"batch: micro-batch {', '.join(map(str, mbs))} ({rule}); steps "
                     f"{lo.steps} ({lo.name})..{max(r.steps for r in grid)}")
    cells: dict = {}
    for r in grid:
        cells.setdefault((r.size, r.flop_budget), []).append(r.flops)
    spread = max((max(f) / min(f) - 1 for f in cells.values() if len(f) > 1), default=None)
    if spread is not None:
        notes.append(f"compute: the levels at a size differ in training FLOPs by at most "
                     f"{spread:.2%}" + (" (tokens.equal_compute; whole-step rounding)"
                                         if cfg.tokens.equal_compute else
                                         " (each level its own token rule: the gaps include "
                                         "this compute difference)"))
    seeds = [r for r in runs if r.group == "seed"]
    if seeds:
        notes.append("seed repeats: " + ", ".join(f"{r.repeat_of} (seed {r.seed})" for r in seeds))
    known = [r for r in runs if r.epochs is not None]
    if known:
        hi = max(known, key=lambda r: r.epochs)
        notes.append(f"data: at most {hi.epochs:.3g} epochs per run ({hi.name}; "
                     f"max_epochs {cfg.max_epochs:g})")
    return notes
