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

Structure: :class:`Trainer` names the steps (setup, claim_run_dir, find_resume_point,
build, restore, train_step / log_step / evaluate / checkpoint, finish); :func:`train` runs
them and releases the run directory.

Exactness: with one CPU process a resumed run continues bit-for-bit (model, AdamW state,
scheduler, expert biases, data position and RNG states are all restored); see
``moe/runs/checkpoint.py`` for the format.
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
from tqdm import tqdm

from ..accounting import count_params
from ..config import (FINGERPRINT_IGNORES, Config, changed_fields, config_fingerprint,
                      flatten)
from ..cpu_malloc import keep_freed_memory, malloc_mode
from ..model import build_model
from ..moe_layer.router import max_violation
from ..runs import atomic_write
from ..runs import checkpoint as ckpt
from ..runs.lock import RunDirError, lock_dir
from ..runs.process import EXIT_STOPPED, StopSignals
from .opbuild import OpBuildError
from .engine import (all_reduce_sum, build_engine, deepspeed_config, device_type,
                     init_process_group, load_optimizer_state, optimizer_state,
                     resolve_precision)
from .metrics import MetricsLog, matmul_peak, read_rows

EXIT_DIVERGED = 3

# Fields that may differ between a run's saved config and the one it is resumed with:
# they change what is logged/saved, never the trajectory. Those the result fingerprint
# ignores (but data.on_bad_record: a resumed run reads its data again under the saved
# rule), plus the eval size (the reported loss, not the weights) and the collective timeout.
RESUME_MAY_CHANGE = ((FINGERPRINT_IGNORES - {"data.on_bad_record"})
                     | {"train.eval_batches", "parallel.timeout_s"})


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


