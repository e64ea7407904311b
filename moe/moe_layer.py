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
from .router import (compute_scores, max_violation, route,
                     router_z_loss, sequence_balance_loss, switch_aux_loss)


def _resolve_backend(kernels: str, device: torch.device) -> str:
    if kernels == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return kernels


def sort_by_expert(indices_TK: torch.Tensor, n_experts: int):
    """Expert-sorted order of the T*K routed slots.

    Returns order_M (slot id of each sorted row), counts_E (int64) and offsets_E (int32
    cumulative segment ends, the ``offs`` format of torch._grouped_mm). The sort is
    stable (within an expert, slots keep token order), so dispatch is deterministic.
    """
    flat_M = indices_TK.reshape(-1)
    order_M = torch.argsort(flat_M, stable=True)
    counts_E = torch.bincount(flat_M, minlength=n_experts)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return order_M, counts_E, offsets_E


def _sum_rows_per_token(v_MD: torch.Tensor, tok_M: torch.Tensor, inv_M: torch.Tensor,
                        T: int, index_add: Optional[bool] = None) -> torch.Tensor:
    """out_TD[t] = sum of the K rows m of v_MD with tok_M[m] == t.

    CPU: one index_add_ (a sequential, hence deterministic, pass). Elsewhere (CUDA's
    index_add_ uses atomics, so its float sums vary run to run): gather the rows back to
    token-slot order by inv_M and sum the K copies. Measured on the 2-core Xeon at
    T=4096, K=8, D=256: 1.1 ms vs 2.3 ms for the gather-and-sum. ``index_add``: force
    one way (None: by device).
    """
    if index_add is None:
        index_add = v_MD.device.type == "cpu"
    if index_add:
        return v_MD.new_zeros(T, v_MD.shape[1]).index_add_(0, tok_M, v_MD)
    return v_MD.index_select(0, inv_M).view(T, -1, v_MD.shape[1]).sum(1)


class _Dispatch(torch.autograd.Function):
    """x_MD = x_TD[tok_M] (tok_M = order_M // K). Backward sums the K copies of each
    token's gradient (:func:`_sum_rows_per_token`) instead of autograd's generic indexing
    backward (a zero-filled buffer plus a non-deterministic scatter on CUDA)."""

    @staticmethod
    def forward(ctx, x_TD, tok_M, inv_M):
        ctx.save_for_backward(tok_M, inv_M)
        ctx.T = x_TD.shape[0]
        return x_TD.index_select(0, tok_M)

    @staticmethod
    def backward(ctx, g_MD):
        tok_M, inv_M = ctx.saved_tensors
        return _sum_rows_per_token(g_MD.contiguous(), tok_M, inv_M, ctx.T), None, None


class _SumPerToken(torch.autograd.Function):
    """out_TD = sum over each token's K rows of y_MD, rows that already carry their routing
    weight (the grouped experts scaled them). Backward: one gather, g_TD[tok_M]."""

    @staticmethod
    def forward(ctx, y_MD, tok_M, inv_M, T):
        ctx.save_for_backward(tok_M)
        return _sum_rows_per_token(y_MD, tok_M, inv_M, T)

    @staticmethod
    def backward(ctx, g_TD):
        (tok_M,) = ctx.saved_tensors
        return g_TD.contiguous().index_select(0, tok_M), None, None, None


