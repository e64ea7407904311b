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
    Blank lines are skipped. ``.jsonl.gz`` (gzip module) and ``.jsonl.zst`` (the optional
    ``zstandard`` package) are read the same way, decompressed as they stream.

a ``.parquet`` file
    One row per document, text in the ``"text"`` column; read in record batches with the
    optional ``pyarrow`` package (``pip install 'moe-testbed[data]'``).

shards in a folder
    A folder may mix text files with ``.jsonl``/``.jsonl.gz``/``.jsonl.zst``/``.parquet``
    shards: each shard contributes its rows (in row order, at its place in the path
    order), every other file is one text document.

a glob or a list of paths
    ``"shards/*.parquet"``, a comma-separated ``"a.jsonl,b.parquet"`` or a Python/YAML list
    of files (globs allowed in the entries); files keep the given order, each glob's
    matches sorted. Text files among them are one document each.

``text_field`` (``DataConfig.text_field``) names the JSON field / parquet column holding
the text (default ``"text"``). A row that is not valid JSON, lacks the field or holds a
non-string there, and a corrupt shard (a bad gzip/zstd stream, a truncated parquet file)
are *bad records*: ``on_bad_record="error"`` (default) raises a DataError naming the file
and line/row; ``"skip"`` skips them (a corrupt stream: the rest of that shard) and counts
them in ``bad``.

a Hugging Face dataset directory (needs the optional ``datasets`` package)
    A folder written by ``Dataset.save_to_disk`` (``state.json`` + ``dataset_info.json``;
    a ``DatasetDict``'s folder with ``dataset_dict.json`` gives its ``train`` split),
    read with ``datasets.load_from_disk``; or a local copy of a Hub dataset repository (a
    ``README.md`` dataset card whose YAML front matter declares ``configs`` or
    ``dataset_info``, or a card beside data files named like Hub shards,
    ``train-00000-of-00002.parquet``), read with ``datasets.load_dataset(DIR,
    split="train", streaming=True)``, which follows the card's data-file layout (the card
    itself is not a document). One row is one document, text in ``text_field``; the
    dataset is read by one process (``data.workers`` does not split it). Another split:
    point ``data.corpus`` at that split's folder (save_to_disk) or at its data files (a
    glob, which also reads any folder as plain files).

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

import glob as _glob
import hashlib
import io
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .errors import DataError

STDLIB = "stdlib"
# Top-level folders of the stdlib root holding third-party packages, not stdlib code.
_STDLIB_EXCLUDE_TOP = {"site-packages", "dist-packages"}
_SNIFF_BYTES = 8192
# Shard formats read row by row (longest suffix first); every other file is one document.
SHARD_SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet")
BAD_RECORD_MODES = ("error", "skip")
_GLOB_CHARS = set("*?[")
# Hugging Face dataset directories: save_to_disk output, a local Hub dataset repository
HF_KINDS = ("hf_disk", "hf_dir")
# Data files of a Hub dataset repository (with Hub shard names: see hf_dataset_kind)
_HF_DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".jsonl.gz",
                     ".jsonl.zst", ".json.gz", ".csv.gz")


def shard_format(path: Union[str, Path]) -> Optional[str]:
    """The shard suffix of ``path`` (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet") or None."""
    name = Path(path).name.lower()
    return next((suf for suf in SHARD_SUFFIXES if name.endswith(suf)), None)


@dataclass(frozen=True)
class Document:
    """One document: ``key`` feeds the split hash (and names the document in errors)."""

    key: str
    text: str


@dataclass(frozen=True)
class CorpusSource:
    """A resolved corpus argument.

    kind: ``"stdlib"``, ``"folder"``, ``"jsonl"`` (also .jsonl.gz/.zst), ``"parquet"``,
        ``"files"`` (a glob or list), ``"hf_disk"`` / ``"hf_dir"`` (Hugging Face dataset
        directories) or ``"indexed"``.
    path: the folder root, the shard file, the files' common folder, or the prefix.
    spec: the corpus argument as given (for messages).
    files: ``"files"`` only: (name relative to ``path``, absolute path) in corpus order.
    """

    kind: str
    path: Path
    spec: str
    files: tuple = ()

    def describe(self) -> str:
        """Short human description, e.g. ``stdlib (/usr/lib/python3.11)``."""
        return f"{self.kind} ({self.path})"


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _front_matter(readme: Path) -> Optional[dict]:
    """The YAML front matter of a README.md (a dataset card's metadata), or None."""
    try:
        with open(readme, "r", encoding="utf-8", errors="replace") as f:
            if f.readline().rstrip("\r\n") != "---":
                return None
            lines = []
            for line in f:
                if line.rstrip("\r\n") == "---":
                    break
                lines.append(line)
            else:
                return None
    except OSError:
        return None
    import yaml

    try:
        meta = yaml.safe_load("".join(lines))
    except yaml.YAMLError:
        return None
    return meta if isinstance(meta, dict) else None


