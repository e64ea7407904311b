"""Run directories on disk: the ground floor that training, the ladder, export and
evaluation build on (it imports nothing of moe but moe.config and moe.model).

    atomic.py      atomic file replacement (atomic_write / atomic_open / atomic_path)
    lock.py        one live process per run directory (flock on DIR/.lock), RunDirError
    process.py     child processes that die with their parent
    checkpoint.py  atomic, pickle-free checkpoints (RUN_DIR/checkpoints/step_*) + RNG state
    shards.py      TP/EP model shard files: names, layout, consolidation
    load.py        load_model: a trained model from a run or checkpoint directory
"""

from .atomic import atomic_open, atomic_path, atomic_write, fsync_dir

__all__ = ["atomic_open", "atomic_path", "atomic_write", "fsync_dir"]
