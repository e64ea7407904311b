"""Expert parallelism: routed experts sharded over an EP group, tokens exchanged with
all-to-all (counts first, then rows with variable splits), backward through the same path.

Shape legend: T local tokens, K top_k, E global experts, P = EP group size,
El = E / P local experts, D hidden, M = T*K routed rows sent, R rows received.

Per MoE layer and forward:
  1. route locally (router and shared experts are replicated on every rank);
  2. sort this rank's T*K rows by GLOBAL expert: rows for EP rank p are contiguous;
  3. all-to-all the per-expert counts (P x El int64) so each rank knows what it receives;
  4. all-to-all the rows (send splits = rows per destination rank);
  5. received rows arrive grouped by source rank, then by local expert: a stable sort by
     local expert gives contiguous segments for the grouped GEMM;
  6. run the local experts (torch._grouped_mm, or the Triton grouped SwiGLU MLP with
     moe.kernels=triton / auto on CUDA), undo 5, all-to-all back (splits swapped), combine with the
     routing weights exactly as the single-device layer does (torch grouped_mm: the rows'
     routing weights travel with them in a third all-to-all of M scalars and scale the
     experts' activation, then the combine is a per-token sum).
The histogram returned to the layer is this rank's GLOBAL-expert counts, so the
expert-bias update sees the same numbers as without EP (all-reduced over data-parallel
ranks by :func:`count_all_reduce`).

Gradient scaling: each rank backpropagates its own local-mean loss; the all-to-all carries
every rank's contribution back to the expert's owner, so an expert's gradient is the SUM
over data-parallel ranks of local-mean gradients. Dense (replicated) gradients are
AVERAGED over data-parallel ranks; expert gradients must be divided by the same number of
ranks (= dp world size) and then averaged only over their expert-data-parallel replicas.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..moe_layer.dispatcher import ExpertRows, sort_tokens
from ..moe_layer.layer import MoEFeedForward
from ..runs.shards import EXPERT_PARAMS


def guarded(what: str, fn, group=None):
    """Run collective ``fn()``; turn a gloo/nccl timeout or closed connection (a peer rank
    died) into a RuntimeError naming this rank and the peers it was waiting on, so the
    job log says which ranks to look at instead of a bare socket error."""
    try:
        return fn()
    except (RuntimeError, dist.DistError) as exc:
        me = dist.get_rank()
        ranks = dist.get_process_group_ranks(group) if group is not None else list(
            range(dist.get_world_size()))
        peers = [r for r in ranks if r != me]
        raise RuntimeError(f"rank {me}: collective {what} failed waiting on peer rank(s) "
                           f"{peers} (one died or exceeded parallel.timeout_s): {exc}") from exc


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        guarded("all_to_all(tokens)", lambda: dist.all_to_all_single(
            out, x.contiguous(), out_splits, in_splits, group=group), group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gin = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
        guarded("all_to_all(grad)", lambda: dist.all_to_all_single(
            gin, g.contiguous(), in_splits, out_splits, group=ctx.group), ctx.group)
        return gin, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable variable-split all-to-all over ``group`` (rows of ``x``)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class AllToAllDispatcher:
    """The token dispatcher of a layer whose routed experts are sharded over an EP group
    (steps 2-6 of the module doc): sorts this rank's token copies by global expert, sends
    each rank the rows of its experts, sorts the received rows by local expert for the
    experts, and brings the experts' rows back. Backend-independent: the experts (torch
    grouped_mm, loop or Triton) run on the local rows in between."""

    def __init__(self, group, n_experts: int, ep_size: int):
        self.group, self.n_experts, self.ep_size = group, n_experts, ep_size
        self.n_local_experts = n_experts // ep_size

    def for_backend(self, backend: str) -> "AllToAllDispatcher":
        return self

    def dispatch(self, x_TD, weights_TK, indices_TK, fold_weights: bool,
                 pad_to: int = 0) -> ExpertRows:
        """``pad_to`` is not applied: rows travel unpadded (the experts take any counts)."""
        P, El, group = self.ep_size, self.n_local_experts, self.group
        # rows sorted by GLOBAL expert: the rows for EP rank p are contiguous
        x_MD, counts_E, _, _, weights_M, slots = sort_tokens(x_TD, weights_TK, indices_TK,
                                                             self.n_experts, fold_weights)
        send_PEl = counts_E.view(P, El)
        recv_PEl = torch.empty_like(send_PEl)
        guarded("all_to_all(counts)", lambda: dist.all_to_all_single(
            recv_PEl, send_PEl.contiguous(), group=group), group)
        send_splits = send_PEl.sum(1).tolist()
        recv_splits = recv_PEl.sum(1).tolist()
        x_RD = all_to_all(x_MD, recv_splits, send_splits, group)
        # received rows: by source rank, then by local expert -> stable sort by local expert
        local_expert_R = torch.repeat_interleave(
            torch.arange(El, device=x_RD.device).repeat(P), recv_PEl.reshape(-1))
        perm_R = torch.argsort(local_expert_R, stable=True)
        inv_perm_R = torch.empty_like(perm_R)
        inv_perm_R[perm_R] = torch.arange(perm_R.numel(), device=perm_R.device)
        local_counts = recv_PEl.sum(0)
        x_local = x_RD.index_select(0, perm_R)
        offsets_local = torch.cumsum(local_counts, 0).to(torch.int32)
        if weights_M is not None:
            # each row's routing weight travels with it (one all-to-all of M scalars, in
            # x's dtype) and scales the experts' activation; the combine is a per-token sum
            weights_M = all_to_all(weights_M.to(x_MD.dtype).unsqueeze(1), recv_splits,
                                   send_splits, group).squeeze(1).index_select(0, perm_R)
        return ExpertRows(x_local, local_counts, offsets_local, weights_M, counts_E,
                          (inv_perm_R, send_splits, recv_splits, slots))

    def combine(self, y_local: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
        """Undo the local sort, send the rows back (splits swapped), combine per token
        exactly as on one device."""
        inv_perm_R, send_splits, recv_splits, slots = rows.undo
        y_MD = all_to_all(y_local.index_select(0, inv_perm_R), send_splits, recv_splits,
                          self.group)
        return slots.combine(y_MD)


def apply_expert_parallel(model: nn.Module, ep_group=None) -> nn.Module:
    """Shard every MoE layer's routed experts over ``ep_group`` (default: the world).

    Rank r of the group keeps experts [r*E/P, (r+1)*E/P) as its parameters and the layer
    gets an :class:`AllToAllDispatcher`; the router, shared experts and expert bias stay
    replicated. Call on a model that holds the full single-device weights (built from the
    same seed or loaded from a checkpoint) so the sharded model computes the same
    function. In place; returns ``model``.
    """
    P = dist.get_world_size(ep_group)
    r = dist.get_rank(ep_group)
    for layer in [m for m in model.modules() if isinstance(m, MoEFeedForward)]:
        E = layer.n_experts
        if E % P:
            raise ValueError(f"moe.n_routed={E} is not divisible by the expert-parallel size {P}")
        El = E // P
        with torch.no_grad():
            w13 = layer.w13_ED2F[r * El:(r + 1) * El].clone()
            w2 = layer.w2_EFD[r * El:(r + 1) * El].clone()
        layer.w13_ED2F = nn.Parameter(w13)
        layer.w2_EFD = nn.Parameter(w2)
        layer.dispatcher = AllToAllDispatcher(ep_group, E, P)
    return model



def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the sharded (expert) parameters: reduced over expert-data-parallel ranks only."""
    return [n for n, _ in model.named_parameters() if n.endswith(EXPERT_PARAMS)]


def count_all_reduce(group=None):
    """The callable for ``model.update_expert_bias(all_reduce=...)``: exact int64 SUM of
    the token counts over ``group`` (all ranks that see different data), so every rank
    applies the same bias update."""

    def _reduce(counts: torch.Tensor) -> torch.Tensor:
        out = counts.to(torch.int64).clone()
        guarded("all_reduce(expert counts)",
                lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group), group)
        return out

    return _reduce


def average_gradients(model: nn.Module, group=None, expert_divisor: Optional[int] = None) -> None:
    """Plain data-parallel gradient sync for tests and non-DeepSpeed use: dense gradients
    averaged over ``group``; expert gradients (already summed over ranks by the all-to-all
    backward) divided by the data-parallel size (see module doc; one replica per expert)."""
    W = dist.get_world_size(group)
    experts = set(expert_param_names(model))
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        if n in experts:
            p.grad.div_(expert_divisor or W)
        else:
            guarded("all_reduce(grad)", lambda: dist.all_reduce(p.grad, group=group), group)
            p.grad.div_(W)
