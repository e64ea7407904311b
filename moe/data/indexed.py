"""Megatron-core indexed datasets (.bin/.idx): writing, safe opening, and split views.

Our caches are written with ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``
exactly as Megatron's ``tools/preprocess_data.py --append-eod`` would: one sequence per
document, the document's tokens followed by ``eos_id``, one document boundary per
sequence. So a cache prefix can be handed to Megatron, and Megatron-preprocessed data can
be used here as ``corpus="path/to/prefix"``.

A split's *token stream* is the concatenation of its sequences in order. ``TokenSplit``
exposes it with random access (``read(start, length)``) whether the sequences are
contiguous in the .bin (our caches: one ``memmap`` slice) or a hash-selected subset of a
user's dataset (a gather over the few sequences that a window touches).
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import DataError


def megatron_indexed():
    """Import ``megatron.core.datasets.indexed_dataset`` without its import-time noise.

    megatron-core warns at import about missing Transformer Engine / Apex, which this CPU
    data path never needs. Imported lazily: it costs seconds, and ``import moe`` must not.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int):
    """The smallest dtype Megatron would use for ``vocab_size`` ids (uint16 below 65500)."""
    return megatron_indexed().DType.optimal_dtype(vocab_size)


def write_indexed(prefix: Union[str, Path], docs: Sequence[np.ndarray], dtype) -> None:
    """Write ``docs`` (each already ending in EOS) as one sequence + document each.

    Not atomic by itself: callers write into a temporary folder and rename it.
    """
    idx = megatron_indexed()
    prefix = str(prefix)
    builder = idx.IndexedDatasetBuilder(idx.get_bin_path(prefix), dtype=dtype)
    for d in docs:
        builder.add_document(np.asarray(d, dtype=dtype), [len(d)])
    builder.finalize(idx.get_idx_path(prefix))


class IndexedWriter:
    """Streaming form of :func:`write_indexed`: ``add(doc)`` then ``close()``."""

    def __init__(self, prefix: Union[str, Path], dtype) -> None:
        self._idx = megatron_indexed()
        self.prefix = str(prefix)
        self.dtype = dtype
        self._builder = self._idx.IndexedDatasetBuilder(self._idx.get_bin_path(self.prefix),
                                                        dtype=dtype)
        self.num_docs = 0
        self.num_tokens = 0

    def add(self, doc: np.ndarray) -> None:
        """Append one document (its tokens, ending in EOS) as one sequence."""
        self._builder.add_document(np.asarray(doc, dtype=self.dtype), [len(doc)])
        self.num_docs += 1
        self.num_tokens += len(doc)

    def close(self) -> None:
        """Finish the .bin and write the .idx."""
        self._builder.finalize(self._idx.get_idx_path(self.prefix))


_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_PREAMBLE = 9 + 8 + 1 + 8 + 8  # header, version, dtype code, #sequences, #documents


def read_idx_header(idx_path: Union[str, Path]) -> tuple[int, int, int]:
    """Validate a .idx file's header and size; return (dtype code, #sequences, #documents).

    Checked here, before megatron sees the file, so that a bad file gives one clear
    ValueError instead of megatron's bare asserts (and its noisy half-built ``__del__``).
    """
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_INDEX_PREAMBLE)
    if len(head) < _INDEX_PREAMBLE:
        raise ValueError(f"{size} bytes is shorter than the {_INDEX_PREAMBLE}-byte .idx header")
    if head[:9] != _INDEX_HEADER:
        raise ValueError(f"bad magic {head[:9]!r}, expected {_INDEX_HEADER!r}")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise ValueError(f"unsupported .idx version {version}")
    megatron_indexed().DType.dtype_from_code(code)  # raises on an unknown dtype code
    need = _INDEX_PREAMBLE + n_seq * (4 + 8) + n_doc * 8
    if size < need:
        raise ValueError(f".idx has {size} bytes but its header announces {n_seq} sequences and "
                         f"{n_doc} document boundaries ({need} bytes)")
    return code, n_seq, n_doc


