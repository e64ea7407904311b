"""The training loop: DeepSpeed engine, evaluation, budgets, checkpoints, metrics.

One code path for one CPU process and for ``torchrun`` / the ``deepspeed`` launcher on
any number of nodes. With parallel.tp = parallel.ep = 1 every rank holds the whole model,
reads disjoint samples of each global batch and DeepSpeed averages gradients. With
tp/ep > 1, :mod:`moe.parallel.plan` shards the model (megatron-core groups, TP layers,
experts over all-to-all) and the data-parallel (DP) rank, not the global rank, decides
which samples a rank reads. Per optimizer step:

    for each of grad_accum micro-batches:  forward (MTP lambda from progress) -> backward
    at the accumulation boundary:
        all-reduce the step's losses (mean over DP ranks) -> NaN/inf check on every rank alike
        expert-bias update from the exact int64 token counts, SUM-all-reduced over DP ranks
        [tp/ep > 1 at ZeRO 0: exact gradient norm over all shards, clipping]
        engine.step()  (clip when not done above, AdamW, LR schedule)
A resumed run must have the same config, parallel.tp/ep included (checked against the
saved config.yaml), and the same number of processes.

Stopping: ``total_steps`` = the first of train.max_steps, train.token_budget and
train.flop_budget (FLOPs = count_params(cfg).flops_per_token_train x tokens) to be
reached; it is fixed up front so the cosine schedule and the MTP lambda schedule end
exactly where training does.

Exactness: with one CPU process a resumed run continues bit-for-bit (model, AdamW state,
scheduler, expert biases, data position and RNG states are all restored); see
``moe/train/checkpoint.py`` for the format.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from ..accounting import count_params
from ..config import Config, config_fingerprint
from ..cpu_malloc import keep_freed_memory, malloc_mode
from ..model import build_model
from ..router import max_violation
from ..rundir import RunDirError, lock_dir
from . import checkpoint as ckpt
from .opbuild import OpBuildError
from .engine import (all_reduce_sum, build_engine, deepspeed_config, device_type,
                     init_process_group, load_optimizer_state, optimizer_state,
                     resolve_precision)
from .metrics import MetricsLog, measure_matmul_peak, read_rows

EXIT_DIVERGED = 3

# Fields that may differ between a run's saved config and the one it is resumed with:
# they change what is logged/saved, never the trajectory.
RESUME_MAY_CHANGE = {"train.log_every", "train.eval_every", "train.eval_batches",
                     "train.eval_at_start",
                     "train.ckpt_every", "train.tensorboard", "train.peak_flops",
                     "train.cpu_keep_freed_memory",
                     "data.cache_dir", "parallel.timeout_s"}


class TrainError(RuntimeError):
    """A run cannot start (run directory, resume mismatch). The CLI prints it and exits 2."""


@dataclass
class RunResult:
    """What :func:`train` returns: the summary dict, the run dir and an exit code."""

    run_dir: Path
    summary: dict
    exit_code: int


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (a checkpoint write failed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        return bool(all_reduce_sum(t)[0])
    return bool(flag)


def _broadcast(obj):
    """rank 0's ``obj`` on every rank (identity on one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def default_run_dir(cfg: Config, root: str | os.PathLike = "runs") -> Path:
    """``runs/<name>-<UTC timestamp>`` (a new directory per run)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{cfg.name}-{stamp}"


def find_resumable_run(cfg: Config, root: str | os.PathLike = "runs") -> Optional[Path]:
    """The newest ``runs/<name>-*`` directory holding a checkpoint (for ``--resume``
    without ``--out``)."""
    cands = [p for p in Path(root).glob(f"{cfg.name}-*")
             if (p / ckpt.CKPT_DIR / ckpt.LATEST).is_file()]
    return max(cands, key=lambda p: p.name) if cands else None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume_config(cfg: Config, run_dir: Path) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise TrainError(f"cannot resume: {saved_path} is missing")
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = _flatten(yaml.safe_load(cfg.to_yaml()))
    diff = sorted(k for k in set(saved) | set(now)
                  if saved.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:4])
        more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
        raise TrainError(f"cannot resume {run_dir}: the config differs from the saved one in "
                         f"{shown}{more}; an exact resume needs the same config (only "
                         f"{', '.join(sorted(RESUME_MAY_CHANGE))} may change)")


def epochs_of(tokens: int, train_tokens: int) -> float:
    """``tokens / train_tokens``: passes over the training split (inf for an empty split)."""
    return tokens / train_tokens if train_tokens > 0 else math.inf


# Files train() writes at the top of a run directory.
RUN_FILES = ("config.yaml", "deepspeed.json", "summary.json", "metrics.jsonl", "training.png")


def _check_config_source(cfg: Config, run_dir: Path, config_path) -> None:
    """Refuse a run whose own outputs would overwrite the user's config file (``train
    DIR/config.yaml --out DIR``), unless that file already is this exact resolved config
    (resuming a run from its own saved config rewrites nothing)."""
    if config_path is None:
        return
    src = Path(config_path)
    for name in RUN_FILES:
        dst = run_dir / name
        try:
            same = dst.exists() and src.exists() and os.path.samefile(src, dst)
        except OSError:
            same = False
        if not same:
            continue
        if name == "config.yaml" and dst.read_text(errors="replace") == cfg.to_yaml():
            continue
        raise TrainError(f"--out {run_dir} would overwrite the config file {src} (the run "
                         f"writes its resolved config and outputs to {run_dir}/{name}); "
                         "pass another --out or move the config file")


def plan_total_steps(cfg: Config, world_size: int) -> tuple[int, str]:
    """(optimizer steps to run, which rule stops first)."""
    t = cfg.train
    tokens_per_step = t.micro_batch_size * t.grad_accum * world_size * t.seq_len
    rules = []
    if t.max_steps is not None:
        rules.append((t.max_steps, "max_steps"))
    if t.token_budget is not None:
        rules.append((math.ceil(t.token_budget / tokens_per_step), "token_budget"))
    if t.flop_budget is not None:
        fpt = count_params(cfg).flops_per_token_train
        rules.append((math.ceil(t.flop_budget / (fpt * tokens_per_step)), "flop_budget"))
    steps, rule = min(rules)
    return max(1, steps), rule


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def data_options(cfg: Config) -> dict:
    """prepare_data's keyword options from ``cfg.data`` (text field, bad records, sample)."""
    return cfg.data.options()


