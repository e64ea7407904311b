"""Training: a DeepSpeed-driven loop behind ``moe-testbed train``.

    engine.py      DeepSpeed JSON generated from the Config, process group, AdamW groups,
                   warmup + cosine LambdaLR, weights_only-safe optimizer state
    loop.py        train(): evaluation, budgets, MTP lambda, expert-bias all-reduce, NaN stop
    metrics.py     metrics.jsonl (append-safe on resume), TensorBoard, matmul peak for MFU
    plots.py       RUN_DIR/training.png (``moe-testbed plot-run``)
    cli.py         ``moe-testbed train``

Checkpoints, the run-directory lock and shard files live in :mod:`moe.runs`. Heavy
imports (deepspeed) happen inside the functions that need them.
"""

from .engine import deepspeed_config, lr_multiplier, param_groups, resolve_precision

__all__ = ["deepspeed_config", "lr_multiplier", "param_groups", "resolve_precision", "train"]


def train(*args, **kwargs):
    """See :func:`moe.train.loop.train`."""
    from .loop import train as _train

    return _train(*args, **kwargs)
