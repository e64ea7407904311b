"""Deterministic, resumable token batches cut from a split's token stream.

Sample layout. With ``L = seq_len + 1 + extra_tokens``, sample ``i`` of a split is the
window ``stream[i * seq_len : i * seq_len + L]``: the model reads the first ``seq_len``
tokens and predicts the shifted ones; the ``extra_tokens`` lookahead feeds multi-token
prediction. Input parts of consecutive samples do not overlap (stride ``seq_len``), so
one epoch predicts every token of the split once -- the 1 + extra lookahead tokens of a
sample are the first inputs of the next one (Megatron's GPTDataset convention). A split
of ``T`` tokens has ``(T - 1 - extra_tokens) // seq_len`` samples; documents are joined
by EOS in the stream, so windows span document boundaries.

Order. Training is an infinite sequence of epochs; epoch ``e`` visits all samples in the
order ``numpy.random.default_rng([seed, e]).permutation(n)``. Global batch ``k`` is
global samples ``k*B*W .. (k+1)*B*W - 1`` of that sequence (``B`` per-rank batch size,
``W`` world size; a batch may straddle two epochs), and rank ``r`` takes its entries
``r, r + W, r + 2W, ...``. The position is one integer (global samples consumed), so a
resumed run -- even with another W, as long as ``B*W`` divides it -- continues with
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch

from .errors import DataError
from .indexed import TokenSplit


def _as_split(dataset, name: str = "data") -> TokenSplit:
    """Accept a TokenSplit or a raw megatron IndexedDataset (wrapped whole)."""
    if isinstance(dataset, TokenSplit):
        return dataset
    if hasattr(dataset, "index") and hasattr(dataset, "bin_reader"):
        return TokenSplit(dataset, name)
    raise DataError(f"expected a TokenSplit or megatron IndexedDataset, got {type(dataset).__name__}")


def num_samples(num_tokens: int, seq_len: int, extra_tokens: int = 0) -> int:
    """How many windows of ``seq_len + 1 + extra_tokens`` tokens, stride ``seq_len``, fit."""
    return max(0, (num_tokens - 1 - extra_tokens) // seq_len)


def _check_args(split: TokenSplit, batch_size: int, seq_len: int, extra_tokens: int,
                rank: int = 0, world_size: int = 1) -> int:
    for name, v, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1),
                        ("extra_tokens", extra_tokens, 0), ("world_size", world_size, 1),
                        ("rank", rank, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise DataError(f"{name} must be an int >= {lo}, got {v!r}")
    if rank >= world_size:
        raise DataError(f"rank={rank} must be < world_size={world_size}")
    n = num_samples(split.num_tokens, seq_len, extra_tokens)
    if n == 0:
        need = seq_len + 1 + extra_tokens
        hint = "a larger corpus or val_fraction" if split.name == "val" else "a larger corpus"
        raise DataError(f"the {split.name} split has {split.num_tokens} tokens, too few for one "
                        f"sequence of seq_len={seq_len} (+1 target +{extra_tokens} extra = {need} "
                        f"tokens); use a smaller seq_len or {hint}")
    return n


def _gather(split: TokenSplit, samples: np.ndarray, seq_len: int, length: int) -> torch.Tensor:
    out = np.empty((len(samples), length), dtype=np.int64)
    for row, s in enumerate(samples):
        out[row] = split.read(int(s) * seq_len, length)
    return torch.from_numpy(out)


class TokenBatches:
    """Infinite, seeded, resumable batches of shape ``(batch_size, seq_len + 1 + extra_tokens)``.

    Args:
        dataset: a TokenSplit (``PreparedData.train``) or a megatron IndexedDataset.
        batch_size: samples per batch on this rank (the global batch is ``batch_size * world_size``).
        seq_len: model context length.
        extra_tokens: additional lookahead tokens per sample (multi-token prediction depth).
        seed: seeds the per-epoch permutations.
        rank, world_size: data-parallel position; ranks read disjoint samples of the same
            global batch (see the module docstring).

    Iterate it (``next(batches)``) for ``torch.int64`` tensors; ``state_dict()`` /
    ``load_state_dict()`` save and restore the position.
    """

    def __init__(self, dataset, batch_size: int, seq_len: int, extra_tokens: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.split = _as_split(dataset, "train")
        self.num_samples = _check_args(self.split, batch_size, seq_len, extra_tokens, rank,
                                       world_size)
        self.batch_size, self.seq_len, self.extra_tokens = batch_size, seq_len, extra_tokens
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.sample_len = seq_len + 1 + extra_tokens
        self.consumed = 0  # global samples consumed so far (all ranks together)
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[np.ndarray] = None

    @property
    def global_batch_size(self) -> int:
        """Samples per step over all ranks."""
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be read."""
        return self.consumed // self.num_samples

    @property
    def step(self) -> int:
        """Batches consumed so far."""
        return self.consumed // self.global_batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def _global_samples(self, start: int, count: int) -> np.ndarray:
        """Sample indices at global positions ``start .. start + count - 1``."""
        out = np.empty(count, dtype=np.int64)
        pos = 0
        while pos < count:
            epoch, within = divmod(start + pos, self.num_samples)
            take = min(count - pos, self.num_samples - within)
            out[pos:pos + take] = self._permutation(epoch)[within:within + take]
            pos += take
        return out

    def __iter__(self) -> "TokenBatches":
        return self

    def __next__(self) -> torch.Tensor:
        glob = self._global_samples(self.consumed, self.global_batch_size)
        mine = glob[self.rank::self.world_size]
        self.consumed += self.global_batch_size
        return _gather(self.split, mine, self.seq_len, self.sample_len)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data position: ``consumed_samples`` (global) plus checks for a resume."""
        return {"consumed_samples": int(self.consumed), "seed": self.seed,
                "num_samples": int(self.num_samples), "seq_len": self.seq_len,
                "extra_tokens": self.extra_tokens}

    def load_state_dict(self, state) -> None:
        """Continue from ``state`` (a dict from :meth:`state_dict`, or a bare int = consumed samples).

        Raises DataError if the state belongs to other data (sample count, seq_len, seed)
        or cannot be split into whole global batches of this loader.
        """
        if isinstance(state, (int, np.integer)):
            state = {"consumed_samples": int(state)}
        consumed = int(state["consumed_samples"])
        for key, mine in (("seed", self.seed), ("num_samples", self.num_samples),
                          ("seq_len", self.seq_len), ("extra_tokens", self.extra_tokens)):
            if key in state and state[key] != mine:
                raise DataError(f"loader state has {key}={state[key]} but this loader has {key}="
                                f"{mine}: it was saved for other data or settings")
        if consumed < 0 or consumed % self.global_batch_size:
            raise DataError(f"loader state consumed_samples={consumed} is not a whole number of "
                            f"global batches of {self.global_batch_size}")
        self.consumed = consumed


def eval_batches(dataset, batch_size: int, seq_len: int, extra_tokens: int = 0,
                 max_batches: Optional[int] = None, rank: int = 0,
                 world_size: int = 1, yield_empty: bool = False) -> Iterator[Optional[torch.Tensor]]:
    """Batches over a whole split, in stream order (fixed: no shuffling, one pass).

    Sample ``i`` is the same window as in training (stride ``seq_len``), so one pass
    predicts every token of the split once (bar the tail that does not fill a window).
    Global batch ``k`` is samples ``k*B*W ..``; rank ``r`` takes entries ``r, r+W, ...``.
    The last batch may be smaller (and empty ranks skip it), so sum loss*tokens per rank
    and all-reduce once rather than averaging per batch. ``max_batches`` limits the number
    of global batches. ``yield_empty``: yield ``None`` instead of skipping a batch in which
    this rank has no sample, so every rank sees the same number of batches (needed when
    the forward pass is a collective, as with expert parallelism's all-to-all).
    """
    split = _as_split(dataset, "val")
    n = _check_args(split, batch_size, seq_len, extra_tokens, rank, world_size)
    gbs = batch_size * world_size
    total = -(-n // gbs)
    if max_batches is not None:
        total = min(total, max(0, int(max_batches)))
    length = seq_len + 1 + extra_tokens
    for k in range(total):
        mine = np.arange(k * gbs, min((k + 1) * gbs, n), dtype=np.int64)[rank::world_size]
        if len(mine):
            yield _gather(split, mine, seq_len, length)
        elif yield_empty:
            yield None
