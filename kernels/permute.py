"""Token permutation for MoE: gather token copies into expert-sorted order, and the
weighted gather-sum back.

Shape legend: T tokens, K top_k, E experts, D hidden, M = T*K routed rows.

    order_M    = stable sort of the T*K slots by expert (slot t*K+k keeps token order
                 within an expert, so results are deterministic)
    offsets_E  = cumsum(histogram(indices))          int32 segment ENDS (torch._grouped_mm offs)
    row_map_TK[t, k] = position of slot (t, k) in the sorted order
    permute:   x_MD[r]   = x_TD[order_M[r] // K]
    unpermute: out_TD[t] = sum_k w_TK[t, k] * y_MD[row_map_TK[t, k]]

Bytes: permute moves M*D elements (read + write), unpermute reads M*D and writes T*D;
no FLOPs to speak of, so GB/s is the figure of merit. The order is built with torch's
on-device sort/bincount/cumsum (no host synchronisation); the row moves are Triton
kernels. unpermute is a gather-sum per token (no atomics: deterministic).
Backward: permute's is unpermute with unit weights; unpermute's is a scaled gather for
y and a row-wise dot product for the weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float, check_index, check_same_device, check_shape


# ------------------------------------------------------------------------------ reference
def permute_ref(x_TD, indices_TK, n_experts):
    """Torch reference: (x_MD, row_map_TK, offsets_E)."""
    T, K = indices_TK.shape
    order = torch.argsort(indices_TK.reshape(-1), stable=True)
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    offsets = torch.cumsum(torch.bincount(indices_TK.reshape(-1), minlength=n_experts), 0)
    return x_TD[order // K], row_map.view(T, K), offsets.to(torch.int32)


def unpermute_ref(y_MD, row_map_TK, weights_TK, T):
    """Torch reference: out_TD = sum_k w[t, k] * y[row_map[t, k]]."""
    return (weights_TK.unsqueeze(-1).to(y_MD.dtype) * y_MD[row_map_TK]).sum(1)


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _gather_rows_kernel(src_ptr, out_ptr, src_row_ptr, scale_ptr, M, D,
                        HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r, :] = src[src_row[r], :] (* scale[r])."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rm = r < M
    m2 = rm[:, None] & (c[None, :] < D)
    src = tl.load(src_row_ptr + r, mask=rm, other=0)
    v = tl.load(src_ptr + src[:, None] * D + c[None, :], mask=m2, other=0.0)
    if HAS_SCALE:
        s = tl.load(scale_ptr + r, mask=rm, other=0.0)
        v = (v.to(tl.float32) * s[:, None]).to(v.dtype)
    tl.store(out_ptr + r[:, None] * D + c[None, :], v, mask=m2)


@triton.jit
def _combine_kernel(y_ptr, row_map_ptr, w_ptr, out_ptr, T, D, K: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, :] = sum_k w[t, k] * y[row_map[t, k], :] accumulated in fp32."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    tm = t < T
    m2 = tm[:, None] & (c[None, :] < D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(row_map_ptr + t * K + k, mask=tm, other=0)
        w = tl.load(w_ptr + t * K + k, mask=tm, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row[:, None] * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += w[:, None] * y
    tl.store(out_ptr + t[:, None] * D + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=m2)


# ------------------------------------------------------------------------------ launchers
def _gather_rows(src, src_row, scale=None):
    M, D = src_row.numel(), src.shape[1]
    out = torch.empty(M, D, device=src.device, dtype=src.dtype)
    BM, BD = 32, min(128, triton.next_power_of_2(max(D, 16)))
    grid = (triton.cdiv(M, BM), triton.cdiv(D, BD))
    _gather_rows_kernel[grid](src, out, src_row, scale if scale is not None else src, M, D,
                              HAS_SCALE=scale is not None, BLOCK_M=BM, BLOCK_D=BD)
    return out


def _combine(y_MD, row_map_TK, w_TK, T):
    D, K = y_MD.shape[1], row_map_TK.shape[1]
    out = torch.empty(T, D, device=y_MD.device, dtype=y_MD.dtype)
    BT, BD = 32, min(128, triton.next_power_of_2(max(D, 16)))
    grid = (triton.cdiv(T, BT), triton.cdiv(D, BD))
    _combine_kernel[grid](y_MD, row_map_TK, w_TK, out, T, D, K=K, BLOCK_T=BT, BLOCK_D=BD)
    return out


def _sort_slots(indices_TK, n_experts):
    T, K = indices_TK.shape
    flat = indices_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    offsets = torch.cumsum(torch.bincount(flat, minlength=n_experts), 0).to(torch.int32)
    return order, row_map.view(T, K), offsets


# ------------------------------------------------------------------------------ autograd
class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, src_row_M, row_map_TK):
        ctx.save_for_backward(row_map_TK)
        return _gather_rows(x_TD, src_row_M)

    @staticmethod
    def backward(ctx, g_MD):
        (row_map_TK,) = ctx.saved_tensors
        ones = torch.ones(row_map_TK.shape, device=g_MD.device, dtype=torch.float32)
        return _combine(g_MD.contiguous(), row_map_TK, ones, row_map_TK.shape[0]), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MD, row_map_TK, w_TK):
        ctx.save_for_backward(y_MD, row_map_TK, w_TK)
        return _combine(y_MD, row_map_TK, w_TK, row_map_TK.shape[0])

    @staticmethod
    def backward(ctx, g_TD):
        y_MD, row_map_TK, w_TK = ctx.saved_tensors
        g_TD = g_TD.contiguous()
        T, K = row_map_TK.shape
        g_y = g_w = None
        if ctx.needs_input_grad[0]:
            # row r of y came from slot order[r]: token order[r] // K with weight w[order[r]]
            order = torch.empty_like(row_map_TK.reshape(-1))
            order[row_map_TK.reshape(-1)] = torch.arange(order.numel(), device=order.device)
            g_y = _gather_rows(g_TD, (order // K).contiguous(),
                               w_TK.reshape(-1).float()[order].contiguous())
        if ctx.needs_input_grad[2]:
            g_w = torch.bmm(y_MD[row_map_TK].float(), g_TD.float().unsqueeze(-1)).squeeze(-1)
        return g_y, None, g_w


# ------------------------------------------------------------------------------ public
def permute(x_TD: torch.Tensor, indices_TK: torch.Tensor, n_experts: int):
    """Copy each token once per chosen expert into expert-sorted rows.

    Returns (x_MD, row_map_TK, offsets_E int32 segment ends); differentiable in x_TD."""
    check_float("x_TD", x_TD)
    if x_TD.dim() != 2 or indices_TK.dim() != 2 or x_TD.shape[0] != indices_TK.shape[0]:
        raise ValueError(f"x_TD {tuple(x_TD.shape)} and indices_TK {tuple(indices_TK.shape)} "
                         "must be 2-D with the same number of tokens")
    check_index("indices_TK", indices_TK, n_experts)
    check_same_device(x_TD=x_TD, indices_TK=indices_TK)
    order, row_map, offsets = _sort_slots(indices_TK.long(), n_experts)
    K = indices_TK.shape[1]
    x_MD = _Permute.apply(x_TD.contiguous(), (order // K).contiguous(), row_map)
    return x_MD, row_map, offsets


def unpermute(y_MD: torch.Tensor, row_map_TK: torch.Tensor, weights_TK: torch.Tensor, T: int):
    """out_TD[t] = sum_k weights[t, k] * y_MD[row_map[t, k]]; differentiable in y and weights."""
    check_float("y_MD", y_MD)
    check_float("weights_TK", weights_TK)
    check_shape("row_map_TK", row_map_TK, (T, row_map_TK.shape[1] if row_map_TK.dim() == 2 else -1))
    check_shape("weights_TK", weights_TK, tuple(row_map_TK.shape))
    if y_MD.dim() != 2 or y_MD.shape[0] != row_map_TK.numel():
        raise ValueError(f"y_MD has shape {tuple(y_MD.shape)}: expected ({row_map_TK.numel()}, D)")
    check_index("row_map_TK", row_map_TK, y_MD.shape[0])
    check_same_device(y_MD=y_MD, row_map_TK=row_map_TK, weights_TK=weights_TK)
    return _Unpermute.apply(y_MD.contiguous(), row_map_TK.long().contiguous(), weights_TK.contiguous())
