"""Parallelism applied to the single-device model from outside (torchtitan's rule).

Implemented here: the (tp, ep, dp) layout check and megatron-core topology, and expert
parallelism (experts sharded over an EP group, tokens exchanged with all-to-all). Tensor parallelism of attention and dense/shared FFNs
uses megatron-core's parallel linear layers. :mod:`moe.parallel.plan` is what the trainer
calls: groups, sharding, DeepSpeed wiring, exact clipping, which shard a rank writes
(the shard files themselves: :mod:`moe.runs.shards`).

Order (fixed): moe.train.engine.init_process_group -> init_topology -> build_model (full weights, same
seed on every rank) -> apply_tensor_parallel -> apply_expert_parallel(ep group) ->
MegatronMPU().register_expert_groups(model) -> deepspeed.initialize(mpu=MegatronMPU()).
"""

from .plan import ParallelPlan, plan_parallel
from .expert_parallel import (all_to_all, apply_expert_parallel, average_gradients,
                              count_all_reduce, expert_param_names, guarded)
from .tensor_parallel import apply_tensor_parallel
from .topology import (MegatronMPU, Topology, check_layout, forget_groups, init_topology,
                       release_groups)

__all__ = ["Topology", "check_layout", "init_topology", "apply_tensor_parallel", "apply_expert_parallel",
           "all_to_all", "count_all_reduce", "expert_param_names", "average_gradients",
           "guarded", "MegatronMPU", "forget_groups", "release_groups", "ParallelPlan", "plan_parallel"]
