"""DeepSeek-V3-style MoE feed-forward: shared experts + fine-grained routed experts, as
router -> token dispatcher -> experts (megatron-core's moe_layer.py).

Shape legend: B batch, S sequence, T = B*S tokens, D d_model, E routed experts,
K top_k, M = T*K routed rows (token copies sorted by expert), F expert FFN size.

    logits, weights_TK, indices_TK = router(x_TD, expert_bias)        (router.py)
    rows = dispatcher.dispatch(x_TD, weights_TK, indices_TK, ...)    (dispatcher.py)
    y_MD = experts(rows, w13_ED2F, w2_EFD)                           (experts.py)
    out_TD = dispatcher.combine(y_MD, rows) + shared(x_TD)

Backends: ``moe.kernels`` torch | triton | auto (triton on CUDA, torch elsewhere) picks
the router's implementation, the single-device dispatcher and the experts once, when the
layer is built and again when it moves to another device (``_apply``), never per call.
Expert parallelism (moe.parallel.apply_expert_parallel) gives the layer an all-to-all
dispatcher and its slice of the expert weights; the rest of the layer is unchanged.

Balancing state: ``expert_bias`` (fp32 always, even when the module is cast to bf16) and
``tokens_acc_E`` (exact int64 counts accumulated over the micro-batches of one optimizer
step; only training forwards with grad enabled count, so evaluation never does).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..config import MoEConfig
from ..layers import SwiGLU
from .dispatcher import local_dispatcher
from .experts import make_experts
from .router import (Router, compute_scores, max_violation, router_z_loss,
                     sequence_balance_loss, switch_aux_loss)


def resolve_backend(kernels: str, device: torch.device) -> str:
    """moe.kernels for a device: "auto" is triton on CUDA, torch elsewhere."""
    if kernels == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return kernels


class MoEFeedForward(nn.Module):
    """Shared experts + routed experts with aux-loss-free (bias) balancing and baselines."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, Fh = cfg.n_routed, cfg.expert_ffn_dim
        self.n_experts = E
        self.router = Router(d_model, cfg)
        self.w13_ED2F = nn.Parameter(torch.empty(E, d_model, 2 * Fh))
        self.w2_EFD = nn.Parameter(torch.empty(E, Fh, d_model))
        # n_shared experts of size F are exactly one SwiGLU of size n_shared*F (sum of FFNs).
        self.shared = SwiGLU(d_model, cfg.n_shared * Fh) if cfg.n_shared > 0 else None
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("tokens_acc_E", torch.zeros(E, dtype=torch.int64), persistent=False)
        self.last_counts_E: Optional[torch.Tensor] = None  # counts of the latest forward
        self.last_losses: dict[str, float] = {}
        self.backend: Optional[str] = None
        self.dispatcher = local_dispatcher("torch", E)
        self._use_device(self.w13_ED2F.device)

    def _use_device(self, device: torch.device) -> None:
        """Pick the router rule, dispatcher and experts of moe.kernels on ``device`` (an
        expert-parallel dispatcher stays: it exchanges rows whatever the backend)."""
        backend = resolve_backend(self.cfg.kernels, device)
        if backend == self.backend:
            return
        self.backend = backend
        self.router.use_backend(backend)
        self.dispatcher = self.dispatcher.for_backend(backend)
        self.experts = make_experts(backend, self.cfg.dispatch)

    # Keep the expert bias in fp32 whatever dtype the module is cast to (megatron-core
    # issue 1482: a bf16 bias cannot represent +-1e-3 steps around values of order 1).
    def _apply(self, fn, recurse=True):
        bias = self._buffers.pop("expert_bias")
        try:
            super()._apply(fn, recurse)
        finally:
            # fn tells the target device; the values come from the fp32 original, not a cast copy
            self._buffers["expert_bias"] = bias.to(device=fn(bias).device, dtype=torch.float32)
        self._use_device(self.w13_ED2F.device)
        return self

    # ------------------------------------------------------------------ stages
    def route(self, x_TD: torch.Tensor):
        """(logits_TE, weights_TK, indices_TK) of the router, with the expert bias when
        balancing uses it."""
        aux_free = self.cfg.balancing in ("aux_free", "aux_free+seq_aux")
        return self.router(x_TD, self.expert_bias if aux_free else None)

    def routed_experts(self, x_TD, weights_TK, indices_TK):
        """Dispatch -> experts -> combine. Returns (out_TD, counts_E): this rank's token
        copies per expert of the layer."""
        fold = self.experts.folds_weights(self.w2_EFD)
        pad = self.experts.pad_rows(self.w2_EFD)
        rows = self.dispatcher.dispatch(x_TD, weights_TK, indices_TK, fold, pad)
        y_MD = self.experts(rows, self.w13_ED2F, self.w2_EFD)
        return self.dispatcher.combine(y_MD, rows), rows.tokens_per_expert_E

    # ------------------------------------------------------------------ forward
    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output_BSD, balance_loss) where balance_loss is a scalar to add to the loss."""
        c = self.cfg
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        logits_TE, weights_TK, indices_TK = self.route(x_TD)
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
