"""Parallelism applied to the single-device model from outside (torchtitan's rule).

Implemented here: the (tp, ep, dp) layout check and megatron-core topology, and expert
parallelism (experts sharded over an EP group,
tokens exchanged with all-to-all). Tensor parallelism of attention/dense FFNs and the
trainer's use of EP are not wired yet (see the distributed issue).
"""

from .expert_parallel import (all_to_all, apply_expert_parallel, count_all_reduce,
                              expert_param_names)
from .topology import Topology, check_layout, init_topology

__all__ = ["Topology", "check_layout", "init_topology", "apply_expert_parallel",
           "all_to_all", "count_all_reduce", "expert_param_names"]
