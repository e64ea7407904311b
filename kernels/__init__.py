"""Triton kernels for the MoE layer: routing, token permutation, grouped expert MLP.

Each kernel module holds the math, a plain-torch ``*_ref``, the ``@triton.jit`` kernels,
launchers, an autograd Function and the public function. Only torch and triton are
imported here (never moe, deepspeed or megatron), so a GPU box with just those runs them.
On CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``; slow, for tests).
"""

import os

import torch

from .grouped_mlp import grouped_swiglu_mlp, grouped_swiglu_mlp_ref
from .permute import permute, permute_ref, unpermute, unpermute_ref
from .routing import route, route_ref


def available() -> bool:
    """Whether Triton kernels can run here: a CUDA device, or the interpreter on CPU."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


__all__ = ["route", "route_ref", "permute", "permute_ref", "unpermute", "unpermute_ref",
           "grouped_swiglu_mlp", "grouped_swiglu_mlp_ref", "available"]