# Hub shard names (push_to_hub / the Hub's parquet conversion): train-00000-of-00002.parquet
_HUB_SHARD = re.compile(r"-\d{5}-of-\d{5}\.")


def hf_dataset_kind(path: Path) -> Optional[str]:
    """``"hf_disk"`` for a ``save_to_disk`` folder (a Dataset's or a DatasetDict's);
    ``"hf_dir"`` for a Hub dataset repository: a README.md dataset card whose front matter
    declares ``configs`` or ``dataset_info``, or a card beside data files named like Hub
    shards (``train-00000-of-00002.parquet``); else None (a plain folder -- a README with
    other front matter, e.g. a title, does not make one). A glob (``DIR/**/*.jsonl``) reads
    any folder as plain files."""
    if (path / "dataset_dict.json").is_file() or (
            (path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        return "hf_disk"
    readme = path / "README.md"
    if not readme.is_file():
        return None
    meta = _front_matter(readme)
    if meta is None:
        return None
    if "configs" in meta or "dataset_info" in meta:
        return "hf_dir"
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(_HUB_SHARD.search(n) and n.lower().endswith(_HF_DATA_SUFFIXES)
               for n in filenames):
            return "hf_dir"
    return None


def resolve_corpus(corpus: str) -> CorpusSource:
    """Turn the ``corpus`` argument into a :class:`CorpusSource`, or raise DataError.

    Args:
        corpus: ``"stdlib"``, a folder, a ``.jsonl`` file, or a Megatron ``.bin/.idx``
            prefix (see the module docstring).
    """
    if isinstance(corpus, (list, tuple)):
        return _resolve_files([str(c) for c in corpus], str(list(corpus)))
    if not isinstance(corpus, (str, os.PathLike)) or str(corpus) == "":
        raise DataError(f"data.corpus must be 'stdlib' or a path, got {corpus!r}")
    spec = str(corpus)
    if not Path(spec).expanduser().exists() and ("," in spec or _GLOB_CHARS & set(spec)):
        return _resolve_files([p.strip() for p in spec.split(",") if p.strip()], spec)
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
        raise DataError(f"data.corpus path does not exist: {path} (expected 'stdlib', a folder "
                        f"of text files / .jsonl[.gz|.zst] / .parquet shards, one such file, a "
                        f"glob or list of files, a Hugging Face dataset folder, or a Megatron "
                        f"prefix with .bin/.idx files)")
    if path.is_dir():
        return CorpusSource(hf_dataset_kind(path) or "folder", path.resolve(), spec)
    fmt = shard_format(path)
    if fmt is not None:
        return CorpusSource("parquet" if fmt == ".parquet" else "jsonl", path.resolve(), spec)
    raise DataError(f"data.corpus: unsupported file {path}: give a folder of text files / shards, "
                    f"a .jsonl, .jsonl.gz, .jsonl.zst or .parquet file, a glob or list of them, "
                    f"or a Megatron .bin/.idx prefix")


def _resolve_files(entries: list[str], spec: str) -> CorpusSource:
    """A glob / list of files: each entry a file or a glob (matches sorted), order kept."""
    files: list[Path] = []
    for e in entries:
        p = os.path.expanduser(e)
        if _GLOB_CHARS & set(p):
            matches = sorted(_glob.glob(p, recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise DataError(f"data.corpus: glob {e!r} matches no file")
            files += [Path(m).resolve() for m in matches]
        elif os.path.isfile(p):
            files.append(Path(p).resolve())
        elif os.path.exists(p):
            raise DataError(f"data.corpus: {e!r} in a list of files is not a file (give a "
                            f"folder as the whole corpus, or a glob)")
        else:
            raise DataError(f"data.corpus path does not exist: {p} (in {spec!r})")
    if not files:
        raise DataError(f"data.corpus {spec!r} names no files")
    uniq = list(dict.fromkeys(files))
    root = Path(os.path.commonpath([str(f.parent) for f in uniq]))
    return CorpusSource("files", root, spec,
                        tuple((f.relative_to(root).as_posix(), f) for f in uniq))


def list_files(source: CorpusSource) -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of a stdlib/folder corpus, sorted by relative path."""
    if source.kind == "files":
        return list(source.files)
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
    if source.kind in ("stdlib", "folder", "files") + HF_KINDS:
        shards = False
        for rel, full in list_files(source):
            st = full.stat()
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            shards = shards or shard_format(rel) is not None
        if shards and source.kind == "folder":
            # shards in a folder were one text document each before they were read as
            # rows: such folders get new cache keys (text-only folders keep theirs)
            h.update(b"shards-as-rows\n")
    elif source.kind in ("jsonl", "parquet"):
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


class BadRecords:
    """Counts the bad records skipped with ``on_bad_record="skip"`` (first few named)."""

    def __init__(self, mode: str = "error", keep: int = 5) -> None:
        if mode not in BAD_RECORD_MODES:
            raise DataError(f"data.on_bad_record must be one of {BAD_RECORD_MODES}, got {mode!r}")
        self.mode, self.keep = mode, keep
        self.count = 0
        self.examples: list[str] = []

    def __call__(self, message: str, cause: Optional[BaseException] = None) -> None:
        """Raise DataError(message) in "error" mode; count it in "skip" mode."""
        if self.mode == "error":
            raise DataError(message) from cause
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(message)

    def as_dict(self) -> dict:
        return {"skipped": self.count, "examples": list(self.examples)}


def iter_documents(source: CorpusSource, text_field: str = "text",
                   bad: Optional[BadRecords] = None) -> Iterator[Document]:
    """Yield the non-empty documents of a text corpus in deterministic order, streaming
    (one file / one record batch in memory at a time).

    text_field: the JSON field / parquet column of shard rows. bad: where bad records go
    (default: raise DataError naming the file and line/row).
    """
    for _, doc in iter_file_documents(source, text_field, bad):
        yield doc


def corpus_files(source: CorpusSource) -> list[tuple[str, Path]]:
    """The files a text corpus is read from, in corpus order: :func:`list_files` for
    folders, globs and the stdlib; the one shard of a .jsonl/.parquet corpus."""
    if source.kind in ("stdlib", "folder", "files"):
        return list_files(source)
    if source.kind in ("jsonl", "parquet") + HF_KINDS:
        return [(source.path.name, source.path)]
    raise DataError(f"data.corpus: {source.describe()} is not a text corpus")


def iter_file_documents(source: CorpusSource, text_field: str = "text",
                        bad: Optional[BadRecords] = None, start: int = 0,
                        stop: Optional[int] = None, files: Optional[list] = None
                        ) -> Iterator[tuple[int, Document]]:
    """``(file index, document)`` for the files ``start:stop`` of :func:`corpus_files`
    (``files``: that list, when the caller already has it), in corpus order: what
    :func:`iter_documents` yields for the whole corpus, so that contiguous file ranges read
    by separate workers concatenate to the same stream."""
    bad = bad if bad is not None else BadRecords("error")
    files = corpus_files(source) if files is None else files
    stop = len(files) if stop is None else stop
    for fi in range(start, stop):
        rel, full = files[fi]
        if source.kind in HF_KINDS:
            for doc in _iter_hf(source, text_field, bad):
                yield fi, doc
            continue
        if source.kind != "stdlib" and shard_format(full) is not None:
            for doc in _iter_shard(full, text_field, bad):
                yield fi, doc
            continue
        try:
            text = _read_text_file(full, skip_binary=source.kind != "stdlib")
        except OSError as e:
            raise DataError(f"data.corpus: cannot read {full}: {e}") from e
        if text:
            yield fi, Document(rel, text)


def _content_key(text: str) -> str:
    # Keyed by content: the split is independent of row order, and exact duplicate rows
    # always land in the same split (no train/val leakage through copies).
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


def _iter_shard(path: Path, field: str, bad: BadRecords) -> Iterator[Document]:
    if shard_format(path) == ".parquet":
        yield from _iter_parquet(path, field, bad)
    else:
        yield from _iter_jsonl(path, field, bad)


def _open_text_stream(path: Path):
    """A text stream of a .jsonl / .jsonl.gz / .jsonl.zst file (decompressed as read)."""
    fmt = shard_format(path)
    if fmt == ".jsonl.gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if fmt == ".jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"data.corpus: {path} is zstd-compressed and the zstandard package is "
                            "not installed: pip install 'moe-testbed[data]' (or zstandard)") from None
        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                             closefd=True)
        return io.TextIOWrapper(reader, encoding="utf-8", errors="replace")
    return open(path, "r", encoding="utf-8", errors="replace")


def _stream_errors() -> tuple:
    errs: list = [OSError, EOFError, ValueError]  # gzip.BadGzipFile is an OSError
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)


def _iter_jsonl(path: Path, field: str = "text", bad: Optional[BadRecords] = None
                ) -> Iterator[Document]:
    bad = bad if bad is not None else BadRecords("error")
    lineno = 0
    with _open_text_stream(path) as f:
        lines = iter(f)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                break
            except _stream_errors() as e:
                # a corrupt / truncated compressed stream: the rest of this shard is lost
                bad(f"data.corpus: {path} is corrupt after line {lineno} "
                    f"({type(e).__name__}: {e})", e)
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad(f"data.corpus: {path} line {lineno} is not valid JSON: {e}", e)
                continue
            if not isinstance(row, dict) or field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                bad(f"data.corpus: {path} line {lineno} has no \"{field}\" field (every JSONL "
                    f"row needs a string \"{field}\", see data.text_field; found {keys})")
                continue
            text = row[field]
            if not isinstance(text, str):
                bad(f"data.corpus: {path} line {lineno}: \"{field}\" must be a string, "
                    f"got {type(text).__name__}")
                continue
            if text:
                yield Document(_content_key(text), text)


def _iter_parquet(path: Path, field: str, bad: BadRecords,
                  batch_rows: int = 1024) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"data.corpus: {path} is a parquet shard and pyarrow is not installed: "
                        "pip install 'moe-testbed[data]' (or pyarrow)") from None
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        bad(f"data.corpus: {path} is not a readable parquet file ({type(e).__name__}: {e})", e)
        return
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"data.corpus: {path} has no column {field!r} (columns: {names}); set "
                        f"data.text_field to the text column")
    batches = pf.iter_batches(batch_size=batch_rows, columns=[field])
    yield from _column_documents(batches, lambda b: b.column(0).to_pylist(),
                                 (pa.ArrowException, OSError), path, field, bad)


def _column_documents(batches: Iterator, texts_of, errors: tuple, path: Path, field: str,
                      bad: BadRecords, read_errors_fatal: bool = False) -> Iterator[Document]:
    """The documents of a text column read in batches (parquet, Hugging Face datasets):
    ``texts_of(batch)`` lists a batch's cells. An error from ``errors`` while reading is a
    corrupt file (a bad record losing the rest of it; with ``read_errors_fatal`` a
    DataError even under on_bad_record=skip), a null cell an empty document, a non-string
    cell a bad record; rows are counted from 1 in messages."""
    row = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except errors as e:
            message = f"data.corpus: {path} is corrupt at row {row + 1} ({type(e).__name__}: {e})"
            if read_errors_fatal:
                raise DataError(f"{message}; the datasets library cannot skip past it "
                                "(data.on_bad_record=skip would drop the rest of the dataset): "
                                "fix the file, or read the data files as shards (a glob), "
                                "where skip drops single bad lines") from e
            bad(message, e)
            return
        for text in texts_of(batch):
            row += 1
            if not isinstance(text, str):
                if text is None:
                    continue  # a null cell is an empty document
                bad(f"data.corpus: {path} row {row}: column {field!r} must be text, got "
                    f"{type(text).__name__}")
                continue
            if text:
                yield Document(_content_key(text), text)


def _open_hf_dataset(source: CorpusSource):
    """The rows of a Hugging Face dataset directory: a (memory-mapped) ``Dataset`` from
    ``load_from_disk`` (a DatasetDict's ``train``), or a streaming ``IterableDataset``."""
    try:
        import datasets
    except ImportError:
        hint = (f"; or point data.corpus at its data files, e.g. '{source.path}/**/*.parquet'"
                if source.kind == "hf_dir" else "")
        raise DataError(f"data.corpus: {source.path} is a Hugging Face dataset directory and "
                        "the datasets package is not installed: pip install "
                        f"'moe-testbed[data]' (or datasets){hint}") from None
    try:
        if source.kind == "hf_disk":
            ds = datasets.load_from_disk(str(source.path))
        else:
            ds = datasets.load_dataset(str(source.path), split="train", streaming=True)
    except Exception as e:  # the library's errors have no common base class
        how = ("datasets.load_from_disk" if source.kind == "hf_disk"
               else "datasets.load_dataset(..., split='train', streaming=True)")
        raise DataError(f"data.corpus: cannot read the Hugging Face dataset {source.path} with "
                        f"{how} ({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"data.corpus: {source.path} is a DatasetDict without a 'train' "
                            f"split (splits: {sorted(ds)}); point data.corpus at one split's "
                            f"folder, e.g. {source.path / sorted(ds)[0]}")
        ds = ds["train"]
    return ds


def _iter_hf(source: CorpusSource, field: str, bad: BadRecords,
             batch_rows: int = 1024) -> Iterator[Document]:
    ds = _open_hf_dataset(source)
    names = ds.column_names
    if names is not None and field not in names:
        raise DataError(f"data.corpus: {source.path} has no column {field!r} (columns: "
                        f"{names}); set data.text_field to the text column")
    batches = iter(ds.select_columns([field]).iter(batch_size=batch_rows))
    import pyarrow as pa
    from datasets.exceptions import DatasetsError

    # A data file the library cannot parse stops its reader for good (it reads whole files
    # into batches, so even earlier rows of the batch are gone): that is always an error,
    # never a skipped record -- skipping would silently drop the rest of the dataset.
    yield from _column_documents(batches, lambda b: b[field],
                                 (pa.ArrowException, OSError, ValueError, DatasetsError),
                                 source.path, field, bad, read_errors_fatal=True)


def split_hash(key: str) -> float:
    """Map a document key to [0, 1) deterministically (SHA-256, first 8 bytes)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class StreamSplit:
    """:func:`split_keys` over a stream: ``observe`` every key in order (O(1) memory), then
    ``finish()``; ``is_val(i, key)`` is then exactly ``split_keys(keys)[i]``.

    The small-corpus guarantee needs every key (the smallest/largest hash), so a streaming
    build reads the corpus once for the split before it tokenises.
    """

    def __init__(self, val_fraction: float) -> None:
        self.val_fraction = float(val_fraction)
        self.n = self.n_val = 0
        self._lo: Optional[tuple] = None
        self._hi: Optional[tuple] = None
        self.overrides: dict[int, bool] = {}

    def observe(self, key: str) -> bool:
        """Count document ``self.n`` with ``key``; returns its hash rule (before overrides)."""
        h = split_hash(key)
        i, self.n = self.n, self.n + 1
        v = h < self.val_fraction
        self.n_val += v
        # strict comparisons keep the FIRST of equal (hash, key) pairs, like min()/max()
        if self._lo is None or (h, key) < self._lo[:2]:
            self._lo = (h, key, i)
        if self._hi is None or (h, key) > self._hi[:2]:
            self._hi = (h, key, i)
        return v

    def finish(self) -> "StreamSplit":
        """Apply the small-corpus guarantee (see :func:`split_keys`)."""
        self.overrides = {}
        if self.val_fraction > 0 and self.n >= 2:
            if self.n_val == 0:
                self.overrides[self._lo[2]] = True
            elif self.n_val == self.n:
                self.overrides[self._hi[2]] = False
        return self

    def is_val(self, i: int, key: str) -> bool:
        """The split of document ``i`` (in stream order) with ``key``."""
        v = self.overrides.get(i)
        return split_hash(key) < self.val_fraction if v is None else v


def split_keys(keys: Sequence[str], val_fraction: float) -> list[bool]:
    """Return ``is_val`` per key: key goes to val iff ``split_hash(key) < val_fraction``.

    A document's split depends only on its own key, so it does not change with document
    order or with other documents being added; raising ``val_fraction`` only moves
    documents from train to val. Small corpora get a guarantee instead of an empty split:
    with ``val_fraction > 0`` and at least two documents, if no key falls below the
    threshold the one with the smallest hash goes to val, and if all do the one with the
    largest hash stays in train (both choices are still order-independent).
    """
    ss = StreamSplit(val_fraction)
    is_val = [ss.observe(k) for k in keys]
    for i, v in ss.finish().overrides.items():
        is_val[i] = v
    return is_val
