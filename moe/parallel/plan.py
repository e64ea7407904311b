"""The trainer's one entry point to parallelism: groups, model sharding, DeepSpeed wiring,
exact gradient clipping and which checkpoint shard a rank writes, for a (tp, ep, dp)
layout.

``tp = ep = 1`` (pure data parallelism) keeps DeepSpeed's defaults and never imports
megatron-core: every rank is a full replica, the data-parallel group is the world.

``tp > 1`` or ``ep > 1`` ("model parallel"):

* megatron-core's parallel_state builds the groups (:func:`init_topology`); the
  data-parallel (DP) rank/size decide which samples a rank reads, so the TP ranks of one
  replica read the same batch;
* the single-device model (same seed on every rank) is sharded from outside:
  :func:`apply_tensor_parallel`, then :func:`apply_expert_parallel` over megatron's
  expert-model-parallel group, then the expert parameters are tagged and megatron's EP /
  expert-data-parallel groups registered in DeepSpeed's group registry;
* DeepSpeed's engine only switches its MoE gradient path on (expert gradients reduced
  over the expert-data-parallel group, divided by the DP size; optimizer groups split by
  ``group_name``) when the model contains a ``deepspeed.moe.layer.MoE``. A parameter-free
  marker subclass of it, attached as ``model.deepspeed_moe_marker``, turns that path on
  for our own MoE layers; DeepSpeed builds and runs none of its MoE machinery from it;
* gradient clipping must use the single-device norm. With ZeRO 1/2 DeepSpeed's own norm
  is exact (partition norms summed over the data-parallel group, TP shards over the TP
  group via the ``tensor_model_parallel`` attribute). With ZeRO 0 it is not: DeepSpeed's
  ``runtime/utils.clip_grad_norm_`` averages the ranks' local norms, which differ under
  expert parallelism. So at ZeRO 0 DeepSpeed's clipping is switched off and
  :meth:`ParallelPlan.clip_grad_norm_` sums squared norms exactly (replicated parameters
  once, TP shards over the TP group, expert shards over the EP group) on the reduced
  ``param.grad`` before the optimizer step;
* checkpoints hold one model file per (tp rank, ep rank) shard, written by the shard's
  first expert-data-parallel replica (file names, layout and consolidation:
  :mod:`moe.runs.shards`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import ParallelConfig
from ..runs.shards import shard_filename
from .expert_parallel import apply_expert_parallel, expert_param_names, guarded
from .tensor_parallel import apply_tensor_parallel
from .topology import MegatronMPU, Topology, check_layout, import_deepspeed, init_topology


@dataclass
class ParallelPlan:
    topo: Topology
    dp_rank: int
    tp_rank: int = 0
    ep_rank: int = 0
    edp_rank: int = 0
    mpu: Optional[MegatronMPU] = None  # None: pure data parallel, DeepSpeed's own groups

    @property
    def model_parallel(self) -> bool:
        return self.topo.tp > 1 or self.topo.ep > 1

    @property
    def dp(self) -> int:
        """Number of model replicas reading different data."""
        return self.topo.dp

    @property
    def dp_group(self):
        """The data-parallel process group (None = the world, pure data parallelism)."""
        return self.mpu.get_data_parallel_group() if self.mpu is not None else None

    def describe(self) -> dict:
        return {"tp": self.topo.tp, "ep": self.topo.ep, "dp": self.topo.dp,
                "expert_dp": self.topo.expert_dp, "world_size": self.topo.world_size}

    # ---------------------------------------------------------------- checkpoint shards
    def shard_file(self, tp_rank: Optional[int] = None, ep_rank: Optional[int] = None) -> str:
        """Model file of a (tp rank, ep rank) shard; ``model.pt`` when not model parallel."""
        if not self.model_parallel:
            return "model.pt"
        return shard_filename(self.tp_rank if tp_rank is None else tp_rank,
                              self.ep_rank if ep_rank is None else ep_rank)

    def all_shard_files(self) -> list[str]:
        return [self.shard_file(t, e) for t in range(self.topo.tp) for e in range(self.topo.ep)]

    @property
    def writes_model(self) -> bool:
        """Whether this rank writes its shard (its first expert-data-parallel replica)."""
        return self.edp_rank == 0 if self.model_parallel else self.topo.rank == 0

    # ---------------------------------------------------------------- model
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Shard the full single-device ``model`` for this rank (in place; returns it)."""
        if not self.model_parallel:
            return model
        apply_tensor_parallel(model, self.mpu.get_tensor_model_parallel_group())
        if self.topo.ep > 1:
            import_deepspeed()  # selects DeepSpeed's CPU accelerator before its first import
            apply_expert_parallel(model, self.mpu.get_expert_model_parallel_group())
            self.mpu.register_expert_groups(model)
            n_experts = [l.n_experts for l in model.moe_layers()]
            model.add_module("deepspeed_moe_marker", _deepspeed_moe_marker(max(n_experts)))
        return model

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """Exact global gradient L2 norm over all shards (see module doc); scales the
        gradients by ``min(1, max_norm / (norm + 1e-6))`` (DeepSpeed's rule) when
        ``max_norm > 0``. Returns the norm before clipping. Collective over the TP and EP
        groups."""
        experts = set(expert_param_names(model)) if self.topo.ep > 1 else set()
        params: tuple[list, list, list] = ([], [], [])  # replicated, TP shards, expert shards
        for n, p in model.named_parameters():
            if p.grad is not None:
                tp_sharded = getattr(p, "tensor_model_parallel", False)
                params[2 if n in experts else (1 if tp_sharded else 0)].append(p)
        dev = next((p.grad.device for ps in params for p in ps), torch.device("cpu"))
        # squared partial norms (float64); the TP and expert parts summed over their groups
        sq = [torch.nn.utils.get_total_norm([p.grad for p in ps]).to(dev, torch.float64).square()
              for ps in params]
        if self.topo.tp > 1:
            g = self.mpu.get_tensor_model_parallel_group()
            guarded("all_reduce(grad norm, tp)", lambda: dist.all_reduce(sq[1], group=g), g)
        if self.topo.ep > 1:
            g = self.mpu.get_expert_model_parallel_group()
            guarded("all_reduce(grad norm, ep)", lambda: dist.all_reduce(sq[2], group=g), g)
        norm = torch.stack(sq).sum().sqrt()
        if max_norm > 0:  # DeepSpeed's rule: scale by min(1, max_norm / (norm + 1e-6))
            torch.nn.utils.clip_grads_with_norm_([p for ps in params for p in ps], max_norm, norm)
        return float(norm)


