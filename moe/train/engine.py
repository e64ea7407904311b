"""DeepSpeed engine setup, generated from :class:`moe.config.Config`.

The DeepSpeed JSON is never kept by hand: :func:`deepspeed_config` derives every value
(batch sizes, ZeRO stage, precision, clipping, AdamW hyper-parameters) from the config, and
the run directory stores exactly the dict that was handed to ``deepspeed.initialize``.

The learning-rate schedule (linear warmup, then cosine to ``min_lr_ratio``) is a torch
``LambdaLR`` passed to DeepSpeed as a callable: DeepSpeed's own ``WarmupCosineLR`` starts
its warmup at lr = 0 on the first step and has no notion of our token/FLOP budgets, while
the lambda is computed from the same ``total_steps`` the loop stops at.

Process groups: under ``torchrun`` the usual env vars are set; a plain ``python``/CLI
process gets a one-rank gloo group on a free local port, so the same code path runs
in both cases.
"""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..parallel.topology import forget_groups, import_deepspeed


# --------------------------------------------------------------------------------------
# Device / precision
# --------------------------------------------------------------------------------------


def device_type() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


#: `train.precision: auto` picks bf16 mixed precision on a CPU only when a whole training
#: step (forward + backward) of the run's own model is this much faster in bf16: the
#: casts, the fp32 master weights and the rounding cost part of the gain, so a small edge
#: is not worth it.
CPU_BF16_MIN_SPEEDUP = 1.25

#: FLOPs of one probe step (forward + backward): ~0.1-0.2 s in fp32 on a 2-core box.
PROBE_STEP_FLOPS = 2e10