def open_indexed(prefix: Union[str, Path], what: str = "indexed dataset",
                 allow_empty: bool = False):
    """Open ``prefix.bin/.idx`` memory-mapped, turning any failure into one DataError.

    Megatron raises AssertionError (bad header/version, inconsistent counts), struct.error
    or ValueError (truncated .idx) on bad files, and never checks the .bin length; here the
    header and sizes are validated first and every sequence must lie inside the .bin, so a
    truncated file fails now, not as a crash mid-training. A dataset with no sequences
    cannot be memory-mapped (empty .bin): with ``allow_empty`` it returns None, otherwise
    it is a DataError.
    """
    idx = megatron_indexed()
    prefix = str(prefix)
    idx_path, bin_path = idx.get_idx_path(prefix), idx.get_bin_path(prefix)
    for p in (idx_path, bin_path):
        if not os.path.isfile(p):
            raise DataError(f"{what}: {p} does not exist")
    try:
        _, n_seq, _ = read_idx_header(idx_path)
        if n_seq == 0:
            if allow_empty:
                return None
            raise DataError(f"{what}: {idx_path} is empty (0 sequences)")
        ds = idx.IndexedDataset(prefix, mmap=True)
        lengths = ds.index.sequence_lengths
        pointers = ds.index.sequence_pointers
        docs = ds.index.document_indices
        if len(docs) == 0 or docs[0] != 0 or np.any(np.diff(docs) < 0):
            raise ValueError("document indices are not increasing from 0")
        if lengths.min() < 0 or pointers.min() < 0:
            raise ValueError("negative sequence length or pointer")
        itemsize = np.dtype(ds.index.dtype).itemsize
        end = int((pointers.astype(np.int64) + lengths.astype(np.int64) * itemsize).max())
        size = os.path.getsize(bin_path)
        if end > size:
            raise ValueError(f".bin has {size} bytes but the index needs {end}")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{what}: {idx_path} / {bin_path} is corrupt or truncated and cannot be "
                        f"read ({type(e).__name__}: {e}); delete or regenerate it") from e
    return ds


class TokenSplit:
    """One split's token stream over an ``IndexedDataset`` (a thin, read-only wrapper).

    Args:
        dataset: an open megatron ``IndexedDataset``, or None for an empty split.
        name: split name used in messages (``"train"``/``"val"``).
        sequences: indices of the sequences in the split, in order; None = all of them.
        num_docs: number of documents (for stats); defaults to the number of sequences.

    Attributes: ``indexed`` (the IndexedDataset), ``name``, ``num_tokens``, ``num_docs``,
    ``dtype``. ``len(split)`` is ``num_tokens``.
    """

    def __init__(self, dataset, name: str, sequences: Optional[np.ndarray] = None,
                 num_docs: Optional[int] = None) -> None:
        self.indexed = dataset
        self.name = name
        if dataset is None:  # an empty split (e.g. val_fraction=0): nothing to memory-map
            self.dtype = np.dtype(np.uint16)
            self.sequences = np.zeros(0, dtype=np.int64)
            self._cum = np.zeros(1, dtype=np.int64)
            self.num_tokens, self.num_docs = 0, 0
            self._flat = np.zeros(0, dtype=self.dtype)
            return
        lengths = dataset.index.sequence_lengths.astype(np.int64)
        pointers = dataset.index.sequence_pointers
        self.dtype = np.dtype(dataset.index.dtype)
        itemsize = self.dtype.itemsize
        if sequences is None:
            sequences = np.arange(len(lengths), dtype=np.int64)
        self.sequences = np.asarray(sequences, dtype=np.int64)
        sel = lengths[self.sequences]
        # cum[i] = first stream position of sequence i of the split.
        self._cum = np.concatenate([[0], np.cumsum(sel)]).astype(np.int64)
        self.num_tokens = int(self._cum[-1])
        self.num_docs = len(self.sequences) if num_docs is None else num_docs
        # Fast path: sequences laid end to end in the .bin (always true for our caches) ->
        # the whole stream is one memory-mapped array and a window is a slice.
        self._flat: Optional[np.ndarray] = None
        if len(self.sequences) and np.all(np.diff(self.sequences) == 1):
            ptr = pointers[self.sequences].astype(np.int64)
            if np.all(ptr[1:] == ptr[:-1] + sel[:-1] * itemsize):
                self._flat = dataset.bin_reader.read(dtype=self.dtype, count=self.num_tokens,
                                                     offset=int(ptr[0]))
        elif len(self.sequences) == 0:
            self._flat = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream (a view when contiguous)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"{self.name} split: window [{start}, {start + length}) is outside "
                             f"its {self.num_tokens} tokens")
        if self._flat is not None:
            return self._flat[start:start + length]
        first = int(np.searchsorted(self._cum, start, side="right")) - 1
        parts, pos, i = [], start, first
        while pos < start + length:
            off = pos - int(self._cum[i])
            take = min(int(self._cum[i + 1]) - pos, start + length - pos)
            if take > 0:
                parts.append(self.indexed.get(int(self.sequences[i]), offset=off, length=take))
            pos += take
            i += 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def tokens(self) -> np.ndarray:
        """The whole stream as one array (a memmap view when contiguous)."""
        return self.read(0, self.num_tokens)

    def __repr__(self) -> str:
        return f"TokenSplit({self.name!r}, docs={self.num_docs}, tokens={self.num_tokens})"
