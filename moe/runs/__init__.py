"""Run directories on disk: atomic writes (more to come here: the lock, checkpoints,
shards, consolidation, loading a trained model)."""

from .atomic import atomic_open, atomic_path, atomic_write, fsync_dir

__all__ = ["atomic_open", "atomic_path", "atomic_write", "fsync_dir"]
