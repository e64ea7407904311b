"""The router (pure torch): scoring, group-limited top-k, gates; balance losses and MaxVio.

The MoE layer's first stage (router -> token dispatcher -> experts, as megatron-core's
moe/router.py). The routing rule is written once, here; the Triton routing kernel
(kernels.routing) computes the same rule and :class:`Router` runs it on the layer's
Triton backend.

Shape legend: T tokens, E routed experts, K top_k, B batch, S sequence length,
G expert groups.

Semantics follow docs/model.md, "Gating":

    scores_TE  = sigmoid(logits) | softmax(logits)           fp32 always
    select_TE  = scores + expert_bias                         bias for SELECTION only
    group score = sum of the top-2 of select in the group     DeepSeek-V3 rule (see below)
    other groups masked with -inf                             never 0.0: biased scores go negative
    indices_TK = top-k of select, ties -> lowest expert id
    gates_TK   = scores[indices]  (unbiased), / sum if K > 1
    weights_TK = route_scale * gates

Group rule: we score a group by the sum of its top-2 biased scores (DeepSeek-V3's
released inference code). megatron-core sums the top (K / topk_groups) instead; the two
agree exactly when K / topk_groups == 2 (true for V3: 8 / 4). Tests check both regimes.

Ties: torch.topk does not promise which index wins. We select with a *stable* descending
sort, so among equal values the lowest expert id wins; the Triton kernel uses the same
rule. Sigmoid saturates to exactly 1.0 in fp32 for logits above ~17, so ties are real.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kernels._checks import check_route_args  # torch-only module: no triton import

from ..config import MoEConfig


def _stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, ordered by (value desc, index asc).

    torch.topk is ~4x faster than a full stable sort (T=4096, E=64 on CPU: 5 ms vs 22 ms)
    but leaves tie order unspecified. So: topk, then re-order the k winners stably, and
    redo with a full stable sort only the rows where a tie straddles the k-th place
    (more than k values >= the k-th value) -- rare except with saturated sigmoids.
    """
    top = torch.topk(values, k, dim=-1)
    idx = top.indices.sort(dim=-1).values  # ascending ids, so the stable sort below keeps id order
    order = torch.sort(values.gather(-1, idx), dim=-1, descending=True, stable=True).indices
    idx = idx.gather(-1, order)
    ambiguous = (values >= top.values[..., -1:]).sum(-1) > k
    if ambiguous.any():
        idx[ambiguous] = torch.sort(values[ambiguous], dim=-1, descending=True,
                                    stable=True).indices[..., :k]
    return idx


def compute_scores(logits_TE: torch.Tensor, score_fn: str) -> torch.Tensor:
    logits = logits_TE.float()
    if score_fn == "sigmoid":
        return torch.sigmoid(logits)
    if score_fn == "softmax":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"score_fn={score_fn!r} is invalid: allowed 'sigmoid' or 'softmax'")