def prepare(cfg: Config, progress: bool = True):
    """Tokenised train/val splits for ``cfg`` (cached), checked against the run's shapes.

    Collective under torchrun: rank 0 builds the cache first (the others then load it), and
    a DataError on rank 0 is re-raised on every rank so all exit 2 together, before any
    compute. Raises :class:`moe.data.DataError`.
    """
    from ..data import DataError, num_samples, prepare_data

    rank = dist.get_rank() if dist.is_initialized() else 0
    extra = cfg.mtp.depth

    def build():
        data = prepare_data(cfg.data.corpus, cfg.data.tokenizer, cfg.model.vocab_size,
                            cache_dir=cfg.data.cache_dir, val_fraction=cfg.data.val_fraction,
                            progress=progress and rank == 0, **data_options(cfg))
        need = cfg.train.seq_len + 1 + extra
        for split in (data.train, data.val):
            if num_samples(len(split), cfg.train.seq_len, extra) == 0:
                raise DataError(
                    f"the {split.name} split of {cfg.data.corpus!r} has {len(split)} tokens, "
                    f"fewer than one sample of train.seq_len={cfg.train.seq_len} + 1 + "
                    f"mtp.depth={extra} = {need} tokens; lower train.seq_len or use a larger "
                    f"corpus / data.val_fraction")
        return data

    err = None
    data = None
    if rank == 0:
        try:
            data = build()
        except DataError as e:
            err = str(e)
    err = _broadcast(err)
    if err is not None:
        raise DataError(err)
    if rank != 0:
        data = build()
    return data


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, data, cfg: Config, rank: int, world: int, device: str, group=None,
             collective_forward: bool = False) -> dict:
    """Held-out losses and MaxVio_global (MaxVio of the counts summed over all eval
    batches, per MoE layer; main-model layers first, then MTP blocks).

    Ranks evaluate disjoint samples; token-weighted sums are all-reduced once, so the
    result does not depend on how the samples were split across ranks (up to fp rounding).
    ``rank`` / ``world`` / ``group`` are the data-parallel ones (the TP ranks of one model
    replica evaluate the same samples and are counted once). ``collective_forward``
    (expert parallelism: every forward is an all-to-all over the EP group): a rank without
    a sample in the last global batch still runs one forward, on a filler sample whose
    losses and counts are discarded, so no rank waits for a peer that stopped early.
    """
    from ..data import eval_batches

    was_training = model.training
    model.eval()
    depth = cfg.mtp.depth
    moe_layers = model.moe_layers()
    counts = [torch.zeros(l.n_experts, dtype=torch.int64) for l in moe_layers]
    sums = torch.zeros(2 + depth, dtype=torch.float64)  # lm, mtp_1..D, n_tokens
    filler = None
    for xb in eval_batches(data.val, cfg.train.micro_batch_size, cfg.train.seq_len,
                           extra_tokens=depth, max_batches=cfg.train.eval_batches,
                           rank=rank, world_size=world, yield_empty=collective_forward):
        if xb is None:
            if filler is None:
                filler = next(eval_batches(data.val, 1, cfg.train.seq_len, extra_tokens=depth,
                                           max_batches=1))
            model(filler.to(device))  # joins the peers' all-to-alls; nothing is counted
            continue
        out = model(xb.to(device))
        n = xb.shape[0] * cfg.train.seq_len
        sums[0] += float(out["lm_loss"]) * n
        for k, l in enumerate(out["mtp_losses"]):
            sums[1 + k] += float(l) * n
        sums[-1] += n
        for c, l in zip(counts, moe_layers):
            c += l.last_counts_E.cpu()
    all_reduce_sum(sums, group)  # gloo: CPU tensors
    if counts:
        flat = all_reduce_sum(torch.cat(counts), group)
        counts = list(torch.split(flat, [l.n_experts for l in moe_layers]))
    model.train(was_training)
    n = max(float(sums[-1]), 1.0)
    row = {"lm_loss": float(sums[0]) / n, "eval_tokens": int(sums[-1])}
    for k in range(depth):
        row[f"mtp_loss_{k + 1}"] = float(sums[1 + k]) / n
    row["maxvio_global"] = [max_violation(c) for c in counts]
    return row


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _rank_state(engine, scheduler, batches, counters: dict) -> dict:
    # expert_bias: this rank's copy, saved per rank so replicas can be compared (they must
    # be identical: every rank applies the same update from the all-reduced counts).
    return {"optimizer": optimizer_state(engine.optimizer),
            "expert_bias": [l.expert_bias.detach().cpu().clone()
                            for l in engine.module.moe_layers()],
            "scheduler": scheduler.state_dict(),
            "data": batches.state_dict(),
            "rng": ckpt.rng_state(),
            "counters": dict(counters)}


