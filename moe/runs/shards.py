"""Model shards on disk: how a tensor- / expert-parallel run splits its weights into
files, and how they are merged back into the single-device state dict.

A checkpoint of a run with ``parallel.tp > 1`` or ``parallel.ep > 1`` holds one model file
per (tp rank, ep rank) shard, :func:`shard_filename` (``model_tpTT_epEEE.pt``), written by
the shard's first expert-data-parallel replica; ``tp = ep = 1`` writes ``model.pt``.
The layout of a shard (what :mod:`moe.parallel` cuts, what :func:`consolidate_shards`
glues back):

* routed-expert weights (:data:`EXPERT_PARAMS`) are split over the EP ranks along dim 0
  (experts);
* attention and dense/shared FFN projections (names as in :mod:`moe.layers`) are split
  over the TP ranks: column-parallel ones along their output dim (0), row-parallel ones
  along their input dim (1); a shard names them ``<name>.inner.weight`` (megatron's
  parallel linear inside moe.parallel.tensor_parallel's wrapper);
* everything else is replicated: shard (0, 0) holds it.

``moe-testbed consolidate CKPT --out FILE`` (:func:`consolidate_main`) writes the merged
state dict as one file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint import (CKPT_DIR, check_checkpoint, load_file, read_meta, save_file,
                         usable_checkpoint)

# Which projections are sharded how over the TP ranks, per module kind.
ATTN_COLUMN, ATTN_ROW = ("wq", "wk", "wv"), ("wo",)
# MLA: the per-head up-projections by heads; the latent down-projections wq_a / wkv_a
# (and their norms) stay replicated, as the input of a column-parallel layer does.
MLA_COLUMN, MLA_ROW = ("wq", "wq_b", "wkv_b"), ("wo",)
FFN_COLUMN, FFN_ROW = ("w1", "w3"), ("w2",)
COLUMN_PARALLEL = ATTN_COLUMN + MLA_COLUMN[1:] + FFN_COLUMN  # output dim (0) sharded
ROW_PARALLEL = ATTN_ROW + FFN_ROW  # input dim (1) sharded

EXPERT_PARAMS = ("w13_ED2F", "w2_EFD")  # MoEFeedForward's routed-expert weights

_INNER = ".inner.weight"  # the megatron layer inside tensor_parallel._Linear


def shard_filename(tp_rank: int, ep_rank: int) -> str:
    """Checkpoint file of one (tensor-parallel rank, expert-parallel rank) model shard."""
    return f"model_tp{tp_rank:02d}_ep{ep_rank:03d}.pt"


def consolidate_shards(shards: dict[tuple[int, int], dict], tp: int, ep: int) -> dict:
    """Merge per-(tp rank, ep rank) model state dicts into the single-device state dict
    (the keys and shapes ``build_model(cfg).state_dict()`` has): expert weights
    concatenated over EP ranks, TP projections over TP ranks, replicated tensors taken
    from shard (0, 0)."""
    missing = [(t, e) for t in range(tp) for e in range(ep) if (t, e) not in shards]
    if missing:
        raise ValueError(f"missing model shards (tp rank, ep rank): {missing}")
    out = {}
    for k, v in shards[(0, 0)].items():
        if k.endswith(".inner._extra_state"):
            continue  # megatron's parallel linears keep an (empty) extra state for FP8 recipes
        if ep > 1 and k.endswith(EXPERT_PARAMS):
            out[k] = torch.cat([shards[(0, e)][k] for e in range(ep)], 0)
        elif k.endswith(_INNER):
            name = k[:-len(_INNER)]
            dim = 0 if name.rsplit(".", 1)[-1] in COLUMN_PARALLEL else 1  # else row: inputs
            out[name + ".weight"] = torch.cat([shards[(t, 0)][k] for t in range(tp)], dim)
        else:
            out[k] = v
    return out


def load_consolidated(checkpoint_dir) -> dict:
    """The single-device model state dict of a checkpoint directory written with any
    parallel layout (``model.pt`` as is, or its TP/EP shards merged)."""
    d = Path(checkpoint_dir)
    par = read_meta(d).get("parallel", {"tp": 1, "ep": 1})
    tp, ep = par["tp"], par["ep"]
    if tp == 1 and ep == 1:
        return load_file(d / "model.pt")
    shards = {(t, e): load_file(d / shard_filename(t, e)) for t in range(tp) for e in range(ep)}
    return consolidate_shards(shards, tp, ep)


def consolidate_main(argv: list[str]) -> int:
    """``moe-testbed consolidate CKPT_DIR --out FILE``: write the single-device state dict
    of a (possibly TP/EP-sharded) checkpoint as one ``torch.save`` file."""
    import argparse

    p = argparse.ArgumentParser(prog="moe-testbed consolidate",
                                description="Merge a sharded checkpoint into one model state dict.")
    p.add_argument("path", help="a checkpoint directory (step_*) or a run directory (its latest)")
    p.add_argument("--out", required=True, help="output file (.pt)")
    a = p.parse_args(argv)
    d = Path(a.path)
    if d.is_dir() and (d / CKPT_DIR).is_dir():  # a run directory: its newest usable one
        latest, problems = usable_checkpoint(d)
        if latest is None:
            why = "; ".join(problems) if problems else "it has no checkpoint"
            print(f"error: nothing to consolidate in {d}: {why}", file=sys.stderr)
            return 2
        for problem in problems:
            print(f"warning: {problem}; consolidating {latest}", file=sys.stderr)
        d = latest
    elif not (d / "meta.json").exists():
        print(f"error: {d} is neither a checkpoint directory nor a run directory with "
              "checkpoints", file=sys.stderr)
        return 2
    else:  # (usable_checkpoint checked the run directory's choice already)
        problem = check_checkpoint(d)
        if problem is not None:  # meta.json unreadable / a listed file missing or truncated
            print(f"error: cannot consolidate {d}: {problem}", file=sys.stderr)
            return 2
    try:
        state = load_consolidated(d)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        # corrupt shard files, or a meta.json whose parallel layout is not {tp: int, ep: int}
        print(f"error: cannot consolidate {d}: {e}", file=sys.stderr)
        return 2
    try:
        save_file(state, Path(a.out))
    except OSError as e:
        print(f"error: cannot write {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    print(f"{d} -> {a.out}: {len(state)} tensors, {n:,} elements")
    return 0
