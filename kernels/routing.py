"""Fused MoE routing: logits -> scores -> biased group-limited top-k -> gates + counts.

Shape legend: T tokens, E routed experts, K top_k, G expert groups.

Math (identical to the model's torch ``moe.moe_layer.router.route``; see docs/model.md,
"Gating"):
    s_TE   = sigmoid(l) | softmax(l)                      fp32 always
    sel_TE = s + b                                        the bias chooses, never weighs
    if G > 1: group score = sum of the top-2 of sel in each group of E/G contiguous experts
              (DeepSeek-V3 rule; a 1-expert group scores its single value); keep the best
              topk_groups groups (ties: lowest group id); other groups' sel -> -inf
    idx_TK = top-k of sel, ordered by (sel desc, expert id asc): ties go to the lowest id
    g_TK   = s[idx];  g /= (sum_k g + 1e-20) if K > 1    (K == 1 is left unnormalised: it
             would make every gate 1.0 and cut the router off from the gradient)
    w_TK   = route_scale * g                              fp32
    counts_E = histogram of idx                           int32
Backward (to the logits, none through the selection):
    dg_k = rs * (dw_k / S - sum_j dw_j g_j / S^2)  (S = sum g + 1e-20; dg = rs * dw if K == 1)
    ds_e = dg_k where idx_k == e, else 0
    dl   = ds * s * (1 - s)                 (sigmoid)
         = s * (ds - sum_e ds_e s_e)        (softmax)

Bytes and FLOPs per token: forward reads E logits (4E bytes fp32) and writes K weights +
K indices (12K bytes); backward reads E logits + 12K and writes E grads. ~O(E*(K + 2G))
compares per token for the iterated arg-max: memory bound, so GB/s is the figure of merit.

Forward: one Triton program per block of tokens holding whole expert rows in registers
(E padded to a power of two with -inf); top-k is K rounds of arg-max taking the lowest
index among equal maxima, so kernel and reference agree on ties. The per-expert counts
are accumulated in the same kernel with integer atomics (exact, so deterministic).
Backward: one program per block of tokens recomputes s from the logits (cheaper than
saving a T x E fp32 tensor) and scatters the K gate gradients into the row.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._checks import check_2d, check_float, check_route_args, check_shape

MAX_EXPERTS = 1024  # a (BLOCK_T, next_pow2(E)) fp32 tile must fit in registers
MAX_TOP_K = 64      # the arg-max loop is unrolled K times


# ------------------------------------------------------------------------------ reference
def route_ref(logits_TE, *, top_k, score_fn="sigmoid", expert_bias=None, n_groups=1,
              topk_groups=1, route_scale=1.0):
    """Plain-torch REFERENCE of :func:`route` for tests and benchmarks (the model routes
    with ``moe.moe_layer.router``): (weights_TK fp32, indices_TK int64, tokens_per_expert_E
    int32).

    Uses a stable descending sort (not torch.topk, whose tie order is unspecified) so the
    lowest expert id wins ties, exactly like the kernel."""
    T, E = logits_TE.shape
    s_TE = (torch.sigmoid(logits_TE.float()) if score_fn == "sigmoid"
            else torch.softmax(logits_TE.float(), -1))
    sel_TE = s_TE.detach() + (expert_bias.float() if expert_bias is not None else 0.0)
    if n_groups > 1:
        GS = E // n_groups
        score_TG = sel_TE.view(T, n_groups, GS).topk(min(2, GS), dim=-1).values.sum(-1)
        keep_TG = torch.sort(score_TG, dim=-1, descending=True,
                             stable=True).indices[:, :topk_groups]
        mask_TG = torch.zeros_like(score_TG, dtype=torch.bool).scatter_(1, keep_TG, True)
        sel_TE = sel_TE.masked_fill(~mask_TG.repeat_interleave(GS, dim=1), float("-inf"))
    idx_TK = torch.sort(sel_TE, dim=-1, descending=True, stable=True).indices[:, :top_k]
    g_TK = s_TE.gather(1, idx_TK)
    if top_k > 1:
        g_TK = g_TK / (g_TK.sum(-1, keepdim=True) + 1e-20)
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E).to(torch.int32)
    return g_TK * route_scale, idx_TK, counts_E


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _scores(logits_ptr, rows, cols, rmask, cmask, stride_t, SOFTMAX: tl.constexpr):
    """fp32 scores of a (BLOCK_T, BLOCK_E) tile; padded lanes score 0."""
    # masked lanes load 0 (not -inf): rows past T would otherwise give -inf - -inf = NaN
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if SOFTMAX:
        x = tl.where(cmask[None, :], x, float("-inf"))
        ex = tl.exp(x - tl.max(x, axis=1)[:, None])
        ex = tl.where(cmask[None, :], ex, 0.0)
        s = ex / tl.sum(ex, axis=1)[:, None]
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
    return tl.where(cmask[None, :], s, 0.0)


@triton.jit
def _route_fwd_kernel(logits_ptr, bias_ptr, w_ptr, idx_ptr, counts_ptr, T, E, stride_t,
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
    s = _scores(logits_ptr, rows, cols, rmask, cmask, stride_t, SOFTMAX)
    sel = s
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        sel = sel + b[None, :]
    neg_inf = float("-inf")
    sel = tl.where(cmask[None, :], sel, neg_inf)
    big = BLOCK_E + 1  # larger than any column index: loses every lowest-index contest
    if N_GROUPS > 1:
        gcol = cols // GROUP_SIZE
        gids = tl.arange(0, BLOCK_G)
        gscore = tl.full((BLOCK_T, BLOCK_G), neg_inf, tl.float32)
        # Group sizes need not be powers of two (E = 24, G = 6), so groups are masks over
        # the row rather than a reshape: G masked max-reductions per token.
        for g in tl.static_range(N_GROUPS):
            v = tl.where(((gcol == g) & cmask)[None, :], sel, neg_inf)
            m1 = tl.max(v, axis=1)
            if GROUP_SIZE > 1:
                i1 = tl.min(tl.where(v == m1[:, None], cols[None, :], big), axis=1)
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
        sel = tl.where(keep, sel, neg_inf)  # -inf, not 0: biased scores can be negative
    kcols = tl.arange(0, BLOCK_K)
    gates = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    chosen = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    picked = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
    for j in tl.static_range(K):
        m = tl.max(sel, axis=1)
        i = tl.min(tl.where(sel == m[:, None], cols[None, :], big), axis=1)
        hit = cols[None, :] == i[:, None]
        gj = tl.sum(tl.where(hit, s, 0.0), axis=1)
        gates = tl.where(kcols[None, :] == j, gj[:, None], gates)
        chosen = tl.where(kcols[None, :] == j, i[:, None], chosen)
        picked += hit.to(tl.int32)
        sel = tl.where(hit, neg_inf, sel)
    if NORMALIZE:
        gates = gates / (tl.sum(gates, axis=1)[:, None] + 1e-20)
    gates = gates * route_scale
    om = rmask[:, None] & (kcols[None, :] < K)
    out_off = rows[:, None].to(tl.int64) * K + kcols[None, :]
    tl.store(w_ptr + out_off, gates, mask=om)
    tl.store(idx_ptr + out_off, chosen.to(tl.int64), mask=om)
    # integer atomics commute exactly: the histogram is deterministic
    cnt = tl.sum(tl.where(rmask[:, None], picked, 0), axis=0)
    tl.atomic_add(counts_ptr + cols, cnt, mask=cmask)


@triton.jit
def _route_bwd_kernel(logits_ptr, idx_ptr, dw_ptr, dl_ptr, T, E, stride_t, route_scale,
                      K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                      SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    s = _scores(logits_ptr, rows, cols, rmask, cmask, stride_t, SOFTMAX)
    base = rows.to(tl.int64) * K
    gsum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    gdot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if NORMALIZE:
        for j in tl.static_range(K):
            ij = tl.load(idx_ptr + base + j, mask=rmask, other=0)
            dwj = tl.load(dw_ptr + base + j, mask=rmask, other=0.0).to(tl.float32)
            gj = tl.sum(tl.where(cols[None, :] == ij[:, None], s, 0.0), axis=1)
            gsum += gj
            gdot += dwj * gj
        gsum += 1e-20
    ds = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(K):
        ij = tl.load(idx_ptr + base + j, mask=rmask, other=0)
        dwj = tl.load(dw_ptr + base + j, mask=rmask, other=0.0).to(tl.float32)
        if NORMALIZE:
            dgj = route_scale * (dwj / gsum - gdot / (gsum * gsum))
        else:
            dgj = route_scale * dwj
        # the K indices of a token are distinct, so this is a plain scatter
        ds = tl.where(cols[None, :] == ij[:, None], dgj[:, None], ds)
    if SOFTMAX:
        dl = s * (ds - tl.sum(ds * s, axis=1)[:, None])
    else:
        dl = ds * s * (1.0 - s)
    tl.store(dl_ptr + rows[:, None].to(tl.int64) * E + cols[None, :],
             dl.to(dl_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# ------------------------------------------------------------------------------ launchers
def _blocks(E):
    BLOCK_E = triton.next_power_of_2(E)
    # ~4096 fp32 per tile: E=256 -> 16 tokens per program (32 values per thread at 4 warps)
    BLOCK_T = max(1, min(64, 4096 // BLOCK_E))
    return BLOCK_T, BLOCK_E


def _route_fwd(logits_TE, bias_E, top_k, softmax, n_groups, topk_groups, route_scale):
    T, E = logits_TE.shape
    dev = logits_TE.device
    w_TK = torch.empty(T, top_k, device=dev, dtype=torch.float32)
    idx_TK = torch.empty(T, top_k, device=dev, dtype=torch.int64)
    counts_E = torch.zeros(E, device=dev, dtype=torch.int32)
    BLOCK_T, BLOCK_E = _blocks(E)
    _route_fwd_kernel[(triton.cdiv(T, BLOCK_T),)](
        logits_TE, bias_E if bias_E is not None else logits_TE, w_TK, idx_TK, counts_E,
        T, E, logits_TE.stride(0), float(route_scale),
        K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E,
        SOFTMAX=softmax, HAS_BIAS=bias_E is not None, N_GROUPS=n_groups,
        BLOCK_G=triton.next_power_of_2(n_groups), TOPK_GROUPS=topk_groups,
        GROUP_SIZE=E // n_groups, NORMALIZE=top_k > 1, num_warps=4)
    return w_TK, idx_TK, counts_E


def _route_bwd(logits_TE, idx_TK, dw_TK, softmax, route_scale):
    T, E = logits_TE.shape
    K = idx_TK.shape[1]
    dl_TE = torch.empty_like(logits_TE)
    BLOCK_T, BLOCK_E = _blocks(E)
    _route_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
        logits_TE, idx_TK, dw_TK, dl_TE, T, E, logits_TE.stride(0), float(route_scale),
        K=K, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, SOFTMAX=softmax, NORMALIZE=K > 1, num_warps=4)
    return dl_TE


# ------------------------------------------------------------------------------ autograd
class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, top_k, score_fn, n_groups, topk_groups, route_scale):
        w_TK, idx_TK, counts_E = _route_fwd(logits_TE, bias_E, top_k, score_fn == "softmax",
                                            n_groups, topk_groups, route_scale)
        ctx.save_for_backward(logits_TE, idx_TK)
        ctx.cfg = (score_fn == "softmax", route_scale)
        ctx.mark_non_differentiable(idx_TK, counts_E)
        return w_TK, idx_TK, counts_E

    @staticmethod
    def backward(ctx, dw_TK, _d_idx, _d_counts):
        logits_TE, idx_TK = ctx.saved_tensors
        softmax, route_scale = ctx.cfg
        dl_TE = _route_bwd(logits_TE, idx_TK, dw_TK.float().contiguous(), softmax, route_scale)
        return dl_TE, None, None, None, None, None, None


# ------------------------------------------------------------------------------ public
def route(logits_TE: torch.Tensor, *, top_k: int, score_fn: str = "sigmoid",
          expert_bias: Optional[torch.Tensor] = None, n_groups: int = 1, topk_groups: int = 1,
          route_scale: float = 1.0):
    """Fused router (see the module docstring for the exact math and tie rule).

    Args:
        logits_TE: router logits, fp32/bf16/fp16, (T, E); made contiguous if it is not.
        top_k: experts per token, 1..min(E, 64, topk_groups * E / n_groups).
        score_fn: "sigmoid" (DeepSeek-V3) or "softmax" (Mixtral, Qwen, OLMoE).
        expert_bias: optional (E,) float bias added to the scores for SELECTION only.
        n_groups, topk_groups: group-limited routing (n_groups must divide E).
        route_scale: multiplies the (normalised) gates.
    Returns:
        (weights_TK fp32, differentiable w.r.t. logits_TE; indices_TK int64;
         tokens_per_expert_E int32). No host synchronisation.
    """
    check_float("logits_TE", logits_TE)
    check_2d("logits_TE", logits_TE, "(tokens, experts)")
    T, E = logits_TE.shape
    if score_fn not in ("sigmoid", "softmax"):
        raise ValueError(f"score_fn={score_fn!r} is invalid: allowed 'sigmoid' or 'softmax'")
    check_route_args(E, top_k, n_groups, topk_groups)
    if E > MAX_EXPERTS:
        raise ValueError(f"E={E} experts is unsupported: the routing kernel keeps a row in "
                         f"registers (E <= {MAX_EXPERTS})")
    if top_k > MAX_TOP_K:
        raise ValueError(f"top_k={top_k} is unsupported by the routing kernel (<= {MAX_TOP_K})")
    if expert_bias is not None:
        check_float("expert_bias", expert_bias)
        check_shape("expert_bias", expert_bias, (E,))
        if expert_bias.device != logits_TE.device:
            raise ValueError(f"expert_bias is on {expert_bias.device}, "
                             f"logits on {logits_TE.device}")
        expert_bias = expert_bias.detach().float().contiguous()
    return _Route.apply(logits_TE.contiguous(), expert_bias, top_k, score_fn, n_groups,
                        topk_groups, route_scale)