class _Combine(torch.autograd.Function):
    """out_TD = sum_k w_TK[t, k] * y_MD[inv_M[t*K + k]]: gather rows back to token-slot
    order, then one batched (1 x K) @ (K x D) product per token. Backward is again
    gathers (by order_M) and a batched product for the routing-weight gradient."""

    @staticmethod
    def forward(ctx, y_MD, w_TK, order_M, inv_M):
        T, K = w_TK.shape
        y_TKD = y_MD.index_select(0, inv_M).view(T, K, -1)
        ctx.save_for_backward(y_TKD, w_TK, order_M)
        return torch.bmm(w_TK.unsqueeze(1), y_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, g_TD):
        y_TKD, w_TK, order_M = ctx.saved_tensors
        T, K = w_TK.shape
        # an expanded gradient (stride 0, e.g. from out.sum()) sends CPU bmm down a
        # per-token path: 4096 tiny matmuls + clones, 15x slower at T=4096 (measured)
        g_TD = g_TD.contiguous()
        g_y = g_w = None
        if ctx.needs_input_grad[0]:
            # d out_t / d y_row = w(row) * g_t: gather g by token, then scale in place
            w_M = weights_by_row(w_TK, order_M)
            g_y = g_TD.index_select(0, order_M // K).mul_(w_M.unsqueeze(1))
        if ctx.needs_input_grad[1]:
            g_w = torch.bmm(y_TKD, g_TD.unsqueeze(-1)).squeeze(-1)
        return g_y, g_w, None, None


def dispatch(x_TD: torch.Tensor, indices_TK: torch.Tensor, n_experts: int):
    """Sort token copies by expert. Returns (x_MD, order_M, inv_M, counts_E, offsets_E)."""
    order_M, counts_E, offsets_E = sort_by_expert(indices_TK, n_experts)
    inv_M = torch.empty_like(order_M)
    inv_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
    x_MD = _Dispatch.apply(x_TD, order_M // indices_TK.shape[1], inv_M)
    return x_MD, order_M, inv_M, counts_E, offsets_E


def combine(y_MD: torch.Tensor, weights_TK: torch.Tensor, order_M: torch.Tensor,
            inv_M: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's K expert outputs (inverse of :func:`dispatch`)."""
    return _Combine.apply(y_MD, weights_TK.to(y_MD.dtype), order_M, inv_M)


def weights_by_row(weights_TK: torch.Tensor, order_M: torch.Tensor) -> torch.Tensor:
    """Each sorted row's routing weight (the ``weights_M`` of :func:`experts_grouped_mm`)."""
    return weights_TK.reshape(-1).index_select(0, order_M)


def sum_per_token(y_MD: torch.Tensor, order_M: torch.Tensor, inv_M: torch.Tensor,
                  top_k: int) -> torch.Tensor:
    """Sum of each token's K expert outputs that already carry their routing weights
    (:func:`experts_grouped_mm` with ``weights_M``); the inverse of :func:`dispatch`."""
    return _SumPerToken.apply(y_MD, order_M // top_k, inv_M, inv_M.numel() // top_k)


class _GroupedSwiGLU(torch.autograd.Function):
    """y = (w * silu(x W_gate) * (x W_up)) W_down per expert segment (w: each row's routing
    weight when given, folded into the activation so the combine is a plain per-token sum),
    with a hand-written backward of four more grouped GEMMs:
        dW2 = (w a)^T dy,  d(wa) = dy W2^T,  dw = <a, d(wa)>,  da = w d(wa),
        dh = SwiGLU'(h) da,  dW13 = x^T dh,  dx = dh W13^T.
    Why: autograd's generic backward of torch._grouped_mm on CPU took 635 ms for a
    (32768 x 256) x (64 x 256 x 256) product whose three grouped GEMMs take 130 ms
    (measured here, torch 2.13). Folding w into the (M, F) activation instead of scaling
    the (M, D) output costs a pass over half the bytes and no saved copy of the output.
    Saves x, h = [gate | up], silu(gate) and a (not recomputed: each element-wise pass
    over (M, F) costs 1-3 ms on the 2-core CPU, a fifth to a third of a grouped GEMM).
    """

    @staticmethod
    def forward(ctx, x_MD, w13_ED2F, w2_EFD, offsets_E, weights_M):
        Fh = w2_EFD.shape[1]
        h_M2F = torch._grouped_mm(x_MD, w13_ED2F, offs=offsets_E)
        s_MF = F.silu(h_M2F[:, :Fh])
        a_MF = s_MF * h_M2F[:, Fh:]
        ctx.save_for_backward(x_MD, h_M2F, s_MF, a_MF, w13_ED2F, w2_EFD, offsets_E, weights_M)
        aw_MF = a_MF if weights_M is None else a_MF * weights_M.unsqueeze(1)
        return torch._grouped_mm(aw_MF, w2_EFD, offs=offsets_E)

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, h_M2F, s_MF, a_MF, w13_ED2F, w2_EFD, offs, w_M = ctx.saved_tensors
        Fh = w2_EFD.shape[1]
        dy_MD = dy_MD.contiguous()
        aw_MF = a_MF if w_M is None else a_MF * w_M.unsqueeze(1)
        dw2 = torch._grouped_mm(aw_MF.t(), dy_MD, offs=offs)
        da_MF = torch._grouped_mm(dy_MD, w2_EFD.transpose(-2, -1), offs=offs)
        dw_M = None
        if w_M is not None:
            dw_M = torch.linalg.vecdot(a_MF, da_MF) if ctx.needs_input_grad[4] else None
            da_MF.mul_(w_M.unsqueeze(1))
        # write both halves of dh in place: fewer full-size temporaries (these element-wise
        # passes over (M, 2F) cost as much as a GEMM on CPU)
        dh_M2F = torch.empty_like(h_M2F)
        torch.mul(da_MF, s_MF, out=dh_M2F[:, Fh:])
        torch.ops.aten.silu_backward.grad_input(da_MF.mul_(h_M2F[:, Fh:]), h_M2F[:, :Fh],
                                                grad_input=dh_M2F[:, :Fh])
        dw13 = torch._grouped_mm(x_MD.t(), dh_M2F, offs=offs)
        dx = torch._grouped_mm(dh_M2F, w13_ED2F.transpose(-2, -1), offs=offs)
        return dx, dw13, dw2, None, dw_M


def grouped_mm_aligned(w2_EFD: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these expert shapes: it needs every row stride a
    multiple of 16 bytes (torch 2.13: "strides should be multiple of 16 bytes"), so D and
    F (hence 2F) times the element size. A planned geometry such as d_model 42 in fp32
    is not; the layer then runs the per-expert loop instead."""
    F_, D = w2_EFD.shape[1], w2_EFD.shape[2]
    es = w2_EFD.element_size()
    return (D * es) % 16 == 0 and (F_ * es) % 16 == 0


def experts_grouped_mm(x_MD, offsets_E, w13_ED2F, w2_EFD, weights_M=None):
    """SwiGLU experts over contiguous segments via torch._grouped_mm (forward and backward).
    ``weights_M`` (one routing weight per row, optional) scales each row's output."""
    if weights_M is not None:
        weights_M = weights_M.to(x_MD.dtype)
    return _GroupedSwiGLU.apply(x_MD, w13_ED2F, w2_EFD, offsets_E, weights_M)


def experts_loop(x_MD, counts_E, w13_ED2F, w2_EFD):
    """Reference: one dense SwiGLU per expert segment."""
    Fh = w2_EFD.shape[1]
    outs, start = [], 0
    # unbind, not w[e]: indexing's backward would add a zero-filled (E, D, 2F) gradient
    # per expert (measured 4x slower at E=64); unbind's backward stacks once.
    for n, w13, w2 in zip(counts_E.tolist(), w13_ED2F.unbind(0), w2_EFD.unbind(0)):
        xe = x_MD[start:start + n]
        h = xe @ w13
        outs.append((F.silu(h[:, :Fh]) * h[:, Fh:]) @ w2)
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
        """(logits_TE, weights_TK, indices_TK, counts_E or None): counts only where the
        router produced them on the device (the Triton kernel), else None."""
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
            return logits_TE, gates * c.route_scale, indices_TK, None
        backend = _resolve_backend(c.kernels, x_TD.device)
        if backend == "triton":
            import kernels  # lazy: moe works without triton installed

            weights_TK, indices_TK, counts_E = kernels.route(
                logits_TE, top_k=c.top_k, score_fn=c.score_fn, expert_bias=bias,
                n_groups=c.n_groups, topk_groups=c.topk_groups, route_scale=c.route_scale)
            # the kernel's counts: torch.bincount on CUDA would synchronise with the host
            return logits_TE, weights_TK, indices_TK, counts_E.to(torch.int64)
        weights_TK, indices_TK = route(
            logits_TE, top_k=c.top_k, score_fn=c.score_fn, expert_bias=bias,
            n_groups=c.n_groups, topk_groups=c.topk_groups, route_scale=c.route_scale)
        return logits_TE, weights_TK, indices_TK, None

    # ------------------------------------------------------------------ experts
    def routed_experts(self, x_TD, weights_TK, indices_TK, counts_E=None):
        """Dropless dispatch -> experts -> weighted combine. Returns (out_TD, counts_E);
        ``counts_E``: the router's per-expert counts when it has them (else computed)."""
        c = self.cfg
        backend = _resolve_backend(c.kernels, x_TD.device)
        if backend == "triton":
            import kernels

            # indices come from the router (in range by construction): the unchecked
            # composition runs without host synchronisations
            out_TD = kernels.routed_experts_unchecked(x_TD, weights_TK, indices_TK,
                                                      self.w13_ED2F, self.w2_EFD)
            if counts_E is None:  # forced-uniform routing bypasses the routing kernel
                counts_E = torch.bincount(indices_TK.reshape(-1), minlength=self.n_experts)
            return out_TD, counts_E
        x_MD, order_M, inv_M, counts_E, offsets_E = dispatch(x_TD, indices_TK, self.n_experts)
        if c.dispatch == "loop" or not grouped_mm_aligned(self.w2_EFD):
            # the reference: experts, then the weighted combine (also for shapes that
            # torch._grouped_mm refuses)
            y_MD = experts_loop(x_MD, counts_E, self.w13_ED2F, self.w2_EFD)
            return combine(y_MD, weights_TK, order_M, inv_M), counts_E
        # routing weights folded into the experts' activation; the combine is a plain sum
        weights_M = weights_by_row(weights_TK, order_M)
        y_MD = experts_grouped_mm(x_MD, offsets_E, self.w13_ED2F, self.w2_EFD, weights_M)
        return sum_per_token(y_MD, order_M, inv_M, indices_TK.shape[1]), counts_E

    # ------------------------------------------------------------------ forward
    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output_BSD, balance_loss) where balance_loss is a scalar to add to the loss."""
        c = self.cfg
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        logits_TE, weights_TK, indices_TK, counts_E = self._route(x_TD)
        out_TD, counts_E = self.routed_experts(x_TD, weights_TK, indices_TK, counts_E)
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
