"""Parallelism applied to the single-device model from outside (torchtitan's rule).

Implemented here: the (tp, ep, dp) layout check and megatron-core topology, and expert
parallelism (experts sharded over an EP group,
tokens exchanged with all-to-all). Tensor parallelism of attention and dense/shared FFNs
uses megatron-core's parallel linear layers. The trainer does not use EP/TP yet.
"""

from .expert_parallel import (all_to_all, apply_expert_parallel, count_all_reduce,
                              expert_param_names)
from .tensor_parallel import apply_tensor_parallel
from .topology import Topology, check_layout, init_topology

__all__ = ["Topology", "check_layout", "init_topology", "apply_tensor_parallel", "apply_expert_parallel",
           "all_to_all", "count_all_reduce", "expert_param_names"]
