"""Grouped SwiGLU expert MLP over contiguous expert segments.

Shape legend: M routed rows (sorted by expert), E experts, D hidden, F expert FFN size.
Rows offsets_E[e-1]:offsets_E[e] belong to expert e (offsets_E: int32 segment ENDS).

    h_M2F = x_MD @ w13[e]            (gate = h[:, :F], up = h[:, F:])
    a_MF  = silu(gate) * up          fused in the first GEMM's epilogue
    y_MD  = a_MF @ w2[e]
Backward:
    dW2 = a^T dy (per segment)   da = dy w2^T   dh = SwiGLU'(h) da
    dW13 = x^T dh (per segment)  dx = dh w13^T

FLOPs: forward 2*M*D*2F + 2*M*F*D = 6 M D F; backward twice that (18 M D F in all).
Bytes (forward, bf16): x and y (4 M D), h (4 M F) and a (2 M F), weights 6 E D F.

Kernels: one grouped GEMM ``C = A @ B[e]`` over row tiles, each tile inside one expert
segment. The tile -> (expert, row start) schedule is computed on the device from the
offsets with a fixed upper bound of cdiv(M, BLOCK_M) + E tiles, so no host
synchronisation is needed; tiles past the end exit at once. B is addressed by strides,
so the transposed weights of the backward pass are views, not copies. The weight
gradient is a second kernel: one program per (expert, K tile, N tile) looping over the
expert's rows. Accumulation is fp32; fp32 inputs use IEEE (not TF32) products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import check_float, check_same_device


# ------------------------------------------------------------------------------ reference
def grouped_swiglu_mlp_ref(x_MD, offsets_E, w13_ED2F, w2_EFD):
    """Per-expert loop of dense matmuls (the reference)."""
    Fh = w2_EFD.shape[1]
    outs, start = [], 0
    for e, end in enumerate(offsets_E.tolist()):
        h = x_MD[start:end] @ w13_ED2F[e]
        outs.append((F.silu(h[:, :Fh]) * h[:, Fh:]) @ w2_EFD[e])
        start = end
    return torch.cat(outs, 0) if outs else x_MD.new_zeros(0, w2_EFD.shape[2])


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, h_ptr, tile_expert_ptr, tile_start_ptr, offs_ptr,
                         N, K, stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                         stride_cm, F_HALF,
                         SWIGLU: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[rows] = A[rows] @ B[e] for one (row tile, column tile). With SWIGLU, B has 2*F_HALF
    columns: the tile computes gate columns n and up columns F_HALF + n, writes the
    pre-activations to H (M, 2F) and silu(gate) * up to C (M, F)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_t)
    if e < 0:
        return
    start = tl.load(tile_start_ptr + pid_t)
    end = tl.load(offs_ptr + e)
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU:
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_base = b_ptr + e.to(tl.int64) * stride_be
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + kk[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        if SWIGLU:
            bu = tl.load(b_base + kk[:, None] * stride_bk + (cols[None, :] + F_HALF) * stride_bn,
                         mask=kmask[:, None] & cmask[None, :], other=0.0)
            if IEEE:
                acc_u += tl.dot(a, bu, input_precision="ieee")
            else:
                acc_u += tl.dot(a, bu)
    m2 = rmask[:, None] & cmask[None, :]
    if SWIGLU:
        hp = h_ptr + rows[:, None] * (2 * F_HALF) + cols[None, :]
        tl.store(hp, acc.to(h_ptr.dtype.element_ty), mask=m2)
        tl.store(hp + F_HALF, acc_u.to(h_ptr.dtype.element_ty), mask=m2)
        act = acc / (1.0 + tl.exp(-acc)) * acc_u
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], act.to(c_ptr.dtype.element_ty), mask=m2)
    else:
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _grouped_wgrad_kernel(a_ptr, g_ptr, dw_ptr, offs_ptr, KA, N,
                          IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """dW[e] = A[seg_e]^T @ G[seg_e]; A (M, KA), G (M, N), dW (E, KA, N)."""
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.where(e > 0, tl.load(offs_ptr + e - 1, mask=e > 0, other=0), 0)
    end = tl.load(offs_ptr + e)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = kk < KA
    nmask = nn < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        a = tl.load(a_ptr + rows[None, :] * KA + kk[:, None], mask=kmask[:, None] & rmask[None, :], other=0.0)
        g = tl.load(g_ptr + rows[:, None] * N + nn[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, g, input_precision="ieee")
        else:
            acc += tl.dot(a, g)
    tl.store(dw_ptr + e.to(tl.int64) * KA * N + kk[:, None] * N + nn[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])


# ------------------------------------------------------------------------------ launchers
BLOCK_M = 64


def _schedule(offsets_E, M):
    """Row tiles that never straddle two experts, built on the device: tile j belongs to the
    first expert whose cumulative tile count exceeds j. Returns (tile_expert, tile_start)
    of fixed length cdiv(M, BLOCK_M) + E; unused tiles have expert -1."""
    E = offsets_E.numel()
    ends = offsets_E.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    n_tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    cum = torch.cumsum(n_tiles, 0)
    ub = triton.cdiv(max(M, 1), BLOCK_M) + E
    j = torch.arange(ub, device=offsets_E.device)
    e = torch.searchsorted(cum, j, right=True)
    valid = e < E
    e_c = e.clamp(max=E - 1)
    local = j - (cum[e_c] - n_tiles[e_c])
    tile_start = starts[e_c] + local * BLOCK_M
    return torch.where(valid, e_c, -1).to(torch.int32), tile_start.to(torch.int32)


def _gemm(a, b_EKN, offsets_E, sched, swiglu=False):
    M, K = a.shape
    N = b_EKN.shape[2] // 2 if swiglu else b_EKN.shape[2]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    h = torch.empty(M, 2 * N, device=a.device, dtype=a.dtype) if swiglu else c
    BN = min(64, max(16, triton.next_power_of_2(N)))
    BK = min(64, max(16, triton.next_power_of_2(K)))
    tile_e, tile_s = sched
    grid = (tile_e.numel(), triton.cdiv(N, BN))
    _grouped_gemm_kernel[grid](a, b_EKN, c, h, tile_e, tile_s, offsets_E, N, K,
                               a.stride(0), a.stride(1), b_EKN.stride(0), b_EKN.stride(1),
                               b_EKN.stride(2), c.stride(0), N, SWIGLU=swiglu,
                               IEEE=a.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BN,
                               BLOCK_K=BK)
    return (c, h) if swiglu else c


def _wgrad(a_MK, g_MN, offsets_E):
    M, KA = a_MK.shape
    N = g_MN.shape[1]
    E = offsets_E.numel()
    dw = torch.empty(E, KA, N, device=a_MK.device, dtype=torch.float32)
    BK = min(64, max(16, triton.next_power_of_2(KA)))
    BN = min(64, max(16, triton.next_power_of_2(N)))
    grid = (E, triton.cdiv(KA, BK), triton.cdiv(N, BN))
    _grouped_wgrad_kernel[grid](a_MK, g_MN, dw, offsets_E, KA, N,
                                IEEE=a_MK.dtype == torch.float32, BLOCK_M=32, BLOCK_K=BK, BLOCK_N=BN)
    return dw


# ------------------------------------------------------------------------------ autograd
class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, offsets_E, w13_ED2F, w2_EFD):
        sched = _schedule(offsets_E, x_MD.shape[0])
        a_MF, h_M2F = _gemm(x_MD, w13_ED2F, offsets_E, sched, swiglu=True)
        y_MD = _gemm(a_MF, w2_EFD, offsets_E, sched)
        ctx.save_for_backward(x_MD, offsets_E, w13_ED2F, w2_EFD, h_M2F, a_MF, *sched)
        return y_MD

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, offsets_E, w13, w2, h_M2F, a_MF, te, ts = ctx.saved_tensors
        sched = (te, ts)
        dy_MD = dy_MD.contiguous()
        Fh = w2.shape[1]
        dw2 = _wgrad(a_MF, dy_MD, offsets_E).to(w2.dtype)
        da_MF = _gemm(dy_MD, w2.transpose(1, 2), offsets_E, sched)  # strided view, no copy
        g, u = h_M2F[:, :Fh].float(), h_M2F[:, Fh:].float()
        sig = torch.sigmoid(g)
        da = da_MF.float()
        dh_M2F = torch.cat([da * u * sig * (1 + g * (1 - sig)), da * g * sig], 1).to(x_MD.dtype)
        dw13 = _wgrad(x_MD, dh_M2F, offsets_E).to(w13.dtype)
        dx = _gemm(dh_M2F, w13.transpose(1, 2), offsets_E, sched)
        return dx, None, dw13, dw2


# ------------------------------------------------------------------------------ public
def grouped_swiglu_mlp(x_MD: torch.Tensor, offsets_E: torch.Tensor, w13_ED2F: torch.Tensor,
                       w2_EFD: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over contiguous segments; differentiable in x, w13 and w2."""
    for n, t in (("x_MD", x_MD), ("w13_ED2F", w13_ED2F), ("w2_EFD", w2_EFD)):
        check_float(n, t)
    if x_MD.dtype != w13_ED2F.dtype or x_MD.dtype != w2_EFD.dtype:
        raise TypeError(f"dtypes differ: x {x_MD.dtype}, w13 {w13_ED2F.dtype}, w2 {w2_EFD.dtype}")
    if x_MD.dim() != 2 or w13_ED2F.dim() != 3 or w2_EFD.dim() != 3:
        raise ValueError("expected x_MD (M, D), w13_ED2F (E, D, 2F), w2_EFD (E, F, D)")
    E, D, F2 = w13_ED2F.shape
    if x_MD.shape[1] != D or F2 % 2 or w2_EFD.shape != (E, F2 // 2, D):
        raise ValueError(f"shapes do not match: x {tuple(x_MD.shape)}, w13 {tuple(w13_ED2F.shape)}, "
                         f"w2 {tuple(w2_EFD.shape)} (need x (M, D), w13 (E, D, 2F), w2 (E, F, D))")
    if offsets_E.shape != (E,) or offsets_E.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets_E must be an int32 tensor of shape ({E},), got "
                         f"{tuple(offsets_E.shape)} {offsets_E.dtype}")
    check_same_device(x_MD=x_MD, offsets_E=offsets_E, w13_ED2F=w13_ED2F, w2_EFD=w2_EFD)
    offs = offsets_E.to(torch.int32).contiguous()
    if E and (int(offs[-1]) != x_MD.shape[0] or bool((offs[1:] < offs[:-1]).any()) or int(offs[0]) < 0):
        raise ValueError(f"offsets_E must be non-decreasing segment ends with last == M="
                         f"{x_MD.shape[0]}, got {offs.tolist()[:8]}...")
    return _GroupedSwiGLU.apply(x_MD.contiguous(), offs, w13_ED2F.contiguous(), w2_EFD.contiguous())
