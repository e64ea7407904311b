"""Corpus discovery, document reading and the deterministic train/val split.

Accepted corpora (the ``corpus`` argument / ``DataConfig.corpus``):

``"stdlib"`` (default)
    The Python standard library source of the *running* interpreter
    (``sysconfig.get_paths()["stdlib"]``): every ``*.py`` file under it, recursively,
    excluding the top-level ``site-packages`` / ``dist-packages`` folders (third-party
    code, which differs between machines). The stdlib's own test suites (``test/``,
    ``idlelib/idle_test``, ``lib2to3/tests``, ...) are *included*: that is what gives the
    expected ~1,800 files / ~31 MB on CPython 3.11 (measured on 3.11.7: 1,790 files,
    31.5 MB; dropping the test folders would leave only 734 files / 12 MB).
    One file is one document.

a folder
    Every regular file under it, recursively, except hidden files/folders (name starts
    with ``.``), ``__pycache__`` and binary files (a NUL byte in the first 8 KiB). One file
    is one document.

a ``.jsonl`` file
    One JSON object per line with a string ``"text"`` field; one row is one document.
    Blank lines are skipped.

a Megatron indexed-dataset prefix
    ``path/to/prefix`` such that ``prefix.idx`` and ``prefix.bin`` exist (``prefix.idx``
    or ``prefix.bin`` themselves are accepted too). Handled in :mod:`moe.data.indexed`.

Text files are decoded as UTF-8 with invalid bytes replaced by U+FFFD (a handful of
stdlib test files are deliberately Latin-1); empty documents are dropped.

Documents are ordered by their path relative to the corpus root (POSIX separators), so
the order does not depend on the file system's listing order. The held-out split is
chosen per document from a SHA-256 hash of a *key* -- the relative path for folders and
the stdlib, the text itself for JSONL rows -- so it is identical on every machine and
independent of document order (hashlib, not ``hash()``, which is salted per process).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .errors import DataError

STDLIB = "stdlib"
# Top-level folders of the stdlib root holding third-party packages, not stdlib code.
_STDLIB_EXCLUDE_TOP = {"site-packages", "dist-packages"}
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One document: ``key`` feeds the split hash (and names the document in errors)."""

    key: str
    text: str


@dataclass(frozen=True)
class CorpusSource:
    """A resolved corpus argument.

    kind: ``"stdlib"``, ``"folder"``, ``"jsonl"`` or ``"indexed"``.
    path: the folder root, the JSONL file, or the indexed-dataset prefix.
    spec: the corpus argument as given (for messages).
    """

    kind: str
    path: Path
    spec: str

    def describe(self) -> str:
        """Short human description, e.g. ``stdlib (/usr/lib/python3.11)``."""
        return f"{self.kind} ({self.path})"


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def resolve_corpus(corpus: str) -> CorpusSource:
    """Turn the ``corpus`` argument into a :class:`CorpusSource`, or raise DataError.

    Args:
        corpus: ``"stdlib"``, a folder, a ``.jsonl`` file, or a Megatron ``.bin/.idx``
            prefix (see the module docstring).
    """
    if not isinstance(corpus, (str, os.PathLike)) or str(corpus) == "":
        raise DataError(f"data.corpus must be 'stdlib' or a path, got {corpus!r}")
    spec = str(corpus)
    if spec == STDLIB:
        return CorpusSource("stdlib", stdlib_root(), spec)
    path = Path(spec).expanduser()
    # A Megatron prefix names no file itself; accept the .idx/.bin path as well.
    prefix = path.with_suffix("") if path.suffix in (".idx", ".bin") else path
    if Path(str(prefix) + ".idx").is_file() or Path(str(prefix) + ".bin").is_file():
        if not Path(str(prefix) + ".idx").is_file():
            raise DataError(f"data.corpus: indexed dataset {prefix} has a .bin but no .idx file "
                            f"({prefix}.idx is missing)")
        if not Path(str(prefix) + ".bin").is_file():
            raise DataError(f"data.corpus: indexed dataset {prefix} has a .idx but no .bin file "
                            f"({prefix}.bin is missing)")
        return CorpusSource("indexed", prefix.resolve(), spec)
    if not path.exists():
        raise DataError(f"data.corpus path does not exist: {path} (expected 'stdlib', a folder, "
                        f"a .jsonl file, or a Megatron prefix with .bin/.idx files)")
    if path.is_dir():
        return CorpusSource("folder", path.resolve(), spec)
    if path.suffix == ".jsonl":
        return CorpusSource("jsonl", path.resolve(), spec)
    raise DataError(f"data.corpus: unsupported file {path}: give a folder of text files, a .jsonl "
                    f"file with a 'text' field per row, or a Megatron .bin/.idx prefix")


