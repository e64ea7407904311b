"""Token dispatch (the MoE layer's second stage, as megatron-core's token_dispatcher.py):
token copies to expert-contiguous rows for the experts, and the experts' rows back to
tokens.

Shape legend: T tokens, D d_model, E routed experts, K top_k, M = T*K routed rows (token
copies sorted by expert).

Dispatch is dropless: token copies are sorted by expert (stable, so the order is
deterministic), each expert runs on its contiguous segment, results are weighted and
summed back per token. A dispatcher hands the experts an :class:`ExpertRows` and takes
their output rows back in :meth:`combine`:
  * :class:`LocalDispatcher`: every expert on this device, torch sort and gathers;
  * :class:`TritonDispatcher`: the same with the Triton permute / unpermute kernels;
  * ``moe.parallel.expert_parallel.AllToAllDispatcher``: experts sharded over an
    expert-parallel group (sorts here, then exchanges rows with all-to-all).
Where the experts fold each row's routing weight into their activation (torch grouped_mm)
the rows carry ``weights_M`` and the combine is a plain per-token sum; otherwise the
combine weights each token's K rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


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
                        T: int, index_add: Optional[bool] = None,
                        sink: bool = False) -> torch.Tensor:
    """out_TD[t] = sum of the K rows m of v_MD with tok_M[m] == t (``inv_M``: the row of
    each token slot t*K + k). ``sink``: padding rows carry tok_M == T and are dropped.

    CPU: one index_add_ (a sequential, hence deterministic, pass). Elsewhere (CUDA's
    index_add_ uses atomics, so its float sums vary run to run): gather the rows back to
    token-slot order by inv_M and sum the K copies. Measured on the 2-core Xeon at
    T=4096, K=8, D=256: 1.1 ms vs 2.3 ms for the gather-and-sum. ``index_add``: force
    one way (None: by device).
    """
    if index_add is None:
        index_add = v_MD.device.type == "cpu"
    if index_add:
        return v_MD.new_zeros(T + sink, v_MD.shape[1]).index_add_(0, tok_M, v_MD)[:T]
    return v_MD.index_select(0, inv_M).view(T, -1, v_MD.shape[1]).sum(1)


class _Dispatch(torch.autograd.Function):
    """x_MD = x_TD[rows.gather]. Backward sums the K copies of each token's gradient
    (:func:`_sum_rows_per_token`) instead of autograd's generic indexing backward (a
    zero-filled buffer plus a non-deterministic scatter on CUDA)."""

    @staticmethod
    def forward(ctx, x_TD, rows: "RowMap"):
        ctx.rows = rows
        return x_TD.index_select(0, rows.gather)

    @staticmethod
    def backward(ctx, g_MD):
        return ctx.rows.sum_per_token(g_MD.contiguous()), None


class _SumPerToken(torch.autograd.Function):
    """out_TD = sum over each token's K rows of y_MD, rows that already carry their routing
    weight (the grouped experts scaled them). Backward: one gather, g_TD[rows.gather]
    (a padding row gets a real token's gradient: it multiplies a zero weight)."""

    @staticmethod
    def forward(ctx, y_MD, rows: "RowMap"):
        ctx.rows = rows
        return rows.sum_per_token(y_MD)

    @staticmethod
    def backward(ctx, g_TD):
        return g_TD.contiguous().index_select(0, ctx.rows.gather), None


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


@dataclass
class RowMap:
    """Where each expert row comes from: ``gather`` the token each row copies (a real
    token for a padding row), ``tok`` the token each row sums into (T for a padding row:
    a sink dropped by the sum), ``slot_rows`` the row of each token slot t*K + k, ``T``
    tokens, ``pos_M`` the row of each expert-sorted copy when there are padding rows
    (None: none, rows are the sorted copies)."""
    gather: torch.Tensor
    tok: torch.Tensor
    slot_rows: torch.Tensor
    T: int
    pos_M: Optional[torch.Tensor] = None

    @property
    def padded(self) -> bool:
        return self.pos_M is not None

    def sum_per_token(self, v_RD: torch.Tensor) -> torch.Tensor:
        return _sum_rows_per_token(v_RD, self.tok, self.slot_rows, self.T, sink=self.padded)

    def place(self, v_M: torch.Tensor) -> torch.Tensor:
        """Values of the sorted copies at their rows, 0 on padding rows (differentiable)."""
        if self.pos_M is None:
            return v_M
        return v_M.new_zeros(self.tok.numel()).index_put((self.pos_M,), v_M)


def pad_segments(order_M: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor,
                 experts_M: torch.Tensor, pad_to: int):
    """Each expert's segment grown to a multiple of ``pad_to`` rows (padding at its end).

    Why: bf16 GEMMs on CPU go through oneDNN, which builds (JIT-compiles) a primitive for
    every new shape; with per-expert row counts that change every step nearly every
    grouped-GEMM segment was a new shape (measured on a 2-core AMD EPYC: 0.9-1.4 ms for a
    first call against 0.2-0.3 ms cached), and rounding the counts to multiples of 16 cut
    the six grouped GEMMs of an E=64 top-8 layer from 133 to 76 ms for 1.3% more rows.
    Returns (pos_M: the padded row of each sorted row, counts_E and offsets_E (int32) of
    the padded segments, R: the padded row count)."""
    pc_E = (counts_E + pad_to - 1) // pad_to * pad_to
    poffs_E = torch.cumsum(pc_E, 0)
    shift_E = (poffs_E - pc_E) - (offsets_E.to(torch.int64) - counts_E)
    pos_M = (torch.arange(order_M.numel(), device=order_M.device)
             + shift_E.index_select(0, experts_M))
    return pos_M, pc_E, poffs_E.to(torch.int32), int(poffs_E[-1]) if poffs_E.numel() else 0


def dispatch(x_TD: torch.Tensor, indices_TK: torch.Tensor, n_experts: int, pad_to: int = 0):
    """Sort token copies by expert. Returns (x_RD, order_M, inv_M, counts_E, segments_E,
    offsets_E, rows): R = M rows, or more with ``pad_to`` (:func:`pad_segments`);
    counts_E the token copies per expert, segments_E and offsets_E (int32 cumulative ends)
    the rows per expert in x_RD (the same without padding); ``rows`` the :class:`RowMap`
    of x_RD."""
    order_M, counts_E, offsets_E = sort_by_expert(indices_TK, n_experts)
    M, T, K = order_M.numel(), indices_TK.shape[0], indices_TK.shape[1]
    inv_M = torch.empty_like(order_M)
    inv_M[order_M] = torch.arange(M, device=order_M.device)
    tok_M = order_M // K
    segments_E = counts_E
    if pad_to <= 1:
        rows = RowMap(tok_M, tok_M, inv_M, T)
    else:
        experts_M = indices_TK.reshape(-1).index_select(0, order_M)
        pos_M, segments_E, offsets_E, R = pad_segments(order_M, counts_E, offsets_E,
                                                       experts_M, pad_to)
        tok_R = torch.full((R,), T, dtype=tok_M.dtype, device=tok_M.device)
        tok_R[pos_M] = tok_M
        rows = RowMap(tok_R.clamp_max(T - 1), tok_R, pos_M.index_select(0, inv_M), T, pos_M)
    return _Dispatch.apply(x_TD, rows), order_M, inv_M, counts_E, segments_E, offsets_E, rows


def combine(y_MD: torch.Tensor, weights_TK: torch.Tensor, order_M: torch.Tensor,
            inv_M: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's K expert outputs (inverse of :func:`dispatch`)."""
    return _Combine.apply(y_MD, weights_TK.to(y_MD.dtype), order_M, inv_M)


def weights_by_row(weights_TK: torch.Tensor, order_M: torch.Tensor) -> torch.Tensor:
    """Each sorted row's routing weight (the ``weights_M`` of experts.experts_grouped_mm)."""
    return weights_TK.reshape(-1).index_select(0, order_M)


def sum_per_token(y_RD: torch.Tensor, rows: RowMap) -> torch.Tensor:
    """Sum of each token's K expert outputs that already carry their routing weights
    (experts.experts_grouped_mm with ``weights_M``); the inverse of :func:`dispatch`."""
    return _SumPerToken.apply(y_RD, rows)


@dataclass
class SortedSlots:
    """How a token's K copies were sorted by expert: what the combine back to tokens
    needs. ``weights_TK`` None: the rows already carry their routing weights."""
    order_M: torch.Tensor
    inv_M: torch.Tensor
    weights_TK: Optional[torch.Tensor]
    rows: RowMap

    def combine(self, y_RD: torch.Tensor) -> torch.Tensor:
        """out_TD: each token's K rows of ``y_RD`` (in the sorted order), weighted unless
        the experts applied the weights already."""
        if self.weights_TK is None:
            return sum_per_token(y_RD, self.rows)
        return combine(y_RD, self.weights_TK, self.order_M, self.inv_M)


@dataclass
class ExpertRows:
    """What a dispatcher hands the experts: ``x_MD`` rows contiguous per expert held here,
    their ``counts_E`` (int64) and ``offsets_E`` (int32 cumulative ends, torch._grouped_mm's
    ``offs``), ``weights_M`` each row's routing weight when the experts fold it in (else
    None); ``tokens_per_expert_E`` this rank's token copies per expert of the whole layer
    (the balancing histogram, int64); ``undo`` the dispatcher's own state for combine."""
    x_MD: torch.Tensor
    counts_E: torch.Tensor
    offsets_E: torch.Tensor
    weights_M: Optional[torch.Tensor]
    tokens_per_expert_E: torch.Tensor
    undo: Any


def sort_tokens(x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor,
                n_experts: int, fold_weights: bool, pad_to: int = 0):
    """(x_RD, counts_E, segments_E, offsets_E, weights_R or None, SortedSlots):
    :func:`dispatch` plus each row's routing weight when the experts fold it in
    (``fold_weights``; 0 on padding rows). ``pad_to`` (rows per segment a multiple of
    it) needs ``fold_weights``: only the plain per-token sum knows padding rows."""
    if pad_to > 1 and not fold_weights:
        raise ValueError("padded expert segments need the experts to fold the weights")
    x_RD, order_M, inv_M, counts_E, segments_E, offsets_E, rows = dispatch(
        x_TD, indices_TK, n_experts, pad_to)
    weights_R = rows.place(weights_by_row(weights_TK, order_M)) if fold_weights else None
    slots = SortedSlots(order_M, inv_M, None if fold_weights else weights_TK, rows)
    return x_RD, counts_E, segments_E, offsets_E, weights_R, slots


def local_dispatcher(backend: str, n_experts: int):
    """The single-device dispatcher of a backend ("torch" or "triton")."""
    return TritonDispatcher(n_experts) if backend == "triton" else LocalDispatcher(n_experts)


class LocalDispatcher:
    """Every expert on this device: a stable torch sort by expert, gathers back."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def for_backend(self, backend: str):
        return local_dispatcher(backend, self.n_experts)

    def dispatch(self, x_TD, weights_TK, indices_TK, fold_weights: bool,
                 pad_to: int = 0) -> ExpertRows:
        x_RD, counts_E, segments_E, offsets_E, weights_R, slots = sort_tokens(
            x_TD, weights_TK, indices_TK, self.n_experts, fold_weights, pad_to)
        return ExpertRows(x_RD, segments_E, offsets_E, weights_R, counts_E, slots)

    def combine(self, y_MD: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
        return rows.undo.combine(y_MD)


class TritonDispatcher:
    """Every expert on this device, sorted and combined by the Triton permute kernels
    (histogram + prefix sums, a gather, a weighted gather-sum in fp32): no host
    synchronisation. The experts must not fold the weights (the combine applies them)."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def for_backend(self, backend: str):
        return local_dispatcher(backend, self.n_experts)

    def dispatch(self, x_TD, weights_TK, indices_TK, fold_weights: bool,
                 pad_to: int = 0) -> ExpertRows:
        from kernels.permute import permute_unchecked  # lazy: moe works without triton

        if fold_weights:
            raise ValueError("TritonDispatcher applies the routing weights in its combine")
        # indices come from the router (in range by construction): no checks, no syncs
        x_MD, row_map_TK, offsets_E = permute_unchecked(x_TD, indices_TK, self.n_experts)
        # segment sizes from the offsets: torch.bincount on CUDA would synchronise
        counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).to(torch.int64)
        return ExpertRows(x_MD, counts_E, offsets_E, None, counts_E, (row_map_TK, weights_TK))

    def combine(self, y_MD: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
        from kernels.permute import unpermute_unchecked

        row_map_TK, weights_TK = rows.undo
        # the weights go in as the router made them (fp32): the kernel multiplies in fp32
        return unpermute_unchecked(y_MD, row_map_TK, weights_TK)