def group_limited_mask(select_TE: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Set experts outside the best ``topk_groups`` groups to -inf (group score: top-2 sum)."""
    if n_groups <= 1:
        return select_TE
    T, E = select_TE.shape
    grouped_TGe = select_TE.view(T, n_groups, E // n_groups)
    top = min(2, E // n_groups)
    group_score_TG = grouped_TGe.topk(top, dim=-1).values.sum(-1)
    keep_groups_TG = _stable_topk(group_score_TG, topk_groups)
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, keep_groups_TG, True)
    keep_TE = keep_TG.unsqueeze(-1).expand_as(grouped_TGe).reshape(T, E)
    return select_TE.masked_fill(~keep_TE, float("-inf"))


def route(
    logits_TE: torch.Tensor,
    *,
    top_k: int,
    score_fn: str = "sigmoid",
    expert_bias: Optional[torch.Tensor] = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    route_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts.

    Args:
        logits_TE: router logits (any float dtype; scored in fp32).
        top_k: experts per token.
        score_fn: "sigmoid" (DeepSeek-V3) or "softmax" (Mixtral, Qwen, OLMoE).
        expert_bias: (E,) fp32 bias added for selection only (aux-loss-free balancing).
        n_groups, topk_groups: group-limited routing (keep the best topk_groups groups).
        route_scale: multiplies the (normalised) gates.

    Returns:
        weights_TK (fp32, differentiable w.r.t. logits) and indices_TK (int64).
    """
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be 2-D (tokens, experts), got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    check_route_args(E, top_k, n_groups, topk_groups)
    scores_TE = compute_scores(logits_TE, score_fn)
    with torch.no_grad():
        select_TE = scores_TE.detach()
        if expert_bias is not None:
            if expert_bias.shape != (E,):
                raise ValueError(f"expert_bias must have shape ({E},), got {tuple(expert_bias.shape)}")
            select_TE = select_TE + expert_bias.float()
        select_TE = group_limited_mask(select_TE, n_groups, topk_groups)
        indices_TK = _stable_topk(select_TE, top_k)
    return expert_gates(scores_TE, indices_TK, route_scale), indices_TK


def expert_gates(scores_TE: torch.Tensor, indices_TK: torch.Tensor,
                 route_scale: float) -> torch.Tensor:
    """weights_TK = route_scale * scores[indices] (the UNBIASED scores), normalised over
    the K chosen experts when K > 1 (with K = 1 normalising makes every gate 1.0: no router
    gradient; docs/model.md, "Gating")."""
    gates_TK = scores_TE.gather(1, indices_TK)
    if indices_TK.shape[1] > 1:
        gates_TK = gates_TK / (gates_TK.sum(-1, keepdim=True) + 1e-20)
    return gates_TK * route_scale


def route_uniform(logits_TE: torch.Tensor, *, top_k: int, score_fn: str = "sigmoid",
                  route_scale: float = 1.0, **_ignored) -> tuple[torch.Tensor, torch.Tensor]:
    """Forced-uniform routing (moe.force_uniform, a debug/benchmark switch): slot t*K + k
    goes to expert (t*K + k) mod E whatever the scores; the gates are still the router's
    (:func:`expert_gates`). Bias and groups do not apply."""
    T, E = logits_TE.shape
    slots = torch.arange(T * top_k, device=logits_TE.device)
    indices_TK = (slots % E).view(T, top_k)
    return expert_gates(compute_scores(logits_TE, score_fn), indices_TK, route_scale), indices_TK


def route_triton(logits_TE: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route` by the fused Triton kernel (kernels.route: same rule, same ties; its
    per-expert counts are left to the dispatcher)."""
    import kernels  # lazy: moe works without triton installed

    weights_TK, indices_TK, _ = kernels.route(logits_TE, **kw)
    return weights_TK, indices_TK


class Router(nn.Module):
    """The router's weight (E, D) and its rule: logits in fp32, then :func:`route` (or the
    Triton kernel, or forced-uniform routing), picked by :meth:`use_backend` when the layer
    is built or moved to another device, never per call. The expert bias is the layer's
    (its balancing state) and comes in with every call."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed, d_model))
        # nn.Linear's own initialisation: the same random draws, so a model built from a
        # seed has the same weights as when the router was an nn.Linear
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.use_backend("torch")

    def use_backend(self, backend: str) -> None:
        """"torch" (:func:`route`) or "triton" (:func:`route_triton`); forced-uniform
        routing (cfg.force_uniform) whatever the backend."""
        self.rule = (route_uniform if self.cfg.force_uniform
                     else route_triton if backend == "triton" else route)

    def forward(self, x_TD: torch.Tensor, expert_bias: Optional[torch.Tensor]):
        """(logits_TE fp32, weights_TK fp32, indices_TK int64); the router runs in fp32."""
        c = self.cfg
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        weights_TK, indices_TK = self.rule(
            logits_TE, top_k=c.top_k, score_fn=c.score_fn, expert_bias=expert_bias,
            n_groups=c.n_groups, topk_groups=c.topk_groups, route_scale=c.route_scale)
        return logits_TE, weights_TK, indices_TK


# --------------------------------------------------------------------------------------
# Balance losses and metrics
# --------------------------------------------------------------------------------------


def sequence_balance_loss(scores_BSE: torch.Tensor, top_k: int, alpha: float) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss (docs/model.md, "Sequence-wise
    balance loss").

    f_i = E / (K S) * #{t : i in plain TopK(s_t)}   (no bias), per sequence
    P_i = mean_t s_{i,t} / sum_j s_{j,t}
    L   = alpha * sum_i f_i P_i, averaged over the B sequences.
    """
    B, S, E = scores_BSE.shape
    with torch.no_grad():
        idx_BSK = _stable_topk(scores_BSE.detach(), top_k)
        hits_BE = torch.zeros(B, E, device=scores_BSE.device, dtype=torch.float32)
        hits_BE.scatter_add_(1, idx_BSK.reshape(B, -1),
                             torch.ones(B, S * top_k, device=scores_BSE.device))
        f_BE = hits_BE * (E / (top_k * S))
    norm_BSE = scores_BSE / (scores_BSE.sum(-1, keepdim=True) + 1e-20)
    P_BE = norm_BSE.mean(1)
    return alpha * (f_BE * P_BE).sum(-1).mean()


def switch_aux_loss(scores_TE: torch.Tensor, indices_TK: torch.Tensor, coef: float) -> torch.Tensor:
    """Classic Switch/GShard load-balancing loss over one micro-batch.

    L = coef * E * sum_i f_i P_i with f_i the fraction of routed slots sent to i and P_i the
    mean normalised router probability of i. Equals coef at perfect balance.
    """
    T, E = scores_TE.shape
    K = indices_TK.shape[1]
    with torch.no_grad():
        counts = torch.bincount(indices_TK.reshape(-1), minlength=E).float()
        f_E = counts / (T * K)
    probs_TE = scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
    return coef * E * (f_E * probs_TE.mean(0)).sum()


def router_z_loss(logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """ST-MoE router z-loss: coef * mean_t logsumexp(logits_t)^2."""
    return coef * torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def max_violation(counts_E: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean_i load_i) / mean_i load_i (docs/model.md,
    "Load-balance metrics")."""
    c = counts_E.double()
    mean = c.mean()
    if mean <= 0:
        return 0.0
    return float((c.max() - mean) / mean)


def topk_counts(indices_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Exact integer token counts per expert (int64)."""
    return torch.bincount(indices_TK.reshape(-1), minlength=n_experts)


__all__ = ["Router", "route", "route_uniform", "route_triton", "expert_gates", "compute_scores",
           "group_limited_mask", "sequence_balance_loss", "switch_aux_loss", "router_z_loss", "max_violation",
           "topk_counts"]