def _env_info() -> dict:
    import deepspeed

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def train(cfg: Config, run_dir: Optional[Path] = None, *, resume: bool = False,
          progress: bool = True, data=None,
          config_path: Optional[str | os.PathLike] = None) -> RunResult:
    """Train ``cfg`` with DeepSpeed; write the run directory; return a :class:`RunResult`.

    Args:
        cfg: a validated config.
        run_dir: output directory; None: ``runs/<name>-<timestamp>`` (with ``resume``:
            the newest ``runs/<name>-*`` that has a checkpoint).
        resume: continue from ``run_dir``'s latest checkpoint (exactly, same config).
        progress: tqdm bar on rank 0.
        data: an already prepared :class:`moe.data.PreparedData` (else :func:`prepare`).

    Raises TrainError / DataError before any compute for unusable inputs. A non-finite
    loss does not raise: the result has ``exit_code`` 3 and ``summary["status"]``
    ``"diverged"``; the last good checkpoint stays ``latest``. A finished run has status
    ``"done"`` (the ladder runner's contract).

    The run directory is held by this process for the whole call (rank 0 takes
    ``RUN_DIR/.lock``, see :mod:`moe.rundir`): a second run on it is refused (TrainError
    naming the holder's pid). ``config_path``: the YAML the config was read from; it is
    never overwritten by the resolved ``RUN_DIR/config.yaml``.
    """
    locks: list = []
    try:
        return _train(cfg, run_dir, resume=resume, progress=progress, data=data,
                      config_path=config_path, locks=locks)
    finally:
        for lock in locks:
            lock.release()


