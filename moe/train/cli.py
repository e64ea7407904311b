"""``moe-testbed train CONFIG [key=value ...] [--resume] [--out DIR] [--no-progress]``.

Exit codes: 0 finished; 2 unusable input (config, data, run directory -- also one held by
another live process, named by its pid, or a checkpoint that cannot be trusted) --
reported as one ``error: ...`` line before any compute; 3 stopped on a non-finite loss
(the last good checkpoint is kept and named in the message); 75 stopped by SIGTERM,
SIGINT or SIGUSR1 (preemption, Ctrl-C, Slurm's time-limit warning) after a checkpoint at
the current step: ``--resume`` continues it exactly.

Works the same under ``torchrun --nproc_per_node N -m moe.cli train ...`` (data parallel);
only rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import sys


def _print0(*args, **kw) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kw)


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``moe-testbed train``; returns the process exit code."""
    from ..config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="moe-testbed train",
                                description="Train a model with DeepSpeed (CPU: gloo, fp32).")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=50")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: newest runs/<name>-*) exactly")
    p.add_argument("--out", help="run directory (default runs/<name>-<UTC timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    a = p.parse_args(argv)

    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        _print0(f"error: {e}", file=sys.stderr)
        return 2

    from ..data import DataError
    from ..runs.process import EXIT_STOPPED
    from .loop import TrainError, train

    try:
        res = train(cfg, a.out, resume=a.resume, progress=not a.no_progress,
                    config_path=a.config)
    except (ConfigError, DataError, TrainError) as e:
        _print0(f"error: {e}", file=sys.stderr)
        return 2
    s, d = res.summary, res.run_dir
    if res.exit_code == EXIT_STOPPED:
        _print0(f"stopped: {s.get('message')}", file=sys.stderr)
    elif res.exit_code != 0:
        _print0(f"error: {s.get('message') or s.get('status')}", file=sys.stderr)
    else:
        ev = s.get("final_eval_loss")
        _print0(f"done: {s['steps']} steps, {s['tokens']:,} tokens, "
                f"final eval loss {ev:.4f}, {s['wall_time_s']:.0f} s" if ev is not None else
                f"done: {s['steps']} steps")
    _print0(f"metrics: {d / 'metrics.jsonl'}\nplot:    {d / 'training.png'}\n"
            f"summary: {d / 'summary.json'}")
    return res.exit_code
