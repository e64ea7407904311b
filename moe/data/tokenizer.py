"""Tokenizers with one small interface: ``encode``, ``decode``, ``vocab_size``, ``eos_id``.

* ``"bpe"``: byte-level BPE trained with HF ``tokenizers`` (ByteLevel pre-tokenizer and
  decoder, GPT-2 split regex, no normalizer, so ``decode(encode(s)) == s`` for any string).
  The 256 byte symbols are always in the alphabet, so no text is ever out of vocabulary.
* ``"bytes"``: UTF-8 bytes 0..255 plus ``<|endoftext|>`` = 256 (vocab 257).

``<|endoftext|>`` (``eos_id``) separates documents. It is only ever *inserted* by the
pipeline: ``encode`` treats the literal string "<|endoftext|>" in text as ordinary text
(``encode_special_tokens``), so a corpus cannot forge document boundaries. ``decode``
renders ``eos_id`` as "<|endoftext|>".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .errors import DataError

EOS_TOKEN = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 byte values + <|endoftext|>
MIN_VOCAB = BYTE_VOCAB  # BPE also needs the 256-byte alphabet plus the special token
TOKENIZER_KINDS = ("bpe", "bytes")


class ByteTokenizer:
    """UTF-8 bytes as tokens; ``eos_id`` = 256, ``vocab_size`` = 257."""

    kind = "bytes"
    vocab_size = BYTE_VOCAB
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (its UTF-8 bytes)."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of several texts, as uint16 arrays (no Python int lists: fast)."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; ``eos_id`` becomes "<|endoftext|>", bad UTF-8 becomes U+FFFD."""
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                out.append(buf.decode("utf-8", errors="replace"))
                out.append(EOS_TOKEN)
                buf = bytearray()
            elif 0 <= i < 256:
                buf.append(i)
            else:
                raise DataError(f"token id {i} is outside the bytes tokenizer's vocab (0..256)")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, path: Union[str, Path]) -> None:
        """Write a marker file (the bytes tokenizer has no state)."""
        Path(path).write_text('{"kind": "bytes"}\n')

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class BPETokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` behind the common interface."""

    kind = "bpe"

    def __init__(self, tok) -> None:
        self._tok = tok
        # Literal "<|endoftext|>" in text is text, not a document boundary (see module doc).
        self._tok.encode_special_tokens = True
        eos = tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise DataError(f"BPE tokenizer has no {EOS_TOKEN} token")
        self.eos_id: int = eos
        self.vocab_size: int = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, length: int | None = None,
              show_progress: bool = False) -> "BPETokenizer":
        """Train a byte-level BPE with ``vocab_size`` entries (incl. 256 bytes + EOS).

        ``length`` (number of texts) and ``show_progress`` drive the library's own progress bar.

        A small corpus may run out of merges first; ``vocab_size`` is then smaller than
        asked (still fine for a model whose embedding has ``vocab_size`` rows).
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        check_vocab_size(vocab_size, "bpe")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],  # id 0
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tok)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "BPETokenizer":
        """Load a tokenizer saved by :meth:`save` (HF ``tokenizer.json``)."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"cannot load BPE tokenizer {path}: {e} (delete it to retrain)") from e

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of several texts, encoded in parallel by the Rust library."""
        # encode_batch_fast skips offset tracking, which we never use.
        fn = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encs = fn(list(texts), add_special_tokens=False)
        dtype = np.uint16 if self.vocab_size <= 65535 else np.int32
        return [np.asarray(e.ids, dtype=dtype) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; ``eos_id`` becomes "<|endoftext|>"."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: Union[str, Path]) -> None:
        """Write the HF ``tokenizer.json``."""
        self._tok.save(str(path))

    @property
    def hf_tokenizer(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


Tokenizer = Union[ByteTokenizer, BPETokenizer]


def check_vocab_size(vocab_size: int, kind: str) -> None:
    """Raise DataError unless ``vocab_size`` can hold the ``kind`` tokenizer."""
    if kind not in TOKENIZER_KINDS:
        raise DataError(f"data.tokenizer must be one of {TOKENIZER_KINDS}, got {kind!r}")
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool):
        raise DataError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size={vocab_size} is too small for the {kind!r} tokenizer: it needs "
                        f"at least {MIN_VOCAB} (256 byte values + {EOS_TOKEN})")


def load_tokenizer(kind: str, path: Union[str, Path, None] = None) -> Tokenizer:
    """A ByteTokenizer, or the BPETokenizer saved at ``path``."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        if path is None or not os.path.exists(path):
            raise DataError(f"BPE tokenizer file not found: {path}")
        return BPETokenizer.load(path)
    raise DataError(f"data.tokenizer must be one of {TOKENIZER_KINDS}, got {kind!r}")


# Longest piece of text handed to the tokenizer at once (training and encoding): a huge
# document is cut into pieces of at most this many characters.
CHUNK_CHARS = 1 << 20


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """The last position p in (lo, hi) where a single " " or "\n" sits between two
    non-whitespace characters, or -1. Cutting just before it changes no pre-token of the
    byte-level regex (the space opens the next word either way; a lone newline is its own
    pre-token either way), so the ids of the pieces joined equal the ids of the whole."""
    n = len(text)
    ps, pn = text.rfind(" ", lo, hi), text.rfind("\n", lo, hi)
    while True:
        p = max(ps, pn)
        if p <= lo:
            return -1
        if p + 1 < n and not text[p - 1].isspace() and not text[p + 1].isspace():
            return p
        if p == ps:
            ps = text.rfind(" ", lo, p)
        else:
            pn = text.rfind("\n", lo, p)


def split_text(text: str, max_chars: Optional[int] = None) -> list[str]:
    """``text`` in pieces of at most ``max_chars`` characters, cut at safe boundaries
    (:func:`_safe_cut`, searched in the last half of each window) so that encoding the
    pieces gives the same ids as encoding the whole; a window without one (e.g. 512K
    characters with no single space) is cut hard at its end."""
    max_chars = CHUNK_CHARS if max_chars is None else max_chars
    if len(text) <= max_chars:
        return [text]
    out, start, n = [], 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        p = _safe_cut(text, start + max_chars // 2, end)
        cut = p if p > start else end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def batched_by_bytes(texts: Sequence[str], max_bytes: int = 2 << 20, max_docs: int = 256
                     ) -> Iterator[tuple[int, int]]:
    """(start, stop) chunks of ``texts`` of about ``max_bytes`` characters.

    Chunks are large enough for the Rust thread pool to split across cores, and small
    enough to bound the memory of one chunk's Python id lists and to move the progress bar.
    """
    start, size = 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= max_bytes or i + 1 - start >= max_docs:
            yield start, i + 1
            start, size = i + 1, 0
    if start < len(texts):
        yield start, len(texts)
