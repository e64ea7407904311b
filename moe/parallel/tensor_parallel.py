"""Tensor parallelism for attention and dense/shared SwiGLU FFNs with megatron-core's
ColumnParallelLinear / RowParallelLinear (Megatron-LM's 1-D scheme).

    wq, wk, wv, w1, w3 -> ColumnParallelLinear(gather_output=False): output dim sharded,
                          i.e. attention heads / FFN hidden units split over the TP ranks
    (MLA: wq or wq_b, and wkv_b, by heads; the latent projections wq_a / wkv_a replicated)
    wo, w2             -> RowParallelLinear(input_is_parallel=True): input dim sharded,
                          partial products all-reduced over the TP group
The single-device modules need no change: Attention infers its local head count from the
projection widths. Routed experts and the router are left replicated across TP ranks.
Shards are copied from the full single-device weights, so TP=n computes the same
function as TP=1. Requires megatron's parallel_state to be initialised (init_topology).
Which projections are split how is the checkpoint shard layout, kept with its reader in
:mod:`moe.runs.shards`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..layers import Attention, MLAttention, SwiGLU
from ..runs.shards import ATTN_COLUMN, ATTN_ROW, FFN_COLUMN, FFN_ROW, MLA_COLUMN, MLA_ROW


class _Linear(nn.Module):
    """Drop-in for nn.Linear around a megatron parallel linear (which returns (out, bias))."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x):
        return self.inner(x)[0]


def _parallel_linear(full: nn.Linear, kind: str, tp: int, rank: int, mp_config, tp_group=None) -> _Linear:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    out_f, in_f = full.weight.shape
    noop = lambda w: None  # noqa: E731  (weights are copied from the full layer below)
    if kind == "column":
        if out_f % tp:
            raise ValueError(f"output size {out_f} is not divisible by parallel.tp={tp}")
        layer = ColumnParallelLinear(in_f, out_f, config=mp_config, init_method=noop, bias=False,
                                     gather_output=False, tp_group=tp_group)
        shard = full.weight[rank * out_f // tp:(rank + 1) * out_f // tp]
    else:
        if in_f % tp:
            raise ValueError(f"input size {in_f} is not divisible by parallel.tp={tp}")
        layer = RowParallelLinear(in_f, out_f, config=mp_config, init_method=noop, bias=False,
                                  input_is_parallel=True, skip_bias_add=False,
                                  tp_group=tp_group)
        shard = full.weight[:, rank * in_f // tp:(rank + 1) * in_f // tp]
    with torch.no_grad():
        layer.weight.copy_(shard)
    # megatron sets these only when it initialises the weight itself (perform_initialization);
    # gradient-norm code (ours, DeepSpeed's, megatron's) reads them to sum shards over TP.
    set_tensor_model_parallel_attributes(layer.weight, True, 0 if kind == "column" else 1, 1)
    return _Linear(layer)


def apply_tensor_parallel(model: nn.Module, tp_group=None) -> nn.Module:
    """Swap attention (wq/wk/wv by heads, wo) and dense/shared FFN (w1/w3, w2)
    projections for megatron TP layers, in place, copying this rank's shards from the
    model's full single-device weights. ``tp_group``: default megatron's tensor-parallel
    group (init_topology must have run). Returns ``model``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig

    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = torch.distributed.get_world_size(tp_group)
    rank = torch.distributed.get_rank(tp_group)
    if tp == 1:
        return model
    dtype = next(model.parameters()).dtype
    mp_config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                    perform_initialization=False, params_dtype=dtype)
    for mod in list(model.modules()):
        if isinstance(mod, Attention):
            column, row = ATTN_COLUMN, ATTN_ROW
        elif isinstance(mod, MLAttention):
            column = tuple(n for n in MLA_COLUMN if hasattr(mod, n))
            row = MLA_ROW
            from megatron.core.tensor_parallel.mappings import \
                copy_to_tensor_model_parallel_region

            mod.shared_key_hook = lambda t, g=tp_group: copy_to_tensor_model_parallel_region(t, g)
        elif isinstance(mod, SwiGLU):
            column, row = FFN_COLUMN, FFN_ROW
        else:
            continue
        for kind, names in (("column", column), ("row", row)):
            for name in names:
                setattr(mod, name, _parallel_linear(getattr(mod, name), kind, tp, rank, mp_config,
                                                    tp_group))
    return model