def _load_initial_weights(model, path: str) -> None:
    """train.init_from: weights from a model.pt, a checkpoint directory or a run directory
    (its newest usable checkpoint, shards merged, or its model.pt)."""
    from ..parallel.plan import load_consolidated

    p = Path(path)
    try:
        if p.is_file():
            sd = ckpt.load_file(p)
        elif (p / "meta.json").is_file():
            sd = load_consolidated(p)
        elif p.is_dir():
            found, problems = ckpt.usable_checkpoint(p)
            if found is not None:
                sd = load_consolidated(found)
            elif (p / "model.pt").is_file():
                sd = ckpt.load_file(p / "model.pt")
            else:
                raise TrainError(f"train.init_from={path!r}: no usable checkpoint or model.pt "
                                 f"there{': ' + '; '.join(problems) if problems else ''}")
        else:
            raise TrainError(f"train.init_from={path!r}: no such file or directory")
    except ckpt.CheckpointError as e:
        raise TrainError(f"train.init_from={path!r}: {e}") from None
    bad = model.load_state_dict(sd, strict=False)
    if bad.missing_keys or bad.unexpected_keys:
        raise TrainError(f"train.init_from={path!r} does not fit this model: missing "
                         f"{bad.missing_keys[:3]}, unexpected {bad.unexpected_keys[:3]}")