def _probe_config(cfg: Config) -> Config:
    """The run's model cut to one block of each kind (dense and, for a MoE model, one MoE
    block; no MTP): same widths, experts, micro-batch and sequence length, so the per-block
    cost ratio is the run's, at a fraction of the build and step time."""
    import copy

    p = copy.deepcopy(cfg)
    m = p.model
    moe = p.is_moe and m.n_layers > m.first_k_dense
    m.first_k_dense = min(m.first_k_dense, 1)
    m.n_layers = m.first_k_dense + 1 if moe else 1
    p.mtp.depth = 0
    # bounded cost: at most PROBE_STEP_FLOPS per step (a GPU-sized config probed on a CPU
    # gets fewer, shorter rows; its ratio is then that of smaller GEMMs, a lower bound)
    from ..accounting import count_params

    t = p.train
    fpt = count_params(p).flops_per_token_train
    tokens = max(64, min(t.micro_batch_size * t.seq_len, int(PROBE_STEP_FLOPS / fpt)))
    t.seq_len = min(t.seq_len, tokens)
    t.micro_batch_size = max(1, tokens // t.seq_len)
    return p


def _step_speedup(cfg: Config, repeats: int) -> float:
    """fp32 / bf16 step time of the (probe) config ``cfg``; see cpu_bf16_speedup."""
    import copy
    import time

    from ..model import build_model

    t = cfg.train
    g = torch.Generator().manual_seed(0)  # private: must not advance the global RNG
    # a new batch every step, as in training: the routing, and so the grouped GEMMs' group
    # sizes, change from step to step; on CPU bf16 torch._grouped_mm takes ~10x longer
    # with new group sizes than with repeated ones (measured: 7.1 vs 0.7 ms at
    # 8192x128x128, 16 experts; fp32 1.7 vs 1.8 ms), so a repeated batch hides its cost
    batches = torch.randint(0, cfg.model.vocab_size, (repeats + 1, t.micro_batch_size, t.seq_len),
                            generator=g)
    rng = torch.get_rng_state()
    try:
        fp32 = build_model(cfg)
    finally:
        torch.set_rng_state(rng)
    best = {}
    for name, model in (("fp32", fp32), ("bf16", copy.deepcopy(fp32).to(torch.bfloat16))):
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        # bf16 as DeepSpeed runs it: fp32 master weights, the step on them, copied back
        master = ([q.detach().float().clone().requires_grad_() for q in params]
                  if name == "bf16" else params)
        opt = torch.optim.AdamW(master, lr=1e-9, foreach=False)
        times = []
        for tokens in batches:  # the first is warm-up
            t0 = time.perf_counter()
            try:
                model(tokens)["loss"].backward()
            except RuntimeError:
                if name == "fp32":
                    raise
                # e.g. torch._grouped_mm on CPU needs 16-byte row strides: bf16 with a
                # d_model or expert width not a multiple of 8 cannot run at all
                return 0.0
            if master is not params:
                for m, q in zip(master, params):
                    m.grad = None if q.grad is None else q.grad.float()
            opt.step()
            if master is not params:
                with torch.no_grad():
                    for m, q in zip(master, params):
                        q.copy_(m)
            opt.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            # (the warm-up step may carry one-time kernel set-up: a wider margin there)
            if name == "bf16" and times[-1] > (20.0 if len(times) == 1 else 3.0) * best["fp32"]:
                # emulated bf16 (no native support: ~0.01-0.1x): one step says enough,
                # and more would cost seconds on a model whose fp32 step takes 0.1 s
                return best["fp32"] / times[-1]
        best[name] = min(times[1:])
    return best["fp32"] / best["bf16"]


#: cpu_bf16_speedup's results, per probe config (as JSON) and repeats, for this process
_SPEEDUPS: dict = {}


def cpu_bf16_speedup(cfg: Config, repeats: int = 3) -> float:
    """fp32 / bf16 time of one training step (forward + backward of a micro-batch, and an
    AdamW step on fp32 master weights copied back for bf16) of ``cfg``'s model cut to one
    block of each kind, on this CPU: > 1 where bf16 is faster; 0.0 where bf16 cannot run
    this model at all. (torch._grouped_mm on CPU needs rows of a multiple of 16 bytes; a
    bf16 MoE at d_model 20 used to fail there, and now runs the per-expert loop,
    moe.moe_layer.experts.grouped_mm_aligned, measured 0.29x of fp32's step on the tests'
    tiny model.)

    Measured on the run's own shapes and changing batches, not on a large matmul. On one
    of this workplace's AMD EPYC boxes with AVX512_BF16 (2026-11-28) a bf16 matmul ran
    3.3x faster than fp32 at 256^3 and at the CPU ladder's 2048x48x192, yet whole
    DeepSpeed runs ran at 0.76x (ladder d_model 48, dense), 0.43x (d 48, 8 experts) and
    0.82x (the README's tiny-moe) of fp32's tokens/s: bf16 grouped GEMMs on CPU are ~10x
    slower when the group sizes change between calls, as routing makes them do. This probe
    measured 0.69-0.73, 0.30-0.32 and 0.95 for those three, so picks fp32 for each (with
    one repeated batch it had said 1.2-1.7x for tiny-moe). On CPUs without native bf16
    torch emulates it (ratio ~0.01-0.1).
    Cached per model shape and process; ~0.1-1 s for small models, bounded by
    PROBE_STEP_FLOPS for large ones."""
    import dataclasses
    import json

    probe = _probe_config(cfg)
    key = (json.dumps(dataclasses.asdict(probe), sort_keys=True, default=str), repeats)
    if key not in _SPEEDUPS:
        _SPEEDUPS[key] = _step_speedup(probe, repeats)
    return _SPEEDUPS[key]


def resolve_precision(cfg: Config, device: Optional[str] = None) -> str:
    """``train.precision`` with ``auto`` resolved: bf16 on GPU; on CPU bf16 where a probe
    (`cpu_bf16_speedup`) shows a training step of this model >= CPU_BF16_MIN_SPEEDUP x
    faster in bf16, else fp32.

    The choice is recorded in summary.json (`precision`) and the checkpoint; a resume on a
    machine that resolves differently is refused by the optimizer-state check. Under
    several ranks the training loop resolves once on rank 0 and broadcasts. Set
    ``train.precision: fp32`` for bitwise-reproducible CPU runs across machines.
    """
    p = cfg.train.precision
    if p != "auto":
        return p
    if (device or device_type()) == "cuda":
        return "bf16"
    return "bf16" if cpu_bf16_speedup(cfg) >= CPU_BF16_MIN_SPEEDUP else "fp32"


# --------------------------------------------------------------------------------------
# DeepSpeed JSON
# --------------------------------------------------------------------------------------


def deepspeed_config(cfg: Config, world_size: int = 1, device: Optional[str] = None,
                     precision: Optional[str] = None) -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` data-parallel ranks.

    Pure function of (cfg, world_size, device) -- no process group needed -- so tests can
    check it and ``deepspeed.json`` in a run directory is exactly what ran. ``precision``:
    an already resolved ``train.precision`` (the loop passes rank 0's), else resolved here.
    """
    t = cfg.train
    precision = precision or resolve_precision(cfg, device)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": t.eps,
                "weight_decay": t.weight_decay,
                # torch.optim.AdamW instead of FusedAdam / DeepSpeedCPUAdam: no C++/CUDA
                # op build, identical math on CPU and GPU, and a plain state_dict that
                # loads with torch.load(weights_only=True).
                "torch_adam": True,
                # torch's fused AdamW kernel (CPU and CUDA): one pass per parameter instead
                # of foreach's dozen element-wise ops over every tensor
                "fused": True,
            },
        },
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # torch.optim.AdamW is not on DeepSpeed's list of ZeRO-tested optimizers.
        "zero_allow_untested_optimizer": True,
        # We log ourselves (metrics.jsonl); DeepSpeed's periodic prints would only add noise.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------------------
# Optimizer groups and LR schedule
# --------------------------------------------------------------------------------------


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (dim >= 2) only.

    1-D parameters (RMSNorm gains) are not decayed: decay would pull them towards 0, not
    towards their init of 1. The expert bias is a buffer, never a parameter, so the
    optimizer cannot touch it (it moves only by the aux-loss-free sign update).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    # "name": DeepSpeed keys its MoE parameter-group split on it (deepspeed.moe layers).
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    return groups


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR / peak LR before optimizer step ``step`` (0-based).

    Linear warmup (step + 1) / warmup over ``warmup_steps`` (so the first update is not
    wasted at lr = 0), then half a cosine from 1 down to ``min_lr_ratio`` at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps + 1) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler_factory(cfg: Config, total_steps: int) -> Callable:
    """A callable ``optimizer -> LambdaLR`` for ``deepspeed.initialize(lr_scheduler=...)``."""
    t = cfg.train

    def factory(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, t.warmup_steps, total_steps, t.min_lr_ratio))

    return factory


# --------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_s: int) -> tuple[int, int]:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) if not done; return (rank, world).

    Launched by torchrun: uses its env vars. Plain process: a one-rank group on a free
    local port. ``timeout_s`` bounds every collective, so a dead rank fails the job.
    """
    if not dist.is_initialized():
        forget_groups()  # a group destroyed earlier in this process
        backend = "nccl" if device_type() == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / deepspeed launcher
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # Not launched: a private one-rank group. Only LOCAL_RANK goes into the
            # environment (DeepSpeed's engine requires it); RANK/MASTER_PORT stay unset so
            # child processes (tests, torchrun) do not inherit a port that is in use.
            os.environ.setdefault("LOCAL_RANK", "0")
            if backend == "nccl":
                torch.cuda.set_device(0)
            dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{_free_port()}")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """SUM over ``group`` (default: the world; the trainer passes its data-parallel group)
    in place, exact for int64; identity on one rank."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        if dist.get_backend(group) == "nccl" and t.device.type == "cpu":
            # NCCL reduces device tensors only (loss sums / eval counts live on the CPU)
            tmp = t.cuda()
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM, group=group)
            t.copy_(tmp.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def build_engine(cfg: Config, model: torch.nn.Module, total_steps: int, ds_config: dict,
                 mpu=None):
    """``deepspeed.initialize`` on ``model`` with ``ds_config``; returns (engine, optimizer,
    scheduler). The process group must exist (see :func:`init_process_group`). ``mpu``:
    the model-parallel adapter (:class:`moe.parallel.MegatronMPU`) for TP/EP layouts."""
    deepspeed = import_deepspeed()
    # build/load DeepSpeed's C++ ops ourselves first: a stale build lock is removed or
    # named instead of hanging inside init_distributed (see moe.train.opbuild)
    from .opbuild import ensure_deepspeed_ops, skip_comm_op_for_one_process

    if not skip_comm_op_for_one_process(torch.distributed.get_world_size()):
        ensure_deepspeed_ops(cfg.data.cache_dir)
    deepspeed.init_distributed(
        dist_backend="nccl" if device_type() == "cuda" else "gloo",
        timeout=timedelta(seconds=cfg.parallel.timeout_s))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=ds_config,
        lr_scheduler=make_scheduler_factory(cfg, total_steps),
        mpu=mpu,
    )
    return engine, optimizer, scheduler


# --------------------------------------------------------------------------------------
# Optimizer state in a weights_only-loadable form
# --------------------------------------------------------------------------------------


def _fp32_partitions(optimizer) -> Optional[list]:
    for name in ("single_partition_of_fp32_groups",  # ZeRO 1/2 (DeepSpeedZeroOptimizer)
                 "fp32_groups_flat_partition"):  # bf16 without ZeRO (BF16_Optimizer)
        parts = getattr(optimizer, name, None)
        if parts is not None:
            return parts
    return None


def optimizer_state(optimizer) -> dict:
    """This rank's optimizer state as plain data + tensors (``weights_only=True``-safe).

    * a plain torch optimizer (ZeRO 0, fp32) or DeepSpeed's FP16_UnfusedOptimizer (ZeRO 0,
      bf16): its ``state_dict()``;
    * DeepSpeed wrappers (ZeRO 1/2, bf16): the wrapped torch optimizer's state (Adam
      moments of this rank's flat fp32 partition) and the fp32 master partition itself.
      Their own ``state_dict()`` holds a LossScaler object and a ZeroStageEnum, which need
      pickle to load, and fragment-address mappings that are derived data anyway.
    """
    parts = _fp32_partitions(optimizer)
    if parts is None:
        # torch.optim.AdamW itself, or DeepSpeed's FP16_UnfusedOptimizer (bf16 + ZeRO 0),
        # whose state_dict is plain data too (scale numbers, fp32 master copies, inner state)
        return {"kind": type(optimizer).__name__, "state": optimizer.state_dict()}
    return {"kind": type(optimizer).__name__,
            "base": optimizer.optimizer.state_dict(),
            "fp32_partitions": [p.detach().clone() for p in parts]}


def load_optimizer_state(optimizer, saved: dict) -> None:
    """Inverse of :func:`optimizer_state` (same world size and ZeRO stage required)."""
    parts = _fp32_partitions(optimizer)
    kind = type(optimizer).__name__
    if saved.get("kind") != kind:
        raise RuntimeError(f"checkpoint optimizer state is {saved.get('kind')!r} but this run "
                           f"uses {kind!r} (was train.zero_stage or precision changed?)")
    if parts is None:
        optimizer.load_state_dict(saved["state"])
        return
    optimizer.optimizer.load_state_dict(saved["base"])
    if len(parts) != len(saved["fp32_partitions"]):
        raise RuntimeError("checkpoint has a different number of ZeRO parameter groups")
    with torch.no_grad():
        for p, s in zip(parts, saved["fp32_partitions"]):
            if p.shape != s.shape:
                raise RuntimeError(f"ZeRO partition shape {tuple(s.shape)} in the checkpoint "
                                   f"!= {tuple(p.shape)} here (different world size?)")
            p.copy_(s)
