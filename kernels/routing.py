"""Fused MoE routing: logits -> scores -> biased group-limited top-k -> gates.

Shape legend: T tokens, E routed experts, K top_k, G expert groups.

Math (identical to ``moe.router.route``; see ../shared/SPEC.md):
    s_TE   = sigmoid(l) | softmax(l)                fp32
    sel_TE = s + b                                  bias chooses, never weighs
    group score = top-2 sum of sel in the group; keep topk_groups groups (ties: lowest id);
    other groups -> -inf
    idx_TK = top-k of sel (ties: lowest expert id), ordered by (sel desc, id asc)
    g_TK   = s[idx]; g /= sum(g) if K > 1; w = route_scale * g
    counts_E = histogram of idx

Bytes and FLOPs: reads T*E logits (+E bias), writes T*K weights and indices: memory bound,
~(4E + 12K) bytes per token; O(E*K) compares per token for the iterative arg-max.

Forward is one Triton program per block of tokens holding whole expert rows in registers
(E padded to a power of two with -inf); top-k is K rounds of arg-max taking the lowest
index among equal maxima. Backward (to the logits) is computed in torch from the saved
indices: it is T*K gathers and one score-function backward, not worth a kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._checks import check_float, check_route_args, check_shape


# ------------------------------------------------------------------------------ reference
def route_ref(logits_TE, *, top_k, score_fn="sigmoid", expert_bias=None, n_groups=1,
              topk_groups=1, route_scale=1.0):
    """Plain torch reference (loops only over groups): (weights_TK, indices_TK, counts_E)."""
    T, E = logits_TE.shape
    s = torch.sigmoid(logits_TE.float()) if score_fn == "sigmoid" else torch.softmax(logits_TE.float(), -1)
    sel = s.detach() + (expert_bias.float() if expert_bias is not None else 0.0)
    if n_groups > 1:
        gs = sel.view(T, n_groups, E // n_groups)
        score_TG = gs.topk(min(2, E // n_groups), dim=-1).values.sum(-1)
        keep = torch.sort(score_TG, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        mask = torch.zeros_like(score_TG, dtype=torch.bool).scatter_(1, keep, True)
        sel = sel.masked_fill(~mask.repeat_interleave(E // n_groups, dim=1), float("-inf"))
    idx = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :top_k]
    g = s.gather(1, idx)
    if top_k > 1:
        g = g / (g.sum(-1, keepdim=True) + 1e-20)
    return g * route_scale, idx, torch.bincount(idx.reshape(-1), minlength=E).to(torch.int32)


# ------------------------------------------------------------------------------ kernel
@triton.jit
def _route_fwd_kernel(logits_ptr, bias_ptr, w_ptr, idx_ptr, T, E, stride_t,
                      route_scale,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_E: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                      N_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                      GROUP_SIZE: tl.constexpr, NORMALIZE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    # masked lanes load 0 (not -inf): rows past T would otherwise give -inf - -inf = NaN
    x = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=m2,
                other=0.0).to(tl.float32)
    if SOFTMAX:
        x = tl.where(cmask[None, :], x, float("-inf"))
        mx = tl.max(x, axis=1)
        ex = tl.exp(x - mx[:, None])
        ex = tl.where(cmask[None, :], ex, 0.0)
        s = ex / tl.sum(ex, axis=1)[:, None]
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
    s = tl.where(cmask[None, :], s, 0.0)
    sel = s
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        sel = sel + b[None, :]
    neg_inf = float("-inf")
    sel = tl.where(cmask[None, :], sel, neg_inf)
    big = BLOCK_E + 1
    if N_GROUPS > 1:
        gcol = cols // GROUP_SIZE
        gids = tl.arange(0, BLOCK_G)
        gscore = tl.full((BLOCK_T, BLOCK_G), neg_inf, tl.float32)
        for g in tl.static_range(N_GROUPS):
            in_g = (gcol == g)[None, :] & cmask[None, :]
            v = tl.where(in_g, sel, neg_inf)
            m1 = tl.max(v, axis=1)
            i1 = tl.min(tl.where(v == m1[:, None], cols[None, :], big), axis=1)
            if GROUP_SIZE > 1:
                v2 = tl.where(cols[None, :] == i1[:, None], neg_inf, v)
                tot = m1 + tl.max(v2, axis=1)
            else:
                tot = m1
            gscore = tl.where(gids[None, :] == g, tot[:, None], gscore)
        keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUPS):
            gm = tl.max(gscore, axis=1)
            gi = tl.min(tl.where(gscore == gm[:, None], gids[None, :], BLOCK_G + 1), axis=1)
            keep = keep | (gcol[None, :] == gi[:, None])
            gscore = tl.where(gids[None, :] == gi[:, None], neg_inf, gscore)
        sel = tl.where(keep, sel, neg_inf)
    kcols = tl.arange(0, BLOCK_K)
    gates = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    chosen = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(K):
        m = tl.max(sel, axis=1)
        i = tl.min(tl.where(sel == m[:, None], cols[None, :], big), axis=1)
        hit = cols[None, :] == i[:, None]
        gj = tl.sum(tl.where(hit, s, 0.0), axis=1)
        gates = tl.where(kcols[None, :] == j, gj[:, None], gates)
        chosen = tl.where(kcols[None, :] == j, i[:, None], chosen)
        sel = tl.where(hit, neg_inf, sel)
    if NORMALIZE:
        gates = gates / (tl.sum(gates, axis=1)[:, None] + 1e-20)
    gates = gates * route_scale
    om = rmask[:, None] & (kcols[None, :] < K)
    tl.store(w_ptr + rows[:, None] * K + kcols[None, :], gates, mask=om)
    tl.store(idx_ptr + rows[:, None] * K + kcols[None, :], chosen.to(tl.int64), mask=om)


# ------------------------------------------------------------------------------ launcher
def _route_fwd(logits_TE, bias, top_k, softmax, n_groups, topk_groups, route_scale):
    T, E = logits_TE.shape
    w = torch.empty(T, top_k, device=logits_TE.device, dtype=torch.float32)
    idx = torch.empty(T, top_k, device=logits_TE.device, dtype=torch.int64)
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_T = max(1, min(64, 4096 // BLOCK_E))
    grid = (triton.cdiv(T, BLOCK_T),)
    _route_fwd_kernel[grid](
        logits_TE, bias if bias is not None else logits_TE, w, idx, T, E, logits_TE.stride(0),
        float(route_scale), K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_T=BLOCK_T,
        BLOCK_E=BLOCK_E, SOFTMAX=softmax, HAS_BIAS=bias is not None, N_GROUPS=n_groups,
        BLOCK_G=triton.next_power_of_2(n_groups), TOPK_GROUPS=topk_groups,
        GROUP_SIZE=E // n_groups, NORMALIZE=top_k > 1)
    return w, idx


# ------------------------------------------------------------------------------ autograd
class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias, top_k, score_fn, n_groups, topk_groups, route_scale):
        w, idx = _route_fwd(logits_TE, bias, top_k, score_fn == "softmax", n_groups,
                            topk_groups, route_scale)
        ctx.save_for_backward(logits_TE, idx)
        ctx.cfg = (top_k, score_fn, route_scale)
        ctx.mark_non_differentiable(idx)
        return w, idx

    @staticmethod
    def backward(ctx, g_w, _g_idx):
        logits_TE, idx = ctx.saved_tensors
        top_k, score_fn, route_scale = ctx.cfg
        with torch.enable_grad():
            l = logits_TE.detach().float().requires_grad_(True)
            s = torch.sigmoid(l) if score_fn == "sigmoid" else torch.softmax(l, -1)
            g = s.gather(1, idx)
            if top_k > 1:
                g = g / (g.sum(-1, keepdim=True) + 1e-20)
            (grad,) = torch.autograd.grad(g * route_scale, l, g_w)
        return grad.to(logits_TE.dtype), None, None, None, None, None, None


# ------------------------------------------------------------------------------ public
def route(logits_TE: torch.Tensor, *, top_k: int, score_fn: str = "sigmoid",
          expert_bias: Optional[torch.Tensor] = None, n_groups: int = 1, topk_groups: int = 1,
          route_scale: float = 1.0):
    """Fused router. Returns (weights_TK fp32, indices_TK int64, tokens_per_expert_E int32);
    weights are differentiable w.r.t. ``logits_TE``."""
    check_float("logits_TE", logits_TE)
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be 2-D (tokens, experts), got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if score_fn not in ("sigmoid", "softmax"):
        raise ValueError(f"score_fn={score_fn!r} is invalid: allowed 'sigmoid' or 'softmax'")
    check_route_args(E, top_k, n_groups, topk_groups)
    if E > 1024:
        raise ValueError(f"E={E} experts is unsupported: the routing kernel keeps a row in "
                         "registers (E <= 1024)")
    if expert_bias is not None:
        check_shape("expert_bias", expert_bias, (E,))
        check_float("expert_bias", expert_bias)
        expert_bias = expert_bias.float().contiguous()
    logits_TE = logits_TE.contiguous()
    w, idx = _Route.apply(logits_TE, expert_bias, top_k, score_fn, n_groups, topk_groups,
                          route_scale)
    counts = torch.bincount(idx.reshape(-1), minlength=E).to(torch.int32)
    return w, idx, counts