def _train(cfg: Config, run_dir, *, resume: bool, progress: bool, data, config_path,
           locks: list) -> RunResult:
    t_start = time.perf_counter()
    cfg.validate()
    rank, world = init_process_group(cfg.parallel.timeout_s)
    from ..parallel.plan import plan_parallel

    par = plan_parallel(cfg.parallel)  # ConfigError naming parallel.tp/ep if world does not factor
    dp, dp_rank, dp_group = par.dp, par.dp_rank, par.dp_group
    dev = device_type()
    is0 = rank == 0
    if dev == "cpu" and cfg.train.cpu_keep_freed_memory:
        keep_freed_memory()

    # ---------------- does it fit? (rank 0 decides from the config's accounting)
    from .memguard import check_fits

    err = _broadcast(check_fits(cfg, dev, world, par.topo.tp) if is0 else None)
    if err is not None:
        raise TrainError(err)

    # ---------------- run directory (decided on rank 0, shared with the others)
    if is0:
        if run_dir is None:
            run_dir = find_resumable_run(cfg) if resume else default_run_dir(cfg)
            if run_dir is None:
                run_dir = "__none__"
        run_dir = str(run_dir)
    run_dir = _broadcast(run_dir)
    if run_dir == "__none__":
        raise TrainError(f"--resume: no run of {cfg.name!r} with a checkpoint under runs/; "
                         "pass --out RUN_DIR")
    run_dir = Path(run_dir)
    # ---------------- ownership: rank 0 holds RUN_DIR/.lock until train() returns
    err = None
    if is0:
        try:
            locks.append(lock_dir(run_dir))
            _check_config_source(cfg, run_dir, config_path)
        except (RunDirError, TrainError) as e:
            err = str(e)
    err = _broadcast(err)
    if err is not None:
        raise TrainError(err)
    latest = None
    if resume:
        # rank 0 picks the newest usable checkpoint (falling back past damaged ones)
        found = None
        if is0:
            path, problems = ckpt.usable_checkpoint(run_dir)
            found = (str(path) if path is not None else None, problems)
        found = _broadcast(found)
        latest = Path(found[0]) if found[0] is not None else None
        if latest is None and not found[1]:
            raise TrainError(f"cannot resume: {run_dir} has no checkpoint "
                             f"({run_dir / ckpt.CKPT_DIR / ckpt.LATEST} is missing)")
        if latest is None:
            raise TrainError(f"cannot resume: no usable checkpoint in "
                             f"{run_dir / ckpt.CKPT_DIR}: {'; '.join(found[1])}")
        if is0:
            for problem in found[1]:
                print(f"warning: {problem}; resuming from {latest}", file=sys.stderr)
        _check_resume_config(cfg, run_dir)
        meta = ckpt.read_meta(latest)
        if meta.get("world_size") != world:
            raise TrainError(f"cannot resume {latest}: it was written by {meta.get('world_size')} "
                             f"ranks, this run has {world} (the optimizer/loader state is "
                             "per rank); relaunch with the same number of processes")
    elif (run_dir / ckpt.CKPT_DIR / ckpt.LATEST).exists():
        raise TrainError(f"{run_dir} already holds a run with checkpoints; pass --resume to "
                         "continue it or --out NEW_DIR for a new run")

    # ---------------- data (before any model compute)
    if data is None:
        data = prepare(cfg, progress=progress)
    if latest is not None:
        saved_fp = ckpt.read_meta(latest).get("data_fingerprint")
        if saved_fp is not None and saved_fp != data.fingerprint:
            raise TrainError(f"cannot resume {latest}: the data changed since it was written "
                             f"(fingerprint {saved_fp[:12]} -> {data.fingerprint[:12]}); the "
                             "loader position would point into different tokens")

    if is0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    _barrier()

    # ---------------- model + engine
    from ..data import TokenBatches

    # Same full init on every rank (DeepSpeed also broadcasts), then this rank's TP/EP shard.
    torch.manual_seed(cfg.train.seed)
    full = build_model(cfg)
    if cfg.train.init_from and latest is None:
        _load_initial_weights(full, cfg.train.init_from)
    model = par.parallelize(full).to(dev)
    total_steps, stop_rule = plan_total_steps(cfg, dp)
    # one precision for every rank: `auto` on CPU is a timing probe, decided on rank 0
    precision = _broadcast(resolve_precision(cfg, dev) if is0 else None)
    ds_cfg = deepspeed_config(cfg, dp, dev, precision)
    own_clip = par.model_parallel and cfg.train.zero_stage == 0
    if own_clip:
        ds_cfg["gradient_clipping"] = 0.0  # exact clipping over shards: par.clip_grad_norm_
    if is0:
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_cfg, indent=2) + "\n")
    try:
        engine, _, scheduler = build_engine(cfg, model, total_steps, ds_cfg, mpu=par.mpu)
    except OpBuildError as e:
        raise TrainError(str(e)) from None
    module = engine.module
    batches = TokenBatches(data.train, batch_size=cfg.train.micro_batch_size,
                           seq_len=cfg.train.seq_len, extra_tokens=cfg.mtp.depth,
                           seed=cfg.train.seed, rank=dp_rank, world_size=dp)

    counts = count_params(cfg)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * dp * cfg.train.seq_len
    planned_epochs = epochs_of(total_steps * tokens_per_step, len(data.train))
    if is0 and planned_epochs > 1.0:
        # one line: repeated data bends the loss curve (Muennighoff et al. 2023)
        print(f"warning: {cfg.name} will train {total_steps * tokens_per_step:,} tokens = "
              f"{planned_epochs:.2f} epochs of the train split of {cfg.data.corpus!r} "
              f"({len(data.train):,} tokens); repeated data changes the loss curve",
              file=sys.stderr)
    fpt = counts.flops_per_token_train
    counters = {"step": 0, "tokens": 0, "flops": 0.0, "train_seconds": 0.0}

    metrics = MetricsLog(run_dir, enabled=is0, tensorboard=cfg.train.tensorboard)
    if latest is not None:
        # every rank loads its shard (the whole model when not model parallel)
        try:
            model_sd = ckpt.load_file(latest / par.shard_file())
            st = ckpt.load_file(latest / ckpt.rank_filename(rank))
        except ckpt.CheckpointError as e:
            raise TrainError(str(e)) from None
        module.load_state_dict(model_sd)
        load_optimizer_state(engine.optimizer, st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        batches.load_state_dict(st["data"])
        ckpt.set_rng_state(st["rng"])
        counters.update(st["counters"])
        # DeepSpeed's own step counters (used for its accumulation boundary bookkeeping)
        engine.global_steps = counters["step"]
        engine.global_samples = counters["step"] * cfg.train.micro_batch_size * cfg.train.grad_accum * dp
        engine.micro_steps = counters["step"] * cfg.train.grad_accum
        metrics.truncate_after(counters["step"])
    elif is0 and metrics.path.exists():
        metrics.path.unlink()  # a fresh run in a directory without checkpoints

    if cfg.train.peak_flops is not None:
        peak, peak_src = cfg.train.peak_flops, "config"
    else:
        peak = measure_matmul_peak(dev, torch.bfloat16 if precision == "bf16" else torch.float32)
        peak, peak_src = float(_broadcast(peak)), f"measured {precision} matmul"

    # ---------------- loop
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=counters["step"], disable=not (progress and is0),
               dynamic_ncols=True, desc=cfg.name)
    depth = cfg.mtp.depth
    status, message, exit_code = "done", "", 0
    last_eval: Optional[dict] = None
    last_eval_step = -1
    if latest is not None:
        # An eval row already logged at the checkpoint step (e.g. a finished run resumed)
        # counts as done: re-running it would duplicate the row. Rank 0 owns the file.
        found = None
        if is0:
            found = next((r for r in read_rows(metrics.path)
                          if r.get("kind") == "eval" and r.get("step") == counters["step"]), None)
        found = _broadcast(found)
        if found is not None:
            last_eval, last_eval_step = found, counters["step"]
    last_ckpt_step = counters["step"] if latest is not None else -1
    interval_tokens, interval_time = 0, 0.0
    module.train()

    def do_eval():
        nonlocal last_eval, last_eval_step
        row = evaluate(module, data, cfg, dp_rank, dp, dev, dp_group,
                       collective_forward=par.topo.ep > 1)
        row = {"kind": "eval", "step": counters["step"], "tokens": counters["tokens"], **row}
        metrics.write(row)
        last_eval, last_eval_step = row, counters["step"]
        if is0 and progress:
            bar.write(f"step {counters['step']}: eval lm_loss {row['lm_loss']:.4f}")

    def do_ckpt():
        try:
            _save()
        except ckpt.CheckpointWriteError as e:  # disk full: stop, the last good one is kept
            raise TrainError(str(e)) from None

    def _save():
        nonlocal last_ckpt_step
        ckpt.save_checkpoint(
            run_dir, counters["step"], _rank_state(engine, scheduler, batches, counters),
            model_state=module.state_dict() if par.writes_model else None,
            model_file=par.shard_file(), model_files=par.all_shard_files(),
            meta={"tokens": counters["tokens"], "flops": counters["flops"],
                  "parallel": par.describe(),
                  "data_fingerprint": data.fingerprint,
                  "config_name": cfg.name, "zero_stage": cfg.train.zero_stage,
                  "precision": precision, "saved_utc": datetime.now(timezone.utc).isoformat()},
            rank=rank, world_size=world, barrier=_barrier, any_failed=_any_rank)
        last_ckpt_step = counters["step"]

    if counters["step"] == 0 and cfg.train.eval_at_start:
        do_eval()  # the untrained baseline: the curve starts at ln(V)-ish

    while counters["step"] < total_steps:
        t0 = time.perf_counter()
        step = counters["step"]
        lam = cfg.mtp.weight_at(step / total_steps)
        # local sums over micro-batches: loss, lm, mtp_1..D, balance, per-kind balance
        acc = torch.zeros(3 + depth + 3, dtype=torch.float64)
        for micro in range(cfg.train.grad_accum):
            xb = next(batches).to(dev)
            out = engine(xb, mtp_weight=lam)
            loss = out["loss"]
            engine.backward(loss)
            acc[0] += float(loss.detach())
            acc[1] += float(out["lm_loss"].detach())
            for k, l in enumerate(out["mtp_losses"]):
                acc[2 + k] += float(l.detach())
            acc[2 + depth] += float(out["balance_loss"].detach())
            for l in module.moe_layers():
                for j, key in enumerate(("seq_aux", "switch_aux", "z_loss")):
                    acc[3 + depth + j] += l.last_losses.get(key, 0.0)
            if micro < cfg.train.grad_accum - 1:
                engine.step()  # off-boundary: DeepSpeed only advances its micro-step count
        assert engine.is_gradient_accumulation_boundary()
        # mean over micro-batches and ranks; a NaN on any rank reaches every rank
        acc /= cfg.train.grad_accum
        all_reduce_sum(acc, dp_group)
        acc /= dp
        names = ["loss", "lm_loss"] + [f"mtp_loss_{k + 1}" for k in range(depth)] + ["balance_loss"]
        bad = [f"{n}={acc[i].item()}" for i, n in enumerate(names)
               if not math.isfinite(acc[i].item())]
        if bad:
            good = ckpt.latest_checkpoint(run_dir)
            message = (f"non-finite loss at step {step + 1}: {', '.join(bad)}; stopped without "
                       f"applying the update. Last good checkpoint: "
                       f"{good if good is not None else 'none (no checkpoint was written yet)'}")
            status, exit_code = "diverged", EXIT_DIVERGED
            break

        grad_norm = None
        if own_clip:
            # reduced gradients -> exact norm over all TP/EP shards, clipped here
            grad_norm = par.clip_grad_norm_(module, cfg.train.grad_clip)
        elif cfg.train.zero_stage == 0 and precision == "fp32":
            # DeepSpeed clips fp32/ZeRO-0 grads without recording the norm; measure it on
            # the already all-reduced grads (identical on every rank).
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

        step_counts: list[torch.Tensor] = []

        def reduce_and_record(t: torch.Tensor) -> torch.Tensor:
            t = all_reduce_sum(t, dp_group)
            step_counts.append(t.clone())
            return t

        lr = scheduler.get_last_lr()[0]
        module.update_expert_bias(all_reduce=reduce_and_record)
        engine.step()
        if grad_norm is None:
            gn = engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")

        counters["step"] += 1
        counters["tokens"] += tokens_per_step
        counters["flops"] += tokens_per_step * fpt
        dt = time.perf_counter() - t0
        counters["train_seconds"] += dt
        interval_tokens += tokens_per_step
        interval_time += dt
        bar.update(1)

        s = counters["step"]
        if s % cfg.train.log_every == 0 or s == total_steps:
            maxvio = []
            if step_counts:
                sizes = [l.n_experts for l in module.moe_layers()]
                maxvio = [max_violation(c) for c in torch.split(step_counts[0], sizes)]
            tps = interval_tokens / max(interval_time, 1e-9)
            row = {"kind": "train", "step": s, "tokens": counters["tokens"],
                   "flops": counters["flops"], "lr": lr, "mtp_weight": lam}
            for i, n in enumerate(names):
                row[n] = acc[i].item()
            for j, key in enumerate(("seq_aux", "switch_aux", "z_loss")):
                if acc[3 + depth + j].item() != 0.0:
                    row[key] = acc[3 + depth + j].item()
            row.update({"grad_norm": grad_norm, "tokens_per_s": tps, "flops_per_s": tps * fpt,
                        "mfu": tps * fpt / peak, "maxvio": maxvio})
            metrics.write(row)
            bar.set_postfix(loss=f"{row['lm_loss']:.3f}", tok_s=f"{tps:,.0f}")
            interval_tokens, interval_time = 0, 0.0
        if s % cfg.train.eval_every == 0 and s != total_steps:
            do_eval()
        if s % cfg.train.ckpt_every == 0 and s != total_steps:
            do_ckpt()
    bar.close()

    if status == "done":
        if last_eval_step != counters["step"]:
            do_eval()
        if last_ckpt_step != counters["step"]:
            do_ckpt()

    summary = None
    if is0:
        wall = time.perf_counter() - t_start
        train_s = counters["train_seconds"]
        summary = {
            "name": cfg.name, "status": status, "message": message,
            "config_fingerprint": config_fingerprint(cfg),
            "run_dir": str(run_dir), "world_size": world, "parallel": par.describe(),
            "device": dev, "precision": precision,
            "cpu_malloc": malloc_mode() if dev == "cpu" else None,
            "zero_stage": cfg.train.zero_stage,
            "params": counts.as_dict(),
            "total_params": counts.total, "active_params": counts.active,
            "total_params_nonembed": counts.total_nonembed,
            "active_params_nonembed": counts.active_nonembed,
            "flops_per_token_train": fpt,
            "steps": counters["step"], "planned_steps": total_steps, "stop_rule": stop_rule,
            "tokens": counters["tokens"], "total_flops": counters["flops"],
            # passes over the train split: tokens trained / train tokens (> 1: repeated data)
            "epochs": epochs_of(counters["tokens"], len(data.train)),
            "planned_epochs": planned_epochs,
            "final_eval_loss": last_eval["lm_loss"] if last_eval else None,
            "final_eval": last_eval,
            "maxvio_global": last_eval["maxvio_global"] if last_eval else None,
            "wall_time_s": wall,
            "train_time_s": train_s,
            "tokens_per_s": counters["tokens"] / train_s if train_s > 0 else None,
            "peak_flops": peak, "peak_flops_source": peak_src,
            "mfu": (counters["flops"] / train_s / peak) if train_s > 0 else None,
            "data": {"corpus": cfg.data.corpus, "tokenizer": cfg.data.tokenizer,
                     "fingerprint": data.fingerprint,
                     "train_tokens": len(data.train), "val_tokens": len(data.val)},
            "env": _env_info(),
        }
        # atomic: the ladder runner treats a run as finished iff summary.json says "done"
        ckpt.write_text_atomic(run_dir / "summary.json",
                               json.dumps(_json_safe(summary), indent=1) + "\n")
        metrics.close()
        try:
            from .plots import plot_run

            plot_run(run_dir)
        except Exception as e:  # a plotting problem must not fail a finished run
            print(f"warning: could not plot {run_dir}: {e}", file=sys.stderr)
    summary = _broadcast(summary)
    _barrier()
    return RunResult(run_dir=run_dir, summary=summary, exit_code=exit_code)


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v