def _check_resume_config(cfg: Config, run_dir: Path) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise TrainError(f"cannot resume: {saved_path} is missing")
    saved = flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = flatten(yaml.safe_load(cfg.to_yaml()))
    diff, shown = changed_fields(saved, now, 4, RESUME_MAY_CHANGE)
    if diff:
        raise TrainError(f"cannot resume {run_dir}: the config differs from the saved one in "
                         f"{shown}; an exact resume needs the same config (only "
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


def prepare(cfg: Config, progress: bool = True):
    """Tokenised train/val splits for ``cfg`` (cached), checked against the run's shapes.

    Collective under torchrun: rank 0 builds the cache first (the others then load it), and
    a DataError on rank 0 is re-raised on every rank so all exit 2 together, before any
    compute. Raises :class:`moe.data.DataError`.
    """
    from ..data import DataError, config_data, num_samples

    rank = dist.get_rank() if dist.is_initialized() else 0
    extra = cfg.mtp.depth

    def build():
        data = config_data(cfg, progress=progress and rank == 0)
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


def _load_initial_weights(model, path: str) -> None:
    """train.init_from: weights from a model.pt, a checkpoint directory or a run directory
    (its newest usable checkpoint, shards merged, or its model.pt)."""
    from ..runs.shards import load_consolidated

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


class _Diverged(Exception):
    """A non-finite loss: the step stopped before its update (the message says where)."""


_BALANCE_KINDS = ("seq_aux", "switch_aux", "z_loss")


@dataclass
class StepStats:
    """One optimizer step, as :meth:`Trainer.train_step` returns it."""

    acc: torch.Tensor  # means over micro-batches and DP ranks, in Trainer.loss_names order,
    #                    then the per-kind balance losses (_BALANCE_KINDS)
    lr: float  # the LR the step used
    mtp_weight: float
    grad_norm: float
    counts: Optional[torch.Tensor]  # the step's expert counts summed over DP ranks, all
    #                                 MoE layers concatenated (None: no MoE layer)


class Trainer:
    """One run of :func:`train`, in named steps (after torchtitan's ``Trainer``,
    torchtitan/train.py). :meth:`run` calls them in this order:

    - :meth:`setup`: process group, parallel plan, memory guard;
    - :meth:`claim_run_dir`: choose RUN_DIR, hold its lock, protect the user's config file;
    - :meth:`find_resume_point`: the newest usable checkpoint (falling back past damaged
      ones) and the checks that make an exact resume possible;
    - :meth:`build`: data, model, DeepSpeed engine, loader, metrics, MFU denominator;
    - :meth:`restore`: model, optimizer, scheduler, loader and RNG state from the checkpoint;
    - :meth:`train_loop`: :meth:`train_step` per optimizer step, then :meth:`log_step`,
      :meth:`evaluate` and :meth:`checkpoint` at their intervals and at the end;
    - :meth:`finish`: summary.json and the plot.

    Run state lives on the instance (``counters``, ``last_eval``, ...), not in closures.
    Collective steps are called on every rank in the same order; rank 0 alone decides
    what is shared (run directory, checkpoint choice, precision) and broadcasts it.
    """

    def __init__(self, cfg: Config, *, progress: bool = True,
                 config_path: Optional[str | os.PathLike] = None):
        self.t_start = time.perf_counter()
        self.cfg = cfg
        self.progress = progress
        self.config_path = config_path
        self.locks: list = []
        self.latest: Optional[Path] = None  # the checkpoint this run resumes from
        self.latest_meta: dict = {}  # its meta.json
        self.counters = {"step": 0, "tokens": 0, "flops": 0.0, "train_seconds": 0.0}
        self.last_eval: Optional[dict] = None
        self.last_eval_step = -1
        self.last_ckpt_step = -1
        self.status, self.message, self.exit_code = "done", "", 0
        self.stop = StopSignals()  # SIGTERM/SIGINT/SIGUSR1: checkpoint and stop (run())
        self.bar = tqdm(disable=True)  # train_loop's bar; steps driven by hand show none
        self._interval_tokens, self._interval_time = 0, 0.0

    # ---------------- the whole run

    def run(self, run_dir=None, *, resume: bool = False, data=None) -> RunResult:
        with self.stop:  # a stop signal from here on is honoured between steps
            self.setup()
            self.claim_run_dir(run_dir, resume)
            self.find_resume_point(resume)
            self.build(data)
            self.restore()
            self.train_loop()
            return self.finish()

    def close(self) -> None:
        """Release the run directory (also after an error)."""
        for lock in self.locks:
            lock.release()
        self.locks.clear()

    # ---------------- before any compute

    def setup(self) -> None:
        """Validate, join the process group, plan TP/EP/DP, and refuse a model that cannot
        fit the machine (rank 0 decides from the config's accounting)."""
        from ..parallel.plan import plan_parallel
        from .memguard import check_fits

        cfg = self.cfg
        cfg.validate()
        self.rank, self.world = init_process_group(cfg.parallel.timeout_s)
        # ConfigError naming parallel.tp/ep if the world does not factor
        self.par = plan_parallel(cfg.parallel)
        self.dev = device_type()
        self.is0 = self.rank == 0
        if self.dev == "cpu" and cfg.train.cpu_keep_freed_memory:
            keep_freed_memory()
        err = _broadcast(check_fits(cfg, self.dev, self.world, self.par.topo.tp)
                         if self.is0 else None)
        if err is not None:
            raise TrainError(err)

    def claim_run_dir(self, run_dir, resume: bool) -> None:
        """Rank 0 chooses the run directory (``runs/<name>-<stamp>``, or with ``resume`` the
        newest resumable one), takes ``RUN_DIR/.lock`` until :meth:`close`, and refuses an
        ``--out`` whose outputs would overwrite the config file; every rank gets the same
        directory or the same error."""
        cfg = self.cfg
        if self.is0:
            if run_dir is None:
                run_dir = find_resumable_run(cfg) if resume else default_run_dir(cfg)
                if run_dir is None:
                    run_dir = "__none__"
            run_dir = str(run_dir)
        run_dir = _broadcast(run_dir)
        if run_dir == "__none__":
            raise TrainError(f"--resume: no run of {cfg.name!r} with a checkpoint under "
                             "runs/; pass --out RUN_DIR")
        self.run_dir = Path(run_dir)
        err = None
        if self.is0:
            try:
                self.locks.append(lock_dir(self.run_dir))
                _check_config_source(cfg, self.run_dir, self.config_path)
            except (RunDirError, TrainError) as e:
                err = str(e)
        err = _broadcast(err)
        if err is not None:
            raise TrainError(err)

    def find_resume_point(self, resume: bool) -> None:
        """With ``resume``: rank 0 picks the newest usable checkpoint, warning about each
        damaged newer one it skips; the config and the world size must match the saved
        ones. Without: refuse a directory that already holds checkpoints."""
        run_dir = self.run_dir
        if not resume:
            if (run_dir / ckpt.CKPT_DIR / ckpt.LATEST).exists():
                raise TrainError(f"{run_dir} already holds a run with checkpoints; pass "
                                 "--resume to continue it or --out NEW_DIR for a new run")
            return
        found = None
        if self.is0:
            path, problems = ckpt.usable_checkpoint(run_dir)
            found = (str(path) if path is not None else None, problems)
        path, problems = _broadcast(found)
        if path is None and not problems:
            raise TrainError(f"cannot resume: {run_dir} has no checkpoint "
                             f"({run_dir / ckpt.CKPT_DIR / ckpt.LATEST} is missing)")
        if path is None:
            raise TrainError(f"cannot resume: no usable checkpoint in "
                             f"{run_dir / ckpt.CKPT_DIR}: {'; '.join(problems)}")
        latest = Path(path)
        if self.is0:
            for problem in problems:
                print(f"warning: {problem}; resuming from {latest}", file=sys.stderr)
        _check_resume_config(self.cfg, run_dir)
        meta = self.latest_meta = ckpt.read_meta(latest)
        if meta.get("world_size") != self.world:
            raise TrainError(f"cannot resume {latest}: it was written by "
                             f"{meta.get('world_size')} ranks, this run has {self.world} (the "
                             "optimizer/loader state is per rank); relaunch with the same "
                             "number of processes")
        self.latest = latest

    # ---------------- build

    def build(self, data=None) -> None:
        """Data (prepared before any model compute), then config.yaml, the model (same full
        init on every rank, then this rank's TP/EP shard), the DeepSpeed engine, the loader,
        the step plan, the metrics log and the MFU denominator."""
        from ..data import TokenBatches

        cfg, par, dev, is0 = self.cfg, self.par, self.dev, self.is0
        if data is None:
            data = prepare(cfg, progress=self.progress)
        if self.latest is not None:
            saved_fp = self.latest_meta.get("data_fingerprint")
            if saved_fp is not None and saved_fp != data.fingerprint:
                raise TrainError(f"cannot resume {self.latest}: the data changed since it was "
                                 f"written (fingerprint {saved_fp[:12]} -> "
                                 f"{data.fingerprint[:12]}); the loader position would point "
                                 "into different tokens")
        self.data = data
        if is0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        _barrier()

        torch.manual_seed(cfg.train.seed)
        full = build_model(cfg)
        if cfg.train.init_from and self.latest is None:
            _load_initial_weights(full, cfg.train.init_from)
        model = par.parallelize(full).to(dev)
        self.total_steps, self.stop_rule = plan_total_steps(cfg, par.dp)
        # one precision for every rank: `auto` on CPU is a timing probe, decided on rank 0
        self.precision = _broadcast(resolve_precision(cfg, dev) if is0 else None)
        ds_cfg = deepspeed_config(cfg, par.dp, dev, self.precision)
        # ZeRO 0 clips here, not in DeepSpeed: model-parallel shards need the exact norm
        # over all of them (par.clip_grad_norm_), and fp32 would otherwise measure the norm
        # twice (DeepSpeed's clip does not return it; its per-parameter Python loop cost
        # ~1 ms a step at the CPU ladder's sizes, a few % of a step)
        self.own_clip = cfg.train.zero_stage == 0 and (par.model_parallel
                                                       or self.precision == "fp32")
        if self.own_clip:
            ds_cfg["gradient_clipping"] = 0.0  # exact clipping over shards: par.clip_grad_norm_
        if is0:
            (self.run_dir / "deepspeed.json").write_text(json.dumps(ds_cfg, indent=2) + "\n")
        try:
            self.engine, _, self.scheduler = build_engine(cfg, model, self.total_steps, ds_cfg,
                                                          mpu=par.mpu)
        except OpBuildError as e:
            raise TrainError(str(e)) from None
        self.module = self.engine.module
        if self.world == 1 and cfg.train.zero_stage == 0:
            # one process: DeepSpeed's gradient all-reduce flattens every gradient, reduces
            # it over a group of one and copies it back (~1 ms a step at the CPU ladder's
            # sizes, a pure copy: the values do not change)
            self.engine.enable_backward_allreduce = False
        self.batches = TokenBatches(data.train, batch_size=cfg.train.micro_batch_size,
                                    seq_len=cfg.train.seq_len, extra_tokens=cfg.mtp.depth,
                                    seed=cfg.train.seed, rank=par.dp_rank, world_size=par.dp)

        self.counts = count_params(cfg)
        self.fpt = self.counts.flops_per_token_train
        self.tokens_per_step = (cfg.train.micro_batch_size * cfg.train.grad_accum * par.dp
                                * cfg.train.seq_len)
        planned_tokens = self.total_steps * self.tokens_per_step
        self.planned_epochs = epochs_of(planned_tokens, len(data.train))
        if is0 and self.planned_epochs > 1.0:
            # one line: repeated data bends the loss curve (Muennighoff et al. 2023)
            print(f"warning: {cfg.name} will train {planned_tokens:,} tokens = "
                  f"{self.planned_epochs:.2f} epochs of the train split of "
                  f"{cfg.data.corpus!r} ({len(data.train):,} tokens); repeated data changes "
                  "the loss curve", file=sys.stderr)
        self.loss_names = (["loss", "lm_loss"] + [f"mtp_loss_{k + 1}" for k in range(cfg.mtp.depth)]
                           + ["balance_loss"])

        self.metrics = MetricsLog(self.run_dir, enabled=is0, tensorboard=cfg.train.tensorboard)
        if self.latest is None and is0 and self.metrics.path.exists():
            self.metrics.path.unlink()  # a fresh run in a directory without checkpoints

        if cfg.train.peak_flops is not None:
            self.peak, self.peak_src = cfg.train.peak_flops, "config"
        else:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self.peak, self.peak_src = _broadcast(matmul_peak(dev, dtype))

    def restore(self) -> None:
        """Every rank loads its shard (the whole model when not model parallel) and its own
        optimizer, scheduler, loader and RNG state; metrics rows after the checkpoint step
        are dropped, and an eval row logged at that step counts as done."""
        if self.latest is None:
            return
        cfg, counters = self.cfg, self.counters
        try:
            model_sd = ckpt.load_file(self.latest / self.par.shard_file())
            st = ckpt.load_file(self.latest / ckpt.rank_filename(self.rank))
        except ckpt.CheckpointError as e:
            raise TrainError(str(e)) from None
        self.module.load_state_dict(model_sd)
        load_optimizer_state(self.engine.optimizer, st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.batches.load_state_dict(st["data"])
        ckpt.set_rng_state(st["rng"])
        counters.update(st["counters"])
        # DeepSpeed's own step counters (used for its accumulation boundary bookkeeping)
        engine = self.engine
        engine.global_steps = counters["step"]
        engine.global_samples = (counters["step"] * cfg.train.micro_batch_size
                                 * cfg.train.grad_accum * self.par.dp)
        engine.micro_steps = counters["step"] * cfg.train.grad_accum
        self.metrics.truncate_after(counters["step"])
        # An eval row already logged at the checkpoint step (e.g. a finished run resumed)
        # counts as done: re-running it would duplicate the row. Rank 0 owns the file.
        found = None
        if self.is0:
            found = next((r for r in read_rows(self.metrics.path)
                          if r.get("kind") == "eval" and r.get("step") == counters["step"]),
                         None)
        found = _broadcast(found)
        if found is not None:
            self.last_eval, self.last_eval_step = found, counters["step"]
        self.last_ckpt_step = counters["step"]

    # ---------------- training

    def train_loop(self) -> None:
        """Steps until ``total_steps`` or a non-finite loss; a finished run ends with an
        evaluation and a checkpoint at its last step (unless already written)."""
        cfg, t = self.cfg, self.cfg.train
        self.bar = tqdm(total=self.total_steps, initial=self.counters["step"],
                        disable=not (self.progress and self.is0), dynamic_ncols=True,
                        desc=cfg.name)
        self.module.train()
        if self.counters["step"] == 0 and t.eval_at_start:
            self.evaluate()  # the untrained baseline: the curve starts at ln(V)-ish
        while self.counters["step"] < self.total_steps:
            if self.stop_requested():
                break
            try:
                stats = self.train_step()
            except _Diverged as e:
                self.status, self.message, self.exit_code = "diverged", str(e), EXIT_DIVERGED
                break
            s = self.counters["step"]
            if s % t.log_every == 0 or s == self.total_steps:
                self.log_step(stats)
            if s % t.eval_every == 0 and s != self.total_steps:
                self.evaluate()
            if s % t.ckpt_every == 0 and s != self.total_steps:
                self.checkpoint()
        self.bar.close()
        if self.status == "done":
            if self.last_eval_step != self.counters["step"]:
                self.evaluate()
        if self.status in ("done", "stopped") and self.last_ckpt_step != self.counters["step"]:
            self.checkpoint()

    def stop_requested(self) -> bool:
        """True on every rank once any rank received a stop signal (then the run is marked
        ``stopped``, exit code EXIT_STOPPED; :meth:`train_loop` checkpoints at this step)."""
        if not (_any_rank(self.stop.requested) if self.world > 1 else self.stop.requested):
            return False
        step = self.counters["step"]
        self.status, self.exit_code = "stopped", EXIT_STOPPED
        self.message = (f"stopped by {self.stop.name or 'a signal on another rank'} at step "
                        f"{step} of {self.total_steps}, with a checkpoint at that step; "
                        "--resume continues it exactly")
        return True

    def train_step(self) -> StepStats:
        """One optimizer step: grad_accum micro-batches (forward with the MTP weight of this
        point of training, backward), the step's losses averaged over DP ranks and checked
        for NaN/inf on every rank alike (raises :class:`_Diverged` before any update), the
        gradient norm, the expert-bias update from the DP-summed counts, ``engine.step()``."""
        cfg, engine, module, par = self.cfg, self.engine, self.module, self.par
        t0 = time.perf_counter()
        step = self.counters["step"]
        depth = cfg.mtp.depth
        lam = cfg.mtp.weight_at(step / self.total_steps)
        # local sums over micro-batches: loss, lm, mtp_1..D, balance (self.loss_names),
        # then the per-kind balance losses
        nl = len(self.loss_names)
        acc = torch.zeros(nl + len(_BALANCE_KINDS), dtype=torch.float64)
        for micro in range(cfg.train.grad_accum):
            xb = next(self.batches).to(self.dev)
            out = engine(xb, mtp_weight=lam)
            loss = out["loss"]
            engine.backward(loss)
            acc[0] += float(loss.detach())
            acc[1] += float(out["lm_loss"].detach())
            for k, l in enumerate(out["mtp_losses"]):
                acc[2 + k] += float(l.detach())
            acc[2 + depth] += float(out["balance_loss"].detach())
            for l in module.moe_layers():
                for j, key in enumerate(_BALANCE_KINDS):
                    acc[nl + j] += l.last_losses.get(key, 0.0)
            if micro < cfg.train.grad_accum - 1:
                engine.step()  # off-boundary: DeepSpeed only advances its micro-step count
        assert engine.is_gradient_accumulation_boundary()
        # mean over micro-batches and ranks; a NaN on any rank reaches every rank
        acc /= cfg.train.grad_accum
        all_reduce_sum(acc, par.dp_group)
        acc /= par.dp
        bad = [f"{n}={acc[i].item()}" for i, n in enumerate(self.loss_names)
               if not math.isfinite(acc[i].item())]
        if bad:
            good = ckpt.latest_checkpoint(self.run_dir)
            raise _Diverged(f"non-finite loss at step {step + 1}: {', '.join(bad)}; stopped "
                            f"without applying the update. Last good checkpoint: "
                            f"{good if good is not None else 'none (no checkpoint was written yet)'}")

        grad_norm = None
        if self.own_clip:
            # reduced gradients (identical on every DP rank) -> exact norm over all TP/EP
            # shards, clipped here by DeepSpeed's rule
            grad_norm = par.clip_grad_norm_(module, cfg.train.grad_clip)

        step_counts: list[torch.Tensor] = []

        def reduce_and_record(t: torch.Tensor) -> torch.Tensor:
            t = all_reduce_sum(t, par.dp_group)
            step_counts.append(t.clone())
            return t

        lr = self.scheduler.get_last_lr()[0]
        module.update_expert_bias(all_reduce=reduce_and_record)
        engine.step()
        if grad_norm is None:
            gn = engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")

        c = self.counters
        c["step"] += 1
        c["tokens"] += self.tokens_per_step
        c["flops"] += self.tokens_per_step * self.fpt
        dt = time.perf_counter() - t0
        c["train_seconds"] += dt
        self._interval_tokens += self.tokens_per_step
        self._interval_time += dt
        self.bar.update(1)
        return StepStats(acc=acc, lr=lr, mtp_weight=lam, grad_norm=grad_norm,
                         counts=step_counts[0] if step_counts else None)

    def log_step(self, stats: StepStats) -> None:
        """The step's metrics row: losses, LR, grad norm, throughput and MFU over the steps
        since the last row, MaxVio of this step's counts per MoE layer."""
        nl = len(self.loss_names)
        maxvio = []
        if stats.counts is not None:
            sizes = [l.n_experts for l in self.module.moe_layers()]
            maxvio = [max_violation(c) for c in torch.split(stats.counts, sizes)]
        tps = self._interval_tokens / max(self._interval_time, 1e-9)
        c = self.counters
        row = {"kind": "train", "step": c["step"], "tokens": c["tokens"], "flops": c["flops"],
               "lr": stats.lr, "mtp_weight": stats.mtp_weight}
        for i, n in enumerate(self.loss_names):
            row[n] = stats.acc[i].item()
        for j, key in enumerate(_BALANCE_KINDS):
            if stats.acc[nl + j].item() != 0.0:
                row[key] = stats.acc[nl + j].item()
        row.update({"grad_norm": stats.grad_norm, "tokens_per_s": tps,
                    "flops_per_s": tps * self.fpt, "mfu": tps * self.fpt / self.peak,
                    "maxvio": maxvio})
        self.metrics.write(row)
        self.bar.set_postfix(loss=f"{row['lm_loss']:.3f}", tok_s=f"{tps:,.0f}")
        self._interval_tokens, self._interval_time = 0, 0.0

    def evaluate(self) -> dict:
        """Held-out losses and MaxVio_global at the current step (see :func:`evaluate`),
        logged as an eval row."""
        par = self.par
        row = evaluate(self.module, self.data, self.cfg, par.dp_rank, par.dp, self.dev,
                       par.dp_group, collective_forward=par.topo.ep > 1)
        c = self.counters
        row = {"kind": "eval", "step": c["step"], "tokens": c["tokens"], **row}
        self.metrics.write(row)
        self.last_eval, self.last_eval_step = row, c["step"]
        if self.is0 and self.progress:  # (a closed bar is disabled: the final eval's line)
            self.bar.write(f"step {c['step']}: eval lm_loss {row['lm_loss']:.4f}")
        return row

    def checkpoint(self) -> None:
        """A complete checkpoint at the current step (collective; atomic, see
        moe/runs/checkpoint.py). A failed write (disk full) stops the run with a
        TrainError; the last good checkpoint stays ``latest``."""
        c = self.counters
        par = self.par
        try:
            ckpt.save_checkpoint(
                self.run_dir, c["step"],
                _rank_state(self.engine, self.scheduler, self.batches, c),
                model_state=self.module.state_dict() if par.writes_model else None,
                model_file=par.shard_file(), model_files=par.all_shard_files(),
                meta={"tokens": c["tokens"], "flops": c["flops"],
                      "parallel": par.describe(),
                      "data_fingerprint": self.data.fingerprint,
                      "config_name": self.cfg.name, "zero_stage": self.cfg.train.zero_stage,
                      "precision": self.precision,
                      "saved_utc": datetime.now(timezone.utc).isoformat()},
                rank=self.rank, world_size=self.world, barrier=_barrier, any_failed=_any_rank)
        except ckpt.CheckpointWriteError as e:  # disk full: stop, the last good one is kept
            raise TrainError(str(e)) from None
        self.last_ckpt_step = c["step"]

    # ---------------- the end

    def finish(self) -> RunResult:
        """Rank 0 writes summary.json (atomically: the ladder runner treats a run as finished
        iff it says "done") and the run's plot; every rank returns the same summary."""
        summary = None
        if self.is0:
            summary = self._summary()
            atomic_write(self.run_dir / "summary.json",
                         json.dumps(_json_safe(summary), indent=1) + "\n")
            self.metrics.close()
            try:
                from .plots import plot_run

                plot_run(self.run_dir)
            except Exception as e:  # a plotting problem must not fail a finished run
                print(f"warning: could not plot {self.run_dir}: {e}", file=sys.stderr)
        summary = _broadcast(summary)
        _barrier()
        return RunResult(run_dir=self.run_dir, summary=summary, exit_code=self.exit_code)

    def _summary(self) -> dict:
        cfg, c, counts, data = self.cfg, self.counters, self.counts, self.data
        wall = time.perf_counter() - self.t_start
        train_s = c["train_seconds"]
        last_eval = self.last_eval
        return {
            "name": cfg.name, "status": self.status, "message": self.message,
            "config_fingerprint": config_fingerprint(cfg),
            "run_dir": str(self.run_dir), "world_size": self.world,
            "parallel": self.par.describe(),
            "device": self.dev, "precision": self.precision,
            "cpu_malloc": malloc_mode() if self.dev == "cpu" else None,
            "zero_stage": cfg.train.zero_stage,
            "params": counts.as_dict(),
            "total_params": counts.total, "active_params": counts.active,
            "total_params_nonembed": counts.total_nonembed,
            "active_params_nonembed": counts.active_nonembed,
            "flops_per_token_train": self.fpt,
            "steps": c["step"], "planned_steps": self.total_steps, "stop_rule": self.stop_rule,
            "tokens": c["tokens"], "total_flops": c["flops"],
            # passes over the train split: tokens trained / train tokens (> 1: repeated data)
            "epochs": epochs_of(c["tokens"], len(data.train)),
            "planned_epochs": self.planned_epochs,
            "final_eval_loss": last_eval["lm_loss"] if last_eval else None,
            "final_eval": last_eval,
            "maxvio_global": last_eval["maxvio_global"] if last_eval else None,
            "wall_time_s": wall,
            "train_time_s": train_s,
            "tokens_per_s": c["tokens"] / train_s if train_s > 0 else None,
            "peak_flops": self.peak, "peak_flops_source": self.peak_src,
            "mfu": (c["flops"] / train_s / self.peak) if train_s > 0 else None,
            "data": {"corpus": cfg.data.corpus, "tokenizer": cfg.data.tokenizer,
                     "fingerprint": data.fingerprint,
                     "train_tokens": len(data.train), "val_tokens": len(data.val)},
            "env": _env_info(),
        }


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
    ``RUN_DIR/.lock``, see :mod:`moe.runs.lock`): a second run on it is refused (TrainError
    naming the holder's pid). ``config_path``: the YAML the config was read from; it is
    never overwritten by the resolved ``RUN_DIR/config.yaml``. The steps are
    :class:`Trainer`'s.
    """
    trainer = Trainer(cfg, progress=progress, config_path=config_path)
    try:
        return trainer.run(run_dir, resume=resume, data=data)
    finally:
        trainer.close()


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v
