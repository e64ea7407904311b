"""Grouped SwiGLU expert MLP over contiguous expert segments.

Shape legend: M routed rows (sorted by expert), E experts, D hidden, F expert FFN size.
Rows offsets_E[e-1]:offsets_E[e] belong to expert e (offsets_E: int32 segment ENDS, the
torch._grouped_mm ``offs`` format; offsets_E[-1] == M, or < M with trailing padding rows).

    h_M2F = x_MD @ w13_ED2F[e]        gate = h[:, :F], up = h[:, F:]
    a_MF  = silu(gate) * up           fused in the first GEMM's epilogue
    y_MD  = a_MF @ w2_EFD[e]
Backward:
    dW2[e]  = a[seg_e]^T dy[seg_e]                      grouped wgrad
    da      = dy @ w2[e]^T ;  dh = SwiGLU'(h) * da      SwiGLU backward fused in the epilogue
    dW13[e] = x[seg_e]^T dh[seg_e]                      grouped wgrad
    dx      = dh @ w13[e]^T

FLOPs: forward 2*M*D*2F + 2*M*F*D = 6 M D F; backward 12 M D F (18 M D F per step).
Bytes (bf16, forward): read x (2MD) + weights (6EDF), write h (4MF), a (2MF), y (2MD);
with M/E rows per expert the arithmetic intensity is ~M/E FLOP/byte on weights, so
experts with fewer than ~300 rows are memory bound on H100 (docs/anchors.md, "Kernel roofline").

Kernels:
  * ``_grouped_gemm_kernel``: C = A @ B[e] over row tiles that never straddle two experts.
    Each program finds its (expert, first row) from the offsets itself (a cumsum over the
    per-expert tile counts, E <= 1024 values), so there is no host sync and no schedule
    tensor; the grid is the static upper bound cdiv(M, BLOCK_M) + E row tiles and surplus
    programs exit at once. Tile order is grouped (GROUP_M row tiles per column sweep) for
    L2 reuse of B[e]. B is addressed by strides, so W^T in the backward is a view.
    Epilogues: plain store; SwiGLU forward (two accumulators, gate and up columns of the
    same tile, stores h and a); SwiGLU backward (loads h, stores dh for gate and up).
  * ``_grouped_wgrad_kernel``: dW[e] tile = A[seg_e]^T G[seg_e], one program per
    (K tile, N tile, expert) looping over that expert's rows; empty segments give 0.
Accumulation is fp32; fp32 inputs use IEEE products (no TF32) so CPU tests are exact to
summation order. Tile sizes are autotuned on CUDA from a short list (unmeasured here:
no GPU in this session); the interpreter uses one small config.
Optional: the permute gather fused into the first GEMM's prologue (``_GatheredSwiGLU``,
``routed_experts_unchecked(fuse_gather=True)``; off by default until measured on a GPU).
Not fused: the routing weight + combine into the last GEMM's epilogue (ScatterMoE does
it with atomics; the deterministic gather-sum of ``unpermute`` is kept).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import check_float, check_offsets, check_same_device

MAX_EXPERTS = 1024  # each GEMM program scans the E offsets in registers

_EPI_PLAIN, _EPI_SWIGLU_FWD, _EPI_SWIGLU_BWD = 0, 1, 2


# ------------------------------------------------------------------------------ reference
def grouped_swiglu_mlp_ref(x_MD, offsets_E, w13_ED2F, w2_EFD):
    """Per-expert loop of dense matmuls (rows past offsets_E[-1] give 0)."""
    Fh = w2_EFD.shape[1]
    y_MD = x_MD.new_zeros(x_MD.shape[0], w2_EFD.shape[2])
    outs, start = [], 0
    for e, end in enumerate(offsets_E.tolist()):
        h = x_MD[start:end] @ w13_ED2F[e]
        outs.append((F.silu(h[:, :Fh]) * h[:, Fh:]) @ w2_EFD[e])
        start = end
    if not outs:
        return y_MD
    # torch.cat (not an in-place copy) keeps the reference differentiable
    return torch.cat(outs + [y_MD[start:]], 0)


# ------------------------------------------------------------------------------ kernels
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _gemm_configs():
    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    # H100 bf16 candidates (standard Hopper shapes; not measured in this session)
    cfg = lambda m, n, k, w, s: triton.Config(  # noqa: E731
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
    return [cfg(128, 128, 64, 8, 3), cfg(128, 128, 64, 4, 4), cfg(64, 128, 64, 4, 4),
            cfg(128, 64, 64, 4, 4), cfg(64, 64, 64, 4, 3), cfg(128, 256, 64, 8, 3)]


def _wgrad_configs():
    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32})]
    cfg = lambda m, k, n, w, s: triton.Config(  # noqa: E731
        {"BLOCK_M": m, "BLOCK_K": k, "BLOCK_N": n}, num_warps=w, num_stages=s)
    return [cfg(64, 128, 128, 8, 3), cfg(64, 128, 128, 4, 4), cfg(32, 128, 128, 4, 4),
            cfg(64, 64, 128, 4, 4), cfg(64, 128, 64, 4, 4)]


#: fp32 tiles a SwiGLU epilogue keeps live per program: the forward holds the gate and up
#: accumulators; the backward holds its accumulator and loads the stored gate and up.
_EPI_LIVE_TILES = {_EPI_SWIGLU_FWD: 2, _EPI_SWIGLU_BWD: 3}
#: Most live fp32 tile values per thread a config may hold (of 255 registers). ptxas for
#: sm_90 with the JIT's 16-byte divisibility specialisation (tests/test_kernels_compile.py)
#: measured the configs above it spilling 520-2308 bytes per thread (SwiGLU backward at
#: 128x128 / 4 warps and 128x256 / 8 warps; forward at 128x128 / 4 warps and 128x256),
#: and the kept ones at most 164 bytes.
_MAX_LIVE_PER_THREAD = 192


def _live_per_thread(cfg, tiles: int) -> float:
    return tiles * cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] / (32 * cfg.num_warps)


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Drop tiles whose SwiGLU epilogue (forward or backward) would spill registers: the
    epilogue's live fp32 tiles must fit in ~192 registers per thread."""
    epi = named_args.get("EPILOGUE", kwargs.get("EPILOGUE"))
    tiles = _EPI_LIVE_TILES.get(epi)
    if tiles is None:
        return configs
    kept = [c for c in configs if _live_per_thread(c, tiles) <= _MAX_LIVE_PER_THREAD]
    return kept or configs[:1]


