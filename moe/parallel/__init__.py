"""Parallelism applied to the single-device model from outside (torchtitan's rule).

Implemented here: process-group setup with collective timeouts, the megatron-core
topology for (tp, ep, dp), and expert parallelism (experts sharded over an EP group,
tokens exchanged with all-to-all). Tensor parallelism of attention/dense FFNs and the
trainer's use of EP are not wired yet (see the distributed issue).
"""

from .expert_parallel import (all_to_all, apply_expert_parallel, count_all_reduce,
                              expert_param_names)
from .topology import Topology, init_process_group, init_topology

__all__ = ["Topology", "init_process_group", "init_topology", "apply_expert_parallel",
           "all_to_all", "count_all_reduce", "expert_param_names"]
