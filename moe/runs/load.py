"""A trained model from its run directory, for evaluation and export.

    python -c "import moe; m, cfg = moe.load_model('RUN_DIR'); print(m.logits(tokens).shape)"

:func:`load_model` accepts a run directory (its newest usable checkpoint, TP/EP shards
merged), a checkpoint directory (``RUN_DIR/checkpoints/step_*``) or an imported run
(``model.pt`` beside ``config.yaml``, as ``moe-testbed import-hf`` writes it). The config is
the run's ``config.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, load_config
from ..model import build_model
from .checkpoint import load_file, usable_checkpoint
from .shards import load_consolidated


class LoadError(ValueError):
    """A path holds no model to load (missing, no config.yaml, no usable checkpoint or
    model.pt); the message says which."""


def run_config(run_dir: Path) -> Config:
    """The config of run directory ``run_dir`` (its config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise LoadError(f"{run_dir} is not a run directory (no config.yaml)")
    return load_config(path)


def load_model(path, device: str = "cpu"):
    """(model, config) from a run directory (its newest usable checkpoint, TP/EP shards
    merged), a checkpoint directory, or an imported run (model.pt beside config.yaml).
    The model is in eval mode; ``model.logits(tokens_BS)`` gives the main head's logits."""
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{p} does not exist")
    if (p / "meta.json").is_file():  # a checkpoint directory
        ck, run_dir = p, p.parent.parent
    else:
        run_dir = p
        ck, problems = usable_checkpoint(run_dir)
        if ck is None and problems:
            raise LoadError(f"no usable checkpoint in {run_dir}: {'; '.join(problems)}")
    cfg = run_config(run_dir)
    if ck is not None:
        sd = load_consolidated(ck)
    elif (run_dir / "model.pt").is_file():
        sd = load_file(run_dir / "model.pt")
    else:
        raise LoadError(f"{run_dir} has neither a checkpoint nor model.pt")
    model = build_model(cfg)
    model.load_state_dict(sd)
    return model.to(device).eval(), cfg
