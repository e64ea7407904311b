"""moe-testbed: a DeepSeek-V3-style MoE transformer, its training, and scaling-law fits.

Heavy dependencies (deepspeed, megatron-core, triton) are imported lazily by the modules
that need them, so ``import moe`` costs only torch.
"""

from .accounting import ParamCounts, count_params
from .config import (Config, ConfigError, DataConfig, ModelConfig, MoEConfig, MTPConfig,
                     ParallelConfig, TrainConfig, load_config)
from .model import Transformer, build_model
from .moe_layer.router import route


def load_model(path, device: str = "cpu"):
    """(model, config) of a run directory, checkpoint directory or imported run; see
    moe/runs/load.py. ``model.logits(tokens_BS)`` returns the main head's (B, S, V) logits."""
    from .runs.load import load_model as load

    return load(path, device)


__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "MoEConfig", "MTPConfig",
    "ParallelConfig", "TrainConfig", "load_config", "count_params", "ParamCounts",
    "Transformer", "build_model", "route", "load_model",
]
