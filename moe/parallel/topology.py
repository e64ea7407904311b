"""Process groups and the (tp, ep, dp) layout, through megatron-core's parallel_state.

Layout (megatron-core 0.16, order tp-cp-ep-dp-pp, expert_tensor_parallel_size = tp by
default): dense parameters are sharded over TP groups (consecutive ranks) and replicated
over data-parallel (DP) groups (stride tp). Each EP group is a subset of one DP group
(same TP rank, different data), and the expert-data-parallel (EDP) group holds the
replicas of the same experts. World = tp * dp, dp = ep * expert_dp.

:func:`import_deepspeed` makes the first import of DeepSpeed, after choosing its accelerator
(the trainer's engine calls it, and so does ParallelPlan.parallelize before expert
parallelism touches DeepSpeed); later ``import deepspeed...`` statements find it loaded.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError, ParallelConfig


def import_deepspeed():
    """Import deepspeed with the CPU accelerator when there is no GPU.

    DS_ACCELERATOR must be set before the first import; deepspeed otherwise probes for
    CUDA/XPU/NPU and fails or warns on a CPU-only box.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: PLC0415 -- heavy, lazy on purpose

    return deepspeed


@dataclass
class Topology:
    world_size: int
    tp: int
    ep: int
    dp: int  # data-parallel size of the dense (non-expert) parameters = world / tp
    expert_dp: int  # replicas of each expert = world / (tp * ep)
    rank: int = 0


def check_layout(parallel: ParallelConfig, world_size: int, rank: int = 0) -> Topology:
    """Validate that ``world_size`` factors into tp x dp with ep dividing dp; raise
    :class:`moe.ConfigError` naming parallel.tp / parallel.ep and the world size if not."""
    tp, ep = parallel.tp, parallel.ep
    if world_size % tp:
        raise ConfigError(f"parallel.tp={tp} is invalid: allowed a divisor of the world size {world_size}")
    dp = world_size // tp
    if dp % ep:
        raise ConfigError(f"parallel.ep={ep} is invalid: allowed a divisor of world size / parallel.tp "
                          f"= {world_size}/{tp} = {dp} (experts are sharded inside the data-parallel ranks)")
    return Topology(world_size=world_size, tp=tp, ep=ep, dp=dp, expert_dp=dp // ep, rank=rank)


def _parallel_state():
    # megatron-core imports Transformer-Engine/apex probes that warn on a CPU box
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
    return parallel_state


def init_topology(parallel: ParallelConfig, world_size: int | None = None,
                  rank: int | None = None) -> Topology:
    """Check the layout, then build megatron-core's groups (tensor, data, expert-model,
    expert-data parallel). Requires an initialised default process group whose size is
    ``world_size`` (default: the process group's). Idempotent per process."""
    world = world_size if world_size is not None else dist.get_world_size()
    rank = rank if rank is not None else dist.get_rank()
    topo = check_layout(parallel, world, rank)
    if dist.get_world_size() != world:
        raise ConfigError(f"world size {world} given to init_topology differs from the process "
                          f"group's {dist.get_world_size()}")
    ps = _parallel_state()
    if not ps.model_parallel_is_initialized():
        # expert_tensor_parallel_size left at its default (= tp): routed experts are
        # replicated over the TP ranks, so EP groups stay inside one DP group.
        ps.initialize_model_parallel(
            tensor_model_parallel_size=topo.tp, expert_model_parallel_size=topo.ep,
            distributed_timeout_minutes=max(1, -(-parallel.timeout_s // 60)))
    os.environ.setdefault("MOE_TESTBED_TOPOLOGY", f"tp{topo.tp}-ep{topo.ep}-dp{topo.dp}")
    return topo


def forget_groups() -> None:
    """Drop the process groups megatron's parallel_state and DeepSpeed's comm backend and
    utils.groups cache in this process. After a default group was destroyed (a test module
    or notebook that tore its group down) they would otherwise hand a new engine groups
    that are no longer registered ("Group ... is not registered")."""
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None
    g = sys.modules.get("deepspeed.utils.groups")
    if g is not None:
        for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS",
                     "_EXPERT_DATA_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
                     "_ALL_TO_ALL_GROUP"):
            if isinstance(getattr(g, name, None), dict):
                getattr(g, name).clear()
        for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "mpu",
                     "_TENSOR_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP",
                     "_DATA_PARALLEL_GROUP"):
            if hasattr(g, name):
                setattr(g, name, None)


def release_groups() -> None:
    """Tear the process groups down while the interpreter is whole: forget the cached
    subgroups, then destroy every group. A worker that only destroyed the default group
    left megatron's and DeepSpeed's subgroup objects to die during interpreter shutdown,
    and once in CI (test_topology_groups_and_deepspeed_mpu) rank 0 aborted there with
    "terminate called without an active exception" after its work was done."""
    import gc

    forget_groups()
    if dist.is_initialized():
        dist.barrier()  # no rank leaves while another still talks to rank 0's store
        dist.destroy_process_group()
    gc.collect()  # the groups' C++ objects (and their threads) go now, not at exit


class MegatronMPU:
    """What DeepSpeed's ``mpu=`` argument expects, backed by megatron-core's groups.

    DeepSpeed (0.19 engine.py / utils/groups.py) calls get_{data,model,tensor_model}_
    parallel_{group,world_size,rank}, get_data_parallel_group_ranks and
    get_tensor_model_parallel_src_rank. Its expert groups are NOT taken from ``mpu``: they
    live in deepspeed.utils.groups' dicts keyed by ``param.group_name``;
    :meth:`register_expert_groups` fills them with megatron's EP / EDP groups so ZeRO and
    the engine all-reduce expert gradients only among replicas of the same experts.
    """

    def __init__(self):
        self.ps = _parallel_state()

    # data parallel (dense parameters)
    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # model parallel = tensor parallel here (no pipeline)
    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    # expert groups (for our own use and for register_expert_groups)
    def get_expert_model_parallel_group(self):
        return self.ps.get_expert_model_parallel_group()

    def get_expert_model_parallel_world_size(self):
        return self.ps.get_expert_model_parallel_world_size()

    def get_expert_model_parallel_rank(self):
        return self.ps.get_expert_model_parallel_rank()

    def get_expert_data_parallel_group(self):
        return self.ps.get_expert_data_parallel_group()

    def get_expert_data_parallel_world_size(self):
        return self.ps.get_expert_data_parallel_world_size()

    def get_expert_data_parallel_rank(self):
        return self.ps.get_expert_data_parallel_rank()

    def expert_group_name(self) -> str:
        """DeepSpeed's key for the expert groups (its own convention)."""
        return f"ep_size_{self.get_expert_model_parallel_world_size()}"

    def register_expert_groups(self, model) -> str:
        """Tag the sharded expert parameters as DeepSpeed MoE parameters
        (``allreduce=False``, ``group_name``) and register megatron's EP / EDP groups under
        that name in deepspeed.utils.groups. Call before ``deepspeed.initialize``; build
        the optimizer's param groups with
        ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``
        (ZeRO 1/2 requires expert params in their own groups). Returns the group name."""
        from deepspeed.utils import groups

        from .expert_parallel import expert_param_names

        name = self.expert_group_name()
        ep, edp = self.get_expert_model_parallel_group(), self.get_expert_data_parallel_group()
        groups._EXPERT_PARALLEL_GROUP[name] = ep
        groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep)
        groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp
        groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp)
        experts = set(expert_param_names(model))
        for n, p in model.named_parameters():
            if n in experts:
                p.allreduce = False
                p.group_name = name
        return name