@triton.jit
def _a_rows(gidx_ptr, rows64, rmask, GATHER: tl.constexpr, GATHER_DIV: tl.constexpr):
    """Rows of A to read for output rows ``rows64`` and their mask: the rows themselves,
    or with GATHER the token rows gidx[r] // GATHER_DIV (gidx < 0: padding, masked)."""
    if GATHER:
        slot = tl.load(gidx_ptr + rows64, mask=rmask, other=-1)
        return (tl.maximum(slot, 0) // GATHER_DIV).to(tl.int64), rmask & (slot >= 0)
    else:
        return rows64, rmask


# M (rows, = tokens x top-k for a fixed batch) and GATHER are in the key: the best tile for
# 4k rows is not the best for 256k, and the gathered prologue changes the memory pattern.
@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "EPILOGUE", "GATHER"],
                 prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, h_ptr, offs_ptr, gidx_ptr, M, N, K, E,
                         stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                         EPILOGUE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                         GATHER: tl.constexpr, GATHER_DIV: tl.constexpr,
                         BLOCK_E: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """EPILOGUE 0: C (M, N) = A @ B[e].
    EPILOGUE 1: B has 2N columns; gate = A @ B[e][:, n], up = A @ B[e][:, N + n];
                H (M, 2N) <- [gate, up], C (M, N) <- silu(gate) * up.
    EPILOGUE 2: acc = dA; reads H (M, 2N), writes C (M, 2N) <- [dgate, dup].
    GATHER: row r of A is A[gidx[r] // GATHER_DIV] (gidx < 0: a zero row), i.e. the
    permute gather happens in the prologue and the permuted A is never written."""
    # grouped tile order: GROUP_M row tiles share each sweep over the column tiles
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M) + E  # static upper bound on row tiles
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    # row tile pid_m -> (expert e, first row): tiles of expert e are cum[e-1]..cum[e]-1
    eids = tl.arange(0, BLOCK_E)
    em = eids < E
    ends = tl.load(offs_ptr + eids, mask=em, other=0)
    starts = tl.load(offs_ptr + eids - 1, mask=em & (eids > 0), other=0)
    ntiles = tl.where(em, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    cum = tl.cumsum(ntiles, 0)
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    if e >= E:
        return
    sel = eids == e
    first_tile = tl.sum(tl.where(sel, cum - ntiles, 0), 0)
    row0 = tl.sum(tl.where(sel, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    end = tl.sum(tl.where(sel, ends, 0), 0)

    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    arows, amask = _a_rows(gidx_ptr, rows64, rmask, GATHER, GATHER_DIV)
    a_ptrs = a_ptr + arows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = (b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk
              + cols[None, :] * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if EPILOGUE == 1:
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=amask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if EPILOGUE == 1:
            bu = tl.load(b_ptrs + N * stride_bn, mask=kmask[:, None] & cmask[None, :], other=0.0)
            if UPCAST:
                bu = bu.to(tl.float32)
            if IEEE:
                acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(a, bu, acc_u)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    m2 = rmask[:, None] & cmask[None, :]
    if EPILOGUE == 0:
        tl.store(c_ptr + rows64[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=m2)
    elif EPILOGUE == 1:
        hp = h_ptr + rows64[:, None] * (2 * N) + cols[None, :]
        tl.store(hp, acc.to(h_ptr.dtype.element_ty), mask=m2)
        tl.store(hp + N, acc_u.to(h_ptr.dtype.element_ty), mask=m2)
        act = acc / (1.0 + tl.exp(-acc)) * acc_u
        tl.store(c_ptr + rows64[:, None] * N + cols[None, :], act.to(c_ptr.dtype.element_ty),
                 mask=m2)
    else:
        # SwiGLU backward from the stored pre-activations (what the forward rounded to
        # x's dtype, as autograd through the reference would see them)
        hp = h_ptr + rows64[:, None] * (2 * N) + cols[None, :]
        g = tl.load(hp, mask=m2, other=0.0).to(tl.float32)
        u = tl.load(hp + N, mask=m2, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        dgate = acc * u * sig * (1.0 + g * (1.0 - sig))
        dup = acc * g * sig
        cp = c_ptr + rows64[:, None] * (2 * N) + cols[None, :]
        tl.store(cp, dgate.to(c_ptr.dtype.element_ty), mask=m2)
        tl.store(cp + N, dup.to(c_ptr.dtype.element_ty), mask=m2)


@triton.autotune(configs=_wgrad_configs(), key=["KA", "N", "GATHER"])
@triton.jit
def _grouped_wgrad_kernel(a_ptr, g_ptr, dw_ptr, offs_ptr, gidx_ptr, KA, N,
                          IEEE: tl.constexpr, UPCAST: tl.constexpr, GATHER: tl.constexpr,
                          GATHER_DIV: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """dW[e] = A[seg_e]^T @ G[seg_e]; A (M, KA), G (M, N), dW (E, KA, N).
    GATHER: row r of A is A[gidx[r] // GATHER_DIV] (gidx < 0: a zero row)."""
    # tiles of one expert are adjacent in launch order: its A and G rows stay in L2
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_k = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = kk < KA
    nmask = nn < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M))
        rmask = rows < end
        rows64 = rows.to(tl.int64)
        arows, amask = _a_rows(gidx_ptr, rows64, rmask, GATHER, GATHER_DIV)
        a = tl.load(a_ptr + arows[:, None] * KA + kk[None, :],
                    mask=amask[:, None] & kmask[None, :], other=0.0)
        g = tl.load(g_ptr + rows64[:, None] * N + nn[None, :],
                    mask=rmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(a), g, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), g, acc)
    tl.store(dw_ptr + e.to(tl.int64) * KA * N + kk[:, None] * N + nn[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])


# ------------------------------------------------------------------------------ launchers
def _precision(dtype):
    # IEEE: fp32 products without TF32, so fp32 results match the torch reference.
    # UPCAST: the Triton 3.9 interpreter's tl.dot returns garbage for bf16 operands
    # (checked: |error| ~1e10 on a 16x16 product), so under the interpreter only, 16-bit
    # tiles are widened to fp32 before the dot; on GPU they go to the tensor cores as is.
    upcast = _interpreting() and dtype != torch.float32
    return dict(IEEE=dtype == torch.float32 or upcast, UPCAST=upcast)


def _gemm(a_MK, b_EKN, offsets_E, epilogue=_EPI_PLAIN, h=None, zero_tail=False, gather=None):
    """Grouped C = A @ B[e] with an epilogue; b_EKN may be a strided (transposed) view.
    ``gather=(gidx_M, div)``: C has gidx_M.numel() rows, row r reading A[gidx[r] // div]."""
    M, K = (gather[0].numel(), a_MK.shape[1]) if gather is not None else a_MK.shape
    E = b_EKN.shape[0]
    N = b_EKN.shape[2] // 2 if epilogue == _EPI_SWIGLU_FWD else b_EKN.shape[2]
    out_cols = 2 * N if epilogue == _EPI_SWIGLU_BWD else N
    alloc = torch.zeros if zero_tail else torch.empty  # rows past offsets[-1] stay 0
    c = alloc(M, out_cols, device=a_MK.device, dtype=a_MK.dtype)
    if epilogue == _EPI_SWIGLU_FWD:
        h = torch.empty(M, 2 * N, device=a_MK.device, dtype=a_MK.dtype)

    def grid(meta):
        return ((triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)
    _grouped_gemm_kernel[grid](
        a_MK, b_EKN, c, h if h is not None else c, offsets_E,
        gather[0] if gather is not None else offsets_E, M, N, K, E,
        a_MK.stride(0), a_MK.stride(1), b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2),
        EPILOGUE=epilogue, **_precision(a_MK.dtype), GATHER=gather is not None,
        GATHER_DIV=gather[1] if gather is not None else 1, BLOCK_E=triton.next_power_of_2(E))
    return (c, h) if epilogue == _EPI_SWIGLU_FWD else c


def _wgrad(a_MK, g_MN, offsets_E, out_dtype, gather=None):
    """dW[e] = A[seg_e]^T G[seg_e] -> (E, K, N), accumulated in fp32, stored in out_dtype.
    ``gather=(gidx_M, div)``: row r of A is A[gidx[r] // div] (as in :func:`_gemm`)."""
    KA, N = a_MK.shape[1], g_MN.shape[1]
    E = offsets_E.numel()
    dw = torch.empty(E, KA, N, device=a_MK.device, dtype=out_dtype)

    def grid(meta):
        return (triton.cdiv(KA, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]), E)
    _grouped_wgrad_kernel[grid](a_MK.contiguous(), g_MN, dw, offsets_E,
                                gather[0] if gather is not None else offsets_E, KA, N,
                                **_precision(a_MK.dtype), GATHER=gather is not None,
                                GATHER_DIV=gather[1] if gather is not None else 1)
    return dw


# ------------------------------------------------------------------------------ autograd
def _mlp_forward(x, offs, w13, w2, tail, gather=None):
    """(y_MD, h_M2F, a_MF); x is (M, D) rows, or with ``gather`` the (T, D) tokens."""
    a_MF, h_M2F = _gemm(x, w13, offs, _EPI_SWIGLU_FWD, gather=gather)
    return _gemm(a_MF, w2, offs, zero_tail=tail), h_M2F, a_MF


def _mlp_backward(dy_MD, x, offs, w13, w2, h_M2F, a_MF, need_x, need_w13, need_w2, tail,
                  gather=None):
    """(dx_MD per row, dW13, dW2), each None when not needed."""
    dy_MD = dy_MD.contiguous()
    dx = dw13 = dw2 = None
    if need_w2:
        dw2 = _wgrad(a_MF, dy_MD, offs, w2.dtype)
    if need_x or need_w13:
        dh_M2F = _gemm(dy_MD, w2.transpose(1, 2), offs, _EPI_SWIGLU_BWD, h=h_M2F)
        if need_w13:
            dw13 = _wgrad(x, dh_M2F, offs, w13.dtype, gather=gather)
        if need_x:
            dx = _gemm(dh_M2F, w13.transpose(1, 2), offs, zero_tail=tail)
    return dx, dw13, dw2


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, offsets_E, w13_ED2F, w2_EFD, tail):
        y_MD, h_M2F, a_MF = _mlp_forward(x_MD, offsets_E, w13_ED2F, w2_EFD, tail)
        # h (M, 2F) and a (M, F) are kept: recomputing a from h inside the dW2 kernel
        # would save M*F elements of memory at the cost of a prologue (not done yet)
        ctx.save_for_backward(x_MD, offsets_E, w13_ED2F, w2_EFD, h_M2F, a_MF)
        ctx.tail = tail
        return y_MD

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, offs, w13, w2, h_M2F, a_MF = ctx.saved_tensors
        need_x, _, need_w13, need_w2, _ = ctx.needs_input_grad
        dx, dw13, dw2 = _mlp_backward(dy_MD, x_MD, offs, w13, w2, h_M2F, a_MF, need_x,
                                      need_w13, need_w2, ctx.tail)
        return dx, None, dw13, dw2, None


def grouped_swiglu_mlp_unchecked(x_MD, offsets_E, w13_ED2F, w2_EFD, tail=True):
    """Unchecked entry (offsets valid by construction, e.g. from permute)."""
    return _GroupedSwiGLU.apply(x_MD.contiguous(), offsets_E.to(torch.int32).contiguous(),
                                w13_ED2F.contiguous(), w2_EFD.contiguous(), tail)


class _GatheredSwiGLU(torch.autograd.Function):
    """The grouped SwiGLU MLP reading token rows straight from x_TD (permute fused into the
    first GEMM's prologue, ScatterMoE-style): row r of the expert-sorted input is
    x_TD[slot_of_row[r] // K], so the (M, D) permuted copy is neither written in the
    forward nor kept for the backward (dW13 gathers again). dx comes back as per-row
    gradients summed per token by permute's deterministic gather-sum.
    Saves versus permute + grouped MLP: one M x D write and one M x D read in the forward,
    and M x D of activation memory."""

    @staticmethod
    def forward(ctx, x_TD, slot_of_row_M, row_map_TK, offsets_E, w13_ED2F, w2_EFD, tail):
        gather = (slot_of_row_M, row_map_TK.shape[1])
        y_MD, h_M2F, a_MF = _mlp_forward(x_TD, offsets_E, w13_ED2F, w2_EFD, tail, gather)
        ctx.save_for_backward(x_TD, slot_of_row_M, row_map_TK, offsets_E, w13_ED2F, w2_EFD,
                              h_M2F, a_MF)
        ctx.tail = tail
        return y_MD

    @staticmethod
    def backward(ctx, dy_MD):
        from .permute import combine_rows

        x_TD, slot, row_map_TK, offs, w13, w2, h_M2F, a_MF = ctx.saved_tensors
        need_x, _, _, _, need_w13, need_w2, _ = ctx.needs_input_grad
        dx_MD, dw13, dw2 = _mlp_backward(dy_MD, x_TD, offs, w13, w2, h_M2F, a_MF, need_x,
                                         need_w13, need_w2, ctx.tail,
                                         gather=(slot, row_map_TK.shape[1]))
        dx = combine_rows(dx_MD, row_map_TK, None, x_TD.dtype) if dx_MD is not None else None
        return dx, None, None, None, dw13, dw2, None


def gathered_swiglu_mlp_unchecked(x_TD, slot_of_row_M, row_map_TK, offsets_E, w13_ED2F,
                                  w2_EFD, tail=True):
    """Unchecked: (slot_of_row_M, row_map_TK, offsets_E) from permute's ``sort_slots``."""
    return _GatheredSwiGLU.apply(x_TD.contiguous(), slot_of_row_M, row_map_TK.contiguous(),
                                 offsets_E.to(torch.int32).contiguous(), w13_ED2F.contiguous(),
                                 w2_EFD.contiguous(), tail)


# ------------------------------------------------------------------------------ public
def grouped_swiglu_mlp(x_MD: torch.Tensor, offsets_E: torch.Tensor, w13_ED2F: torch.Tensor,
                       w2_EFD: torch.Tensor, *, allow_tail_padding: bool = False) -> torch.Tensor:
    """SwiGLU experts over contiguous expert segments: y = (silu(x W_g) * (x W_u)) W_2.

    Args:
        x_MD: (M, D) rows sorted by expert (fp32, bf16 or fp16; same dtype as the weights).
        offsets_E: (E,) int32/int64 cumulative segment ENDS (torch._grouped_mm ``offs``);
            non-decreasing, last == M (<= M with ``allow_tail_padding``: the rows past it
            give 0, e.g. the static-size buffer of ``permute(..., pad_to > 1)``).
        w13_ED2F: (E, D, 2F) gate columns [:F], up columns [F:].  w2_EFD: (E, F, D).
    Returns y_MD (M, D) in x's dtype, differentiable w.r.t. x_MD, w13_ED2F and w2_EFD.
    Non-contiguous inputs are copied to contiguous ones. D and F need not be multiples of
    16 (masked tiles). Validation reads the offsets (one host sync).
    """
    for n, t in (("x_MD", x_MD), ("w13_ED2F", w13_ED2F), ("w2_EFD", w2_EFD)):
        check_float(n, t)
    if x_MD.dtype != w13_ED2F.dtype or x_MD.dtype != w2_EFD.dtype:
        raise TypeError(f"dtypes differ: x {x_MD.dtype}, w13 {w13_ED2F.dtype}, w2 {w2_EFD.dtype}")
    if x_MD.dim() != 2 or w13_ED2F.dim() != 3 or w2_EFD.dim() != 3:
        raise ValueError(f"expected x_MD (M, D), w13_ED2F (E, D, 2F), w2_EFD (E, F, D); got "
                         f"{tuple(x_MD.shape)}, {tuple(w13_ED2F.shape)}, {tuple(w2_EFD.shape)}")
    E, D, F2 = w13_ED2F.shape
    if x_MD.shape[1] != D or F2 % 2 or tuple(w2_EFD.shape) != (E, F2 // 2, D):
        raise ValueError(f"shapes do not match: x {tuple(x_MD.shape)}, "
                         f"w13 {tuple(w13_ED2F.shape)}, "
                         f"w2 {tuple(w2_EFD.shape)} (need x (M, D), w13 (E, D, 2F), w2 (E, F, D))")
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"E={E} experts is unsupported: allowed 1..{MAX_EXPERTS}")
    check_same_device(x_MD=x_MD, offsets_E=offsets_E, w13_ED2F=w13_ED2F, w2_EFD=w2_EFD)
    check_offsets("offsets_E", offsets_E, E, x_MD.shape[0], allow_tail_padding)
    return grouped_swiglu_mlp_unchecked(x_MD, offsets_E, w13_ED2F, w2_EFD, tail=allow_tail_padding)
