"""Triton kernels for the MoE layer: routing, token permutation, grouped expert MLP.

Public API (each with a plain-torch ``*_ref`` that tests and benchmarks share):
    route(logits_TE, *, top_k, ...)            -> (weights_TK, indices_TK, tokens_per_expert_E)
    permute(x_TD, indices_TK, E, pad_to=1)     -> (x_MD, row_map_TK, offsets_E)
    unpermute(y_MD, row_map_TK, weights_TK, T) -> out_TD
    grouped_swiglu_mlp(x_MD, offsets_E, w13_ED2F, w2_EFD) -> y_MD
    moe_layer_triton(x_TD, logits_TE, w13, w2, *, top_k, ..., fuse_gather=False)
                                               -> (out_TD, tokens_per_expert_E)
    routed_experts_unchecked(x_TD, w_TK, idx_TK, w13, w2)      -> out_TD (no host syncs)
    available()                                -> whether Triton can run here

Each kernel module holds the math, a plain-torch ``*_ref``, the ``@triton.jit`` kernels,
launchers, an autograd Function and the public function. Only torch and triton are
imported here (never moe, deepspeed or megatron), so a GPU box with just those runs them.
On CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``; slow, for tests).
Checked with Triton 3.9 (CI) and 3.6 (the GPU image's): the interpreter tests pass and every
autotune config compiles for sm_90 under both. Triton 3.6's interpreter fails with numpy >= 2.4
("only 0-dimensional arrays can be converted to Python scalars" on a loop bound); its
compiled GPU path does not go through that code.
"""

import importlib
import os

import torch

# Kernel modules load on first use (PEP 562): ``import kernels`` and the torch-only
# ``kernels._checks`` (used by moe.moe_layer.router) never import triton, and TRITON_INTERPRET set
# any time before the first kernel use still takes effect.
_LAZY = {"route": "routing", "route_ref": "routing", "permute": "permute",
         "permute_ref": "permute", "unpermute": "permute", "unpermute_ref": "permute",
         "grouped_swiglu_mlp": "grouped_mlp", "grouped_swiglu_mlp_ref": "grouped_mlp",
         "moe_layer_triton": "moe_layer", "moe_layer_ref": "moe_layer",
         "routed_experts_unchecked": "moe_layer"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    # Load every kernel module, then bind the public functions: importing the submodule
    # ``kernels.permute`` sets the package attribute ``permute`` to the module, which the
    # function of the same name must replace.
    for mod in set(_LAZY.values()):
        importlib.import_module(f".{mod}", __name__)
    for fn, mod in _LAZY.items():
        globals()[fn] = getattr(importlib.import_module(f".{mod}", __name__), fn)
    return globals()[name]


def available() -> bool:
    """Whether Triton kernels can run here: a CUDA device, or the interpreter on CPU."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


__all__ = ["route", "route_ref", "permute", "permute_ref", "unpermute", "unpermute_ref",
           "grouped_swiglu_mlp", "grouped_swiglu_mlp_ref", "moe_layer_triton", "moe_layer_ref",
           "routed_experts_unchecked", "available"]