def list_files(source: CorpusSource) -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of a stdlib/folder corpus, sorted by relative path."""
    root = source.path
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        keep = []
        for d in dirnames:
            if d.startswith(".") or d == "__pycache__":
                continue
            if source.kind == "stdlib" and rel_dir == Path(".") and d in _STDLIB_EXCLUDE_TOP:
                continue
            keep.append(d)
        dirnames[:] = keep  # prune the walk in place
        for name in filenames:
            if name.startswith("."):
                continue
            if source.kind == "stdlib" and not name.endswith(".py"):
                continue
            full = Path(dirpath) / name
            if not full.is_file():  # dangling links, sockets, ...
                continue
            out.append(((rel_dir / name).as_posix(), full))
    out.sort(key=lambda item: item[0])
    return out


def source_fingerprint(source: CorpusSource) -> str:
    """A hash identifying the corpus contents cheaply, for cache keys.

    Folders/stdlib: relative paths + sizes + mtimes (stat only, so a cached run does not read
    31 MB). JSONL and indexed prefixes: their file sizes + mtimes. A copied corpus with new
    mtimes just gets rebuilt once; it never gets stale data.
    """
    h = hashlib.sha256()
    h.update(f"{source.kind}\n".encode())
    if source.kind in ("stdlib", "folder"):
        for rel, full in list_files(source):
            st = full.stat()
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    elif source.kind == "jsonl":
        st = source.path.stat()
        h.update(f"{source.path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    elif source.kind == "indexed":
        for ext in (".idx", ".bin"):
            p = Path(str(source.path) + ext)
            st = p.stat()
            h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_text_file(path: Path, skip_binary: bool) -> Optional[str]:
    data = path.read_bytes()
    if skip_binary and b"\x00" in data[:_SNIFF_BYTES]:
        return None
    return data.decode("utf-8", errors="replace")


def iter_documents(source: CorpusSource) -> Iterator[Document]:
    """Yield the non-empty documents of a text corpus in deterministic order."""
    if source.kind in ("stdlib", "folder"):
        for rel, full in list_files(source):
            try:
                text = _read_text_file(full, skip_binary=source.kind == "folder")
            except OSError as e:
                raise DataError(f"data.corpus: cannot read {full}: {e}") from e
            if text:
                yield Document(rel, text)
    elif source.kind == "jsonl":
        yield from _iter_jsonl(source.path)
    else:
        raise DataError(f"data.corpus: {source.describe()} is not a text corpus")


def _iter_jsonl(path: Path) -> Iterator[Document]:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data.corpus: {path} line {lineno} is not valid JSON: {e}") from e
            if not isinstance(row, dict) or "text" not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"data.corpus: {path} line {lineno} has no \"text\" field "
                                f"(every JSONL row needs a string \"text\"; found {keys})")
            text = row["text"]
            if not isinstance(text, str):
                raise DataError(f"data.corpus: {path} line {lineno}: \"text\" must be a string, "
                                f"got {type(text).__name__}")
            if text:
                # Keyed by content: the split is independent of row order, and exact duplicate
                # rows always land in the same split (no train/val leakage through copies).
                key = "sha256:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
                yield Document(key, text)


def split_hash(key: str) -> float:
    """Map a document key to [0, 1) deterministically (SHA-256, first 8 bytes)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_keys(keys: Sequence[str], val_fraction: float) -> list[bool]:
    """Return ``is_val`` per key: key goes to val iff ``split_hash(key) < val_fraction``.

    A document's split depends only on its own key, so it does not change with document
    order or with other documents being added; raising ``val_fraction`` only moves
    documents from train to val. Small corpora get a guarantee instead of an empty split:
    with ``val_fraction > 0`` and at least two documents, if no key falls below the
    threshold the one with the smallest hash goes to val, and if all do the one with the
    largest hash stays in train (both choices are still order-independent).
    """
    hashes = [split_hash(k) for k in keys]
    is_val = [h < val_fraction for h in hashes]
    if val_fraction > 0 and len(keys) >= 2:
        if not any(is_val):
            is_val[min(range(len(keys)), key=lambda i: (hashes[i], keys[i]))] = True
        elif all(is_val):
            is_val[max(range(len(keys)), key=lambda i: (hashes[i], keys[i]))] = False
    return is_val
