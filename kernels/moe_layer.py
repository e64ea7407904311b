"""The routed-expert part of an MoE layer composed from the kernels:
route -> permute -> grouped SwiGLU MLP -> unpermute (no shared experts, no router matmul).

Shape legend: T tokens, K top_k, E experts, D hidden, F expert FFN size, M = T*K rows
(more with pad_to > 1).

    w_TK, idx_TK, counts_E = route(logits_TE)
    x_MD, row_map_TK, offs_E = permute(x_TD, idx_TK)
    y_MD = grouped_swiglu_mlp(x_MD, offs_E, w13_ED2F, w2_EFD)
    out_TD[t] = sum_k w_TK[t, k] * y_MD[row_map_TK[t, k]]

With ``fuse_gather=True`` permute is not materialised: the first GEMM reads x_TD rows
through the sorted slot order (grouped_mlp._GatheredSwiGLU).

FLOPs: 6 * T*K * D * F forward (active FLOPs), twice that backward. Bytes: see the parts.
The inner calls skip the value checks of the public functions (indices and offsets are
valid by construction), so the whole layer runs without a host synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_2d, check_float
from .grouped_mlp import (gathered_swiglu_mlp_unchecked, grouped_swiglu_mlp_ref,
                          grouped_swiglu_mlp_unchecked)
from .permute import (permute_ref, permute_unchecked, sort_slots, unpermute_ref,
                      unpermute_unchecked)
from .routing import route, route_ref


# ------------------------------------------------------------------------------ reference
def moe_layer_ref(x_TD, logits_TE, w13_ED2F, w2_EFD, *, top_k, score_fn="sigmoid",
                  expert_bias=None, n_groups=1, topk_groups=1, route_scale=1.0):
    """The same composition from the plain-torch references: (out_TD, tokens_per_expert_E)."""
    E = w13_ED2F.shape[0]
    w_TK, idx_TK, counts_E = route_ref(logits_TE, top_k=top_k, score_fn=score_fn,
                                       expert_bias=expert_bias, n_groups=n_groups,
                                       topk_groups=topk_groups, route_scale=route_scale)
    x_MD, row_map_TK, offs_E = permute_ref(x_TD, idx_TK, E)
    y_MD = grouped_swiglu_mlp_ref(x_MD, offs_E, w13_ED2F, w2_EFD)
    return unpermute_ref(y_MD, row_map_TK, w_TK, x_TD.shape[0]), counts_E


# ------------------------------------------------------------------------------ public
def moe_layer_triton(x_TD: torch.Tensor, logits_TE: torch.Tensor, w13_ED2F: torch.Tensor,
                     w2_EFD: torch.Tensor, *, top_k: int, score_fn: str = "sigmoid",
                     expert_bias: Optional[torch.Tensor] = None, n_groups: int = 1,
                     topk_groups: int = 1, route_scale: float = 1.0, pad_to: int = 1,
                     fuse_gather: bool = False):
    """Routed experts of an MoE layer with the Triton kernels.

    Args:
        x_TD: (T, D) tokens (same dtype as the expert weights).
        logits_TE: (T, E) router logits (fp32 recommended; scores are computed in fp32).
        w13_ED2F: (E, D, 2F) gate|up projections.  w2_EFD: (E, F, D) down projection.
        top_k, score_fn, expert_bias, n_groups, topk_groups, route_scale: as ``route``.
        pad_to: pad each expert segment to a multiple of this (see ``permute``).
        fuse_gather: gather token rows inside the first expert GEMM instead of writing the
            permuted (T*K, D) copy (see grouped_mlp._GatheredSwiGLU).
    Returns:
        (out_TD in x's dtype, differentiable w.r.t. x_TD, logits_TE, w13_ED2F and w2_EFD;
         tokens_per_expert_E int32). No host synchronisation.
    """
    check_float("x_TD", x_TD)
    check_2d("x_TD", x_TD, "(tokens, hidden)")
    check_2d("logits_TE", logits_TE, "(tokens, experts)")
    for n, t in (("w13_ED2F", w13_ED2F), ("w2_EFD", w2_EFD)):
        check_float(n, t)
        if t.dim() != 3:
            raise ValueError(f"{n} must be 3-D, got shape {tuple(t.shape)}")
    if w13_ED2F.dtype != x_TD.dtype or w2_EFD.dtype != x_TD.dtype:
        raise TypeError(f"dtypes differ: x {x_TD.dtype}, w13 {w13_ED2F.dtype}, w2 {w2_EFD.dtype}")
    T, D = x_TD.shape
    E, F2 = w13_ED2F.shape[0], w13_ED2F.shape[2]
    if (tuple(logits_TE.shape) != (T, E) or tuple(w13_ED2F.shape) != (E, D, F2) or F2 % 2
            or tuple(w2_EFD.shape) != (E, F2 // 2, D)):
        raise ValueError(f"shapes do not match: x {tuple(x_TD.shape)}, logits "
                         f"{tuple(logits_TE.shape)}, w13 {tuple(w13_ED2F.shape)}, w2 "
                         f"{tuple(w2_EFD.shape)} (need (T, D), (T, E), (E, D, 2F), (E, F, D))")
    if not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to={pad_to!r} is invalid: allowed an int >= 1")
    w_TK, idx_TK, counts_E = route(logits_TE, top_k=top_k, score_fn=score_fn,
                                   expert_bias=expert_bias, n_groups=n_groups,
                                   topk_groups=topk_groups, route_scale=route_scale)
    return (routed_experts_unchecked(x_TD, w_TK, idx_TK, w13_ED2F, w2_EFD, pad_to, fuse_gather),
            counts_E)


def routed_experts_unchecked(x_TD, weights_TK, indices_TK, w13_ED2F, w2_EFD, pad_to: int = 1,
                             fuse_gather: bool = False):
    """permute -> grouped SwiGLU MLP -> weighted unpermute, without the public functions'
    value checks (each costs a host synchronisation on GPU). Only for callers whose
    indices come from a router (in range by construction) and whose tensors were checked
    once, e.g. :func:`moe_layer_triton` and the model's MoE layer. ``fuse_gather``: the
    first GEMM reads token rows from x_TD itself (no permuted copy). Returns out_TD.
    The routing weights go to the combine as the router made them (fp32): the combine
    kernel multiplies in fp32 and returns their gradient in their dtype, so casting them
    to a bf16 x's dtype first would only round them (to 8 bits of mantissa) for nothing."""
    if fuse_gather:
        row_map_TK, slot_of_row_M, offs_E = sort_slots(indices_TK, w13_ED2F.shape[0], pad_to)
        y_MD = gathered_swiglu_mlp_unchecked(x_TD, slot_of_row_M, row_map_TK, offs_E, w13_ED2F,
                                             w2_EFD, tail=pad_to > 1)
        return unpermute_unchecked(y_MD, row_map_TK, weights_TK)
    x_MD, row_map_TK, offs_E = permute_unchecked(x_TD, indices_TK, w13_ED2F.shape[0], pad_to)
    y_MD = grouped_swiglu_mlp_unchecked(x_MD, offs_E, w13_ED2F, w2_EFD, tail=pad_to > 1)
    return unpermute_unchecked(y_MD, row_map_TK, weights_TK)
