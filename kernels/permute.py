"""Token permutation for MoE: copy tokens into expert-sorted rows, and the weighted
gather-sum back.

Shape legend: T tokens, K top_k, E experts, D hidden, S = T*K routed slots (slot t*K+k),
M rows of the expert-sorted buffer (M == S, or more with pad_to > 1), B slot blocks.

    counts_E    = histogram(indices)
    padded_E    = round_up(counts_E, pad_to)
    offsets_E   = cumsum(padded_E)                       int32 segment ENDS (torch._grouped_mm offs)
    row_map_TK  = offsets_E[e] - padded_E[e] + (rank of slot (t,k) among earlier slots of e)
                  -> stable within an expert by slot order t*K+k: deterministic
    permute:    x_MD[row_map[t, k]] = x_TD[t];  padding rows (pad_to > 1) are zero
    unpermute:  out_TD[t] = sum_k w_TK[t, k] * y_MD[row_map[t, k]]
Backward:
    permute:    dx_TD[t]  = sum_k dx_MD[row_map[t, k]]          (unpermute with unit weights)
    unpermute:  dy_MD[row_map[t, k]] = w[t, k] * dout[t]  (padding rows 0)
                dw_TK[t, k] = <y_MD[row_map[t, k]], dout[t]>

Bytes: permute reads S*D and writes M*D elements; unpermute reads M*D (+ T*K weights) and
writes T*D; unpermute's backward reads 2 S*D (dout, y) and writes M*D. No FLOPs to speak
of: GB/s is the figure of merit. The index work (two kernels over S slots + a cumsum over
a B x E histogram) is O(S*E/8) bytes, small next to the rows.

Order without a sort and without a host sync (vLLM moe_align_block_size has the same
idea): kernel 1 writes a per-block histogram hist_BE; torch.cumsum on the device turns it
into each block's first row per expert; kernel 2 ranks each slot inside its block with a
one-hot prefix sum, writes row_map and the inverse slot_of_row. The row copies are a
gather over output rows (each row written once, padding rows zero) and a per-token
gather-sum (no atomics, deterministic). The padded buffer has the static size
S + E*(pad_to - 1); rows past offsets_E[-1] are trailing padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_2d, check_float, check_index, check_same_device, check_shape

MAX_EXPERTS = 1024  # the rank kernel holds a (slots, next_pow2(E)) one-hot tile


# ------------------------------------------------------------------------------ reference
def permute_ref(x_TD, indices_TK, n_experts, pad_to=1):
    """Torch reference (stable argsort): (x_MD, row_map_TK int64, offsets_E int32)."""
    T, K = indices_TK.shape
    flat_S = indices_TK.reshape(-1)
    order_S = torch.argsort(flat_S, stable=True)
    counts_E = torch.bincount(flat_S, minlength=n_experts)
    padded_E = (counts_E + pad_to - 1) // pad_to * pad_to
    ends_E = torch.cumsum(padded_E, 0)
    # sorted position p of expert e -> padded row: p - unpadded start + padded start
    shift_E = (ends_E - padded_E) - (torch.cumsum(counts_E, 0) - counts_E)
    rows_S = torch.arange(T * K, device=x_TD.device) + shift_E[flat_S[order_S]]
    row_map_S = torch.empty_like(order_S)
    row_map_S[order_S] = rows_S
    M = T * K if pad_to == 1 else T * K + n_experts * (pad_to - 1)
    x_MD = x_TD.new_zeros(M, x_TD.shape[1])
    x_MD[row_map_S] = x_TD[torch.arange(T * K, device=x_TD.device) // K]
    return x_MD, row_map_S.view(T, K), ends_E.to(torch.int32)


def unpermute_ref(y_MD, row_map_TK, weights_TK, T):
    """Torch reference: out_TD = sum_k w[t, k] * y[row_map[t, k]] (computed in fp32)."""
    return (weights_TK.float().unsqueeze(-1) * y_MD[row_map_TK].float()).sum(1).to(y_MD.dtype)


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _slot_hist_kernel(idx_ptr, hist_ptr, S, E, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """hist[b, e] = number of slots of block b routed to expert e."""
    b = tl.program_id(0)
    s = b * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(idx_ptr + s, mask=s < S, other=-1)  # -1 matches no expert
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)
    tl.store(hist_ptr + b.to(tl.int64) * E + cols, tl.sum(onehot, axis=0), mask=cols < E)


@triton.jit
def _slot_rank_kernel(idx_ptr, base_ptr, row_map_ptr, slot_of_row_ptr, S, E,
                      BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """row = base[b, e] + (number of earlier slots of this block with the same expert)."""
    b = tl.program_id(0)
    s = b * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(idx_ptr + s, mask=smask, other=-1)
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)
    incl = tl.cumsum(onehot, axis=0)
    rank = tl.sum(onehot * incl, axis=1) - 1
    base = tl.load(base_ptr + b.to(tl.int64) * E + e, mask=smask, other=0)
    row = base + rank
    tl.store(row_map_ptr + s, row.to(tl.int64), mask=smask)
    tl.store(slot_of_row_ptr + row, s, mask=smask)


@triton.jit
def _gather_rows_kernel(x_ptr, slot_of_row_ptr, out_ptr, M, D, K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = x[slot_of_row[r] // K], or 0 where slot_of_row[r] < 0 (padding)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rm = r < M
    cm = c < D
    slot = tl.load(slot_of_row_ptr + r, mask=rm, other=-1)
    t = tl.where(slot >= 0, slot // K, 0).to(tl.int64)
    v = tl.load(x_ptr + t[:, None] * D + c[None, :], mask=(slot >= 0)[:, None] & cm[None, :],
                other=0.0)
    tl.store(out_ptr + r[:, None].to(tl.int64) * D + c[None, :], v, mask=rm[:, None] & cm[None, :])


@triton.jit
def _combine_kernel(y_ptr, row_map_ptr, w_ptr, out_ptr, T, D, K: tl.constexpr,
                    HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_k w[t, k] * y[row_map[t, k]], accumulated in fp32 in fixed k order."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    tm = t < T
    m2 = tm[:, None] & (c[None, :] < D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(row_map_ptr + t.to(tl.int64) * K + k, mask=tm, other=0)
        y = tl.load(y_ptr + row[:, None] * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + t.to(tl.int64) * K + k, mask=tm, other=0.0).to(tl.float32)
            y = w[:, None] * y
        acc += y
    tl.store(out_ptr + t[:, None].to(tl.int64) * D + c[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _combine_bwd_kernel(dout_ptr, y_ptr, row_map_ptr, w_ptr, dy_ptr, dw_ptr, S, D,
                        K: tl.constexpr, NEED_DY: tl.constexpr, NEED_DW: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pass over D per block of slots: dy[row] = w * dout[t] and dw = <y[row], dout[t]>."""
    pid = tl.program_id(0)
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    sm = s < S
    t = (s // K).to(tl.int64)
    row = tl.load(row_map_ptr + s, mask=sm, other=0)
    w = tl.load(w_ptr + s, mask=sm, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + tl.arange(0, BLOCK_D)
        m2 = sm[:, None] & (c[None, :] < D)
        g = tl.load(dout_ptr + t[:, None] * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
        if NEED_DY:
            tl.store(dy_ptr + row[:, None] * D + c[None, :],
                     (g * w[:, None]).to(dy_ptr.dtype.element_ty), mask=m2)
        if NEED_DW:
            y = tl.load(y_ptr + row[:, None] * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
            acc += tl.sum(g * y, axis=1)
    if NEED_DW:
        tl.store(dw_ptr + s, acc.to(dw_ptr.dtype.element_ty), mask=sm)


# ------------------------------------------------------------------------------ launchers
def _block_d(D):
    return min(256, triton.next_power_of_2(max(D, 16)))


def sort_slots(indices_TK, n_experts, pad_to):
    """Expert-sorted order from a histogram + prefix sums: (row_map_TK int64,
    slot_of_row_M int32 with -1 on padding rows, offsets_E int32). No host sync."""
    T, K = indices_TK.shape
    S, E, dev = T * K, n_experts, indices_TK.device
    idx_S = indices_TK.reshape(-1).contiguous()
    BLOCK_E = triton.next_power_of_2(E)
    # one-hot tile of ~8K int32 per program (E=256 -> 32 slots)
    BLOCK_S = max(16, min(256, 8192 // BLOCK_E))
    nb = triton.cdiv(S, BLOCK_S)
    hist_BE = torch.empty(nb, E, device=dev, dtype=torch.int32)
    if nb:
        _slot_hist_kernel[(nb,)](idx_S, hist_BE, S, E, BLOCK_S=BLOCK_S, BLOCK_E=BLOCK_E)
    counts_E = hist_BE.sum(0)
    padded_E = (counts_E + pad_to - 1) // pad_to * pad_to
    ends_E = torch.cumsum(padded_E, 0)
    base_BE = ((ends_E - padded_E)[None, :] + torch.cumsum(hist_BE, 0) - hist_BE).to(torch.int32)
    M = S if pad_to == 1 else S + E * (pad_to - 1)
    row_map_S = torch.empty(S, device=dev, dtype=torch.int64)
    # every row is some slot's unless padded: only then prefill the -1 sentinel
    if pad_to == 1:
        slot_of_row_M = torch.empty(M, device=dev, dtype=torch.int32)
    else:
        slot_of_row_M = torch.full((M,), -1, device=dev, dtype=torch.int32)
    if nb:
        _slot_rank_kernel[(nb,)](idx_S, base_BE, row_map_S, slot_of_row_M, S, E,
                                 BLOCK_S=BLOCK_S, BLOCK_E=BLOCK_E)
    return row_map_S.view(T, K), slot_of_row_M, ends_E.to(torch.int32)


def _gather_rows(x_TD, slot_of_row_M, K):
    M, D = slot_of_row_M.numel(), x_TD.shape[1]
    out = torch.empty(M, D, device=x_TD.device, dtype=x_TD.dtype)
    BM, BD = 32, _block_d(D)
    if M:
        _gather_rows_kernel[(triton.cdiv(M, BM), triton.cdiv(D, BD))](
            x_TD, slot_of_row_M, out, M, D, K=K, BLOCK_M=BM, BLOCK_D=BD)
    return out


def combine_rows(y_MD, row_map_TK, w_TK, out_dtype):
    """out_TD[t] = sum_k w_TK[t, k] * y_MD[row_map_TK[t, k]] (w None: plain sum), fp32
    accumulation, in ``out_dtype``. No autograd, no checks (the kernels' shared gather-sum)."""
    (T, K), D = row_map_TK.shape, y_MD.shape[1]
    out = torch.empty(T, D, device=y_MD.device, dtype=out_dtype)
    BT, BD = 16, _block_d(D)
    if T:
        _combine_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BD))](
            y_MD, row_map_TK, w_TK if w_TK is not None else y_MD, out, T, D, K=K,
            HAS_W=w_TK is not None, BLOCK_T=BT, BLOCK_D=BD)
    return out


def _combine_bwd(dout_TD, y_MD, row_map_TK, w_TK, need_dy, need_dw):
    (T, K), (M, D) = row_map_TK.shape, y_MD.shape
    S = T * K
    # padding rows of dy must be 0 (the expert GEMM backward reads whole segments)
    dy = ((torch.zeros if M > S else torch.empty)(M, D, device=y_MD.device, dtype=y_MD.dtype)
          if need_dy else None)
    dw = torch.empty(T, K, device=y_MD.device, dtype=w_TK.dtype) if need_dw else None
    BS, BD = 16, _block_d(D)
    if S:
        _combine_bwd_kernel[(triton.cdiv(S, BS),)](
            dout_TD, y_MD, row_map_TK, w_TK, dy if need_dy else y_MD,
            dw if need_dw else w_TK, S, D, K=K, NEED_DY=need_dy, NEED_DW=need_dw,
            BLOCK_S=BS, BLOCK_D=BD)
    return dy, dw


# ------------------------------------------------------------------------------ autograd
class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, slot_of_row_M, row_map_TK):
        ctx.save_for_backward(row_map_TK)
        return _gather_rows(x_TD, slot_of_row_M, row_map_TK.shape[1])

    @staticmethod
    def backward(ctx, dx_MD):
        (row_map_TK,) = ctx.saved_tensors
        return combine_rows(dx_MD.contiguous(), row_map_TK, None, dx_MD.dtype), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MD, row_map_TK, w_TK):
        ctx.save_for_backward(y_MD, row_map_TK, w_TK)
        return combine_rows(y_MD, row_map_TK, w_TK, y_MD.dtype)

    @staticmethod
    def backward(ctx, dout_TD):
        y_MD, row_map_TK, w_TK = ctx.saved_tensors
        dy, dw = _combine_bwd(dout_TD.contiguous(), y_MD, row_map_TK, w_TK,
                              ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return dy, None, dw


def permute_unchecked(x_TD, indices_TK, n_experts, pad_to=1):
    """Unchecked permute (for callers whose indices are valid by construction)."""
    row_map_TK, slot_of_row_M, offsets_E = sort_slots(indices_TK, n_experts, pad_to)
    x_MD = _Permute.apply(x_TD.contiguous(), slot_of_row_M, row_map_TK)
    return x_MD, row_map_TK, offsets_E


def unpermute_unchecked(y_MD, row_map_TK, weights_TK):
    """Unchecked :func:`unpermute` (row_map_TK int64 from permute; T from its shape)."""
    return _Unpermute.apply(y_MD.contiguous(), row_map_TK.contiguous(), weights_TK.contiguous())


# ------------------------------------------------------------------------------ public
def permute(x_TD: torch.Tensor, indices_TK: torch.Tensor, n_experts: int, pad_to: int = 1):
    """Copy each token once per chosen expert into expert-sorted rows.

    Args:
        x_TD: (T, D) float tensor (made contiguous if it is not).
        indices_TK: (T, K) int32/int64 expert ids in [0, n_experts); a token's K ids are
            normally distinct (duplicates are allowed: each slot gets its own row).
        n_experts: E (<= 1024).
        pad_to: round each expert's segment up to a multiple of this (e.g. the GEMM
            BLOCK_M); padding rows are zero. The buffer then has the static size
            T*K + E*(pad_to-1) rows; rows past offsets_E[-1] are trailing padding.
    Returns:
        (x_MD differentiable w.r.t. x_TD; row_map_TK int64, the row of slot (t, k);
         offsets_E int32 cumulative segment ENDS, the format torch._grouped_mm takes).
    Validation reads min/max of the indices (one host sync); the forward itself has none.
    """
    check_float("x_TD", x_TD)
    check_2d("x_TD", x_TD, "(tokens, hidden)")
    check_2d("indices_TK", indices_TK, "(tokens, top_k)")
    if x_TD.shape[0] != indices_TK.shape[0]:
        raise ValueError(f"x_TD {tuple(x_TD.shape)} and indices_TK {tuple(indices_TK.shape)} "
                         "have different numbers of tokens")
    if not isinstance(n_experts, int) or not 1 <= n_experts <= MAX_EXPERTS:
        raise ValueError(f"n_experts={n_experts!r} is invalid: allowed 1..{MAX_EXPERTS}")
    if not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to={pad_to!r} is invalid: allowed an int >= 1")
    check_index("indices_TK", indices_TK, n_experts)
    check_same_device(x_TD=x_TD, indices_TK=indices_TK)
    return permute_unchecked(x_TD, indices_TK, n_experts, pad_to)


def unpermute(y_MD: torch.Tensor, row_map_TK: torch.Tensor, weights_TK: torch.Tensor,
              T: int) -> torch.Tensor:
    """Weighted gather-sum back to tokens: out_TD[t] = sum_k weights[t, k] * y_MD[row_map[t, k]].

    y_MD (M, D) float; row_map_TK (T, K) int64/int32 from ``permute``; weights_TK (T, K)
    float (fp32 recommended: it is read as fp32). Output has y's dtype, accumulated in fp32
    in fixed k order (no atomics: deterministic). Differentiable w.r.t. y_MD and weights_TK.
    """
    check_float("y_MD", y_MD)
    check_float("weights_TK", weights_TK)
    check_2d("y_MD", y_MD, "(rows, hidden)")
    check_2d("row_map_TK", row_map_TK, "(tokens, top_k)")
    check_shape("row_map_TK", row_map_TK, (T, row_map_TK.shape[1]))
    check_shape("weights_TK", weights_TK, tuple(row_map_TK.shape))
    if y_MD.shape[0] < row_map_TK.numel():
        raise ValueError(f"y_MD has {y_MD.shape[0]} rows: expected at least T*K = "
                         f"{row_map_TK.numel()}")
    check_index("row_map_TK", row_map_TK, y_MD.shape[0])
    check_same_device(y_MD=y_MD, row_map_TK=row_map_TK, weights_TK=weights_TK)
    return unpermute_unchecked(y_MD, row_map_TK.long(), weights_TK)
