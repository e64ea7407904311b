"""Process groups and the (tp, ep, dp) layout, through megatron-core's parallel_state."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch.distributed as dist

from ..config import ConfigError, ParallelConfig


@dataclass
class Topology:
    world_size: int
    tp: int
    ep: int
    dp: int  # data-parallel size of the dense (non-expert) parameters = world / tp
    expert_dp: int  # replicas of each expert = world / (tp * ep)


def check_layout(parallel: ParallelConfig, world_size: int) -> Topology:
    """Validate that ``world_size`` factors into tp x dp with ep dividing dp."""
    tp, ep = parallel.tp, parallel.ep
    if world_size % tp:
        raise ConfigError(f"parallel.tp={tp} is invalid: allowed a divisor of the world size {world_size}")
    dp = world_size // tp
    if dp % ep:
        raise ConfigError(f"parallel.ep={ep} is invalid: allowed a divisor of world size / parallel.tp "
                          f"= {world_size}/{tp} = {dp} (experts are sharded inside the data-parallel ranks)")
    return Topology(world_size=world_size, tp=tp, ep=ep, dp=dp, expert_dp=dp // ep)


def init_topology(parallel: ParallelConfig, world_size: int | None = None) -> Topology:
    """Check the layout, then build megatron-core's groups (tensor, data, expert-model,
    expert-data parallel). Requires an initialised default process group."""
    world = world_size if world_size is not None else dist.get_world_size()
    topo = check_layout(parallel, world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=topo.tp, expert_model_parallel_size=topo.ep)
    os.environ.setdefault("MOE_TESTBED_TOPOLOGY", f"tp{topo.tp}-ep{topo.ep}-dp{topo.dp}")
    return topo
