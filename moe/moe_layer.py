"""DeepSeek-V3-style MoE feed-forward: shared experts + fine-grained routed experts.

Shape legend: B batch, S sequence, T = B*S tokens, D d_model, E routed experts,
K top_k, M = T*K routed rows (token copies sorted by expert), F expert FFN size.

Expert weights: ``w13_ED2F`` holds gate (columns [:F]) and up (columns [F:]) of every
expert so one grouped GEMM computes both; ``w2_EFD`` is the down projection.

Dispatch is dropless: token copies are sorted by expert (stable, so the order is
deterministic), each expert runs on its contiguous segment, results are weighted and
summed back per token. Backends:
  * ``torch`` + ``grouped_mm``: torch._grouped_mm over the segments (fast on CPU too);
  * ``torch`` + ``loop``: one dense matmul per expert (the reference);
  * ``triton``: kernels.moe_layer_triton (fused routing / permutation / grouped MLP).

Balancing state: ``expert_bias`` (fp32 always, even when the module is cast to bf16) and
``tokens_acc_E`` (exact int64 counts accumulated over the micro-batches of one optimizer
step; only training forwards with grad enabled count, so evaluation never does).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .layers import SwiGLU
from .router import (compute_scores, group_limited_mask, max_violation, route,
                     router_z_loss, sequence_balance_loss, switch_aux_loss)


def _resolve_backend(kernels: str, device: torch.device) -> str:
    if kernels == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return kernels


def sort_by_expert(indices_TK: torch.Tensor, n_experts: int):
    """Expert-sorted order of the T*K routed slots.

    Returns order_M (slot id of each sorted row), counts_E (int64) and offsets_E (int32
    cumulative segment ends, the ``offs`` format of torch._grouped_mm).
    """
    flat_M = indices_TK.reshape(-1)
    order_M = torch.argsort(flat_M, stable=True)
    counts_E = torch.bincount(flat_M, minlength=n_experts)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return order_M, counts_E, offsets_E


def experts_grouped_mm(x_MD, offsets_E, w13_ED2F, w2_EFD):
    """SwiGLU experts over contiguous segments via torch._grouped_mm."""
    Fh = w2_EFD.shape[1]
    h_M2F = torch._grouped_mm(x_MD, w13_ED2F, offs=offsets_E)
    a_MF = F.silu(h_M2F[:, :Fh]) * h_M2F[:, Fh:]
    return torch._grouped_mm(a_MF, w2_EFD, offs=offsets_E)


def experts_loop(x_MD, counts_E, w13_ED2F, w2_EFD):
    """Reference: one dense SwiGLU per expert segment."""
    Fh = w2_EFD.shape[1]
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        xe = x_MD[start:start + n]
        h = xe @ w13_ED2F[e]
        outs.append((F.silu(h[:, :Fh]) * h[:, Fh:]) @ w2_EFD[e])
        start += n
    return torch.cat(outs, 0) if outs else x_MD.new_zeros(0, w2_EFD.shape[2])


class MoEFeedForward(nn.Module):
    """Shared experts + routed experts with aux-loss-free (bias) balancing and baselines."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, Fh = cfg.n_routed, cfg.expert_ffn_dim
        self.n_experts = E
        self.router = nn.Linear(d_model, E, bias=False)
        self.w13_ED2F = nn.Parameter(torch.empty(E, d_model, 2 * Fh))
        self.w2_EFD = nn.Parameter(torch.empty(E, Fh, d_model))
        # n_shared experts of size F are exactly one SwiGLU of size n_shared*F (sum of FFNs).
        self.shared = SwiGLU(d_model, cfg.n_shared * Fh) if cfg.n_shared > 0 else None
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("tokens_acc_E", torch.zeros(E, dtype=torch.int64), persistent=False)
        self.last_counts_E: Optional[torch.Tensor] = None  # counts of the latest forward
        self.last_losses: dict[str, float] = {}

    # Keep the expert bias in fp32 whatever dtype the module is cast to (megatron-core
    # issue 1482: a bf16 bias cannot represent +-1e-3 steps around values of order 1).
    def _apply(self, fn, recurse=True):
        bias = self._buffers.pop("expert_bias")
        try:
            super()._apply(fn, recurse)
        finally:
            # fn tells the target device; the values come from the fp32 original, not a cast copy
            self._buffers["expert_bias"] = bias.to(device=fn(bias).device, dtype=torch.float32)
        return self

    # ------------------------------------------------------------------ routing
    def _route(self, x_TD: torch.Tensor):
        c = self.cfg
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())  # router in fp32
        bias = self.expert_bias if c.balancing in ("aux_free", "aux_free+seq_aux") else None
        if c.force_uniform:
            T = x_TD.shape[0]
            slots = torch.arange(T * c.top_k, device=x_TD.device)
            indices_TK = (slots % self.n_experts).view(T, c.top_k)
            scores_TE = compute_scores(logits_TE, c.score_fn)
            gates = scores_TE.gather(1, indices_TK)
            if c.top_k > 1:
                gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
            return logits_TE, gates * c.route_scale, indices_TK
        backend = _resolve_backend(c.kernels, x_TD.device)
        if backend == "triton":
            import kernels  # lazy: moe works without triton installed

            weights_TK, indices_TK, _ = kernels.route(
                logits_TE, top_k=c.top_k, score_fn=c.score_fn, expert_bias=bias,
                n_groups=c.n_groups, topk_groups=c.topk_groups, route_scale=c.route_scale)
        else:
            weights_TK, indices_TK = route(
                logits_TE, top_k=c.top_k, score_fn=c.score_fn, expert_bias=bias,
                n_groups=c.n_groups, topk_groups=c.topk_groups, route_scale=c.route_scale)
        return logits_TE, weights_TK, indices_TK

    # ------------------------------------------------------------------ experts
    def routed_experts(self, x_TD, weights_TK, indices_TK):
        """Dropless dispatch -> experts -> weighted combine. Returns (out_TD, counts_E)."""
        c = self.cfg
        T, K = indices_TK.shape
        backend = _resolve_backend(c.kernels, x_TD.device)
        if backend == "triton":
            import kernels

            x_MD, row_map_TK, offsets_E = kernels.permute(x_TD, indices_TK, self.n_experts)
            y_MD = kernels.grouped_swiglu_mlp(x_MD, offsets_E, self.w13_ED2F, self.w2_EFD)
            out_TD = kernels.unpermute(y_MD, row_map_TK, weights_TK.to(y_MD.dtype), T)
            counts_E = torch.bincount(indices_TK.reshape(-1), minlength=self.n_experts)
            return out_TD, counts_E
        order_M, counts_E, offsets_E = sort_by_expert(indices_TK, self.n_experts)
        token_M = order_M // K
        x_MD = x_TD[token_M]
        if c.dispatch == "loop":
            y_MD = experts_loop(x_MD, counts_E, self.w13_ED2F, self.w2_EFD)
        else:
            y_MD = experts_grouped_mm(x_MD, offsets_E, self.w13_ED2F, self.w2_EFD)
        w_M = weights_TK.reshape(-1)[order_M].to(y_MD.dtype)
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_M, y_MD * w_M[:, None])
        return out_TD, counts_E

    # ------------------------------------------------------------------ forward
    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output_BSD, balance_loss) where balance_loss is a scalar to add to the loss."""
        c = self.cfg
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        logits_TE, weights_TK, indices_TK = self._route(x_TD)
        out_TD, counts_E = self.routed_experts(x_TD, weights_TK, indices_TK)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)

        counts_E = counts_E.detach()
        self.last_counts_E = counts_E
        if self.training and torch.is_grad_enabled():
            self.tokens_acc_E += counts_E

        loss = x_BSD.new_zeros((), dtype=torch.float32)
        logged = {}
        if c.balancing == "aux_free+seq_aux" and c.alpha > 0:
            scores_BSE = compute_scores(logits_TE, c.score_fn).view(B, S, -1)
            seq = sequence_balance_loss(scores_BSE, c.top_k, c.alpha)
            loss = loss + seq
            logged["seq_aux"] = float(seq.detach())
        if c.balancing == "aux_loss" and c.aux_loss_coef > 0:
            aux = switch_aux_loss(compute_scores(logits_TE, c.score_fn), indices_TK, c.aux_loss_coef)
            loss = loss + aux
            logged["switch_aux"] = float(aux.detach())
        if c.z_loss_coef > 0:
            z = router_z_loss(logits_TE, c.z_loss_coef)
            loss = loss + z
            logged["z_loss"] = float(z.detach())
        self.last_losses = logged
        return out_TD.view(B, S, D), loss

    # ------------------------------------------------------------------ balancing
    def max_violation(self) -> float:
        """MaxVio of the latest forward (per batch, this layer)."""
        return max_violation(self.last_counts_E) if self.last_counts_E is not None else float("nan")

    @torch.no_grad()
    def update_expert_bias(self, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """b_i += gamma * sign(mean_j c_j - c_i) from the counts of this optimizer step.

        ``all_reduce`` (e.g. a data-parallel SUM all-reduce) is applied to the exact int64
        counts first, so every rank makes the same update. Counters are reset.
        """
        counts = self.tokens_acc_E.clone()
        if all_reduce is not None:
            counts = all_reduce(counts)
        self.tokens_acc_E.zero_()
        if self.cfg.balancing not in ("aux_free", "aux_free+seq_aux") or self.cfg.gamma == 0:
            return
        if int(counts.sum()) == 0:
            return
        c = counts.double()
        self.expert_bias += (self.cfg.gamma * torch.sign(c.mean() - c)).to(torch.float32)