def plan_parallel(parallel: ParallelConfig) -> ParallelPlan:
    """The layout of this process (after the default process group exists). Raises
    :class:`moe.ConfigError` naming parallel.tp / parallel.ep when the world size does not
    factor."""
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = check_layout(parallel, world, rank)
    if topo.tp == 1 and topo.ep == 1:
        return ParallelPlan(topo=topo, dp_rank=rank, edp_rank=rank)
    init_topology(parallel)
    mpu = MegatronMPU()
    return ParallelPlan(topo=topo, dp_rank=mpu.get_data_parallel_rank(),
                        tp_rank=mpu.get_tensor_model_parallel_rank(),
                        ep_rank=mpu.get_expert_model_parallel_rank(),
                        edp_rank=mpu.get_expert_data_parallel_rank(), mpu=mpu)


def _deepspeed_moe_marker(num_experts: int) -> nn.Module:
    """A parameter-free ``deepspeed.moe.layer.MoE`` instance (see module doc)."""
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        """Tells DeepSpeed's engine the model has expert-parallel parameters; holds none."""

        def __init__(self, n: int):
            nn.Module.__init__(self)  # skip MoE.__init__: no experts, no groups of its own
            self.num_experts = n

        def set_deepspeed_parallelism(self, *args, **kwargs):
            pass  # groups come from megatron-core (MegatronMPU.register_expert_groups)

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker is a marker, not a layer")

    return DeepSpeedMoEMarker(num_experts)
