"""``prepare_data``: corpus -> split -> tokenizer -> cached indexed datasets, in one call.

Cache layout (root: ``cache_dir`` argument, else ``$MOE_TESTBED_CACHE``, else
``~/.cache/moe-testbed``)::

    tokenizers/bpe-<vocab>-<fp16>.json    trained BPE, saved as soon as training ends
    data/<kind>-<tokenizer>-<fp16>/       one complete prepared corpus:
        tokenizer.json  train.bin  train.idx  val.bin  val.idx  meta.json
    indexed/<fp16>.json                   facts about a user's Megatron prefix (max id)
    locks/<name>.lock                     so concurrent ranks build once, the others wait

``<fp16>`` is the first 16 hex digits of the fingerprint: SHA-256 over the pipeline
version, the corpus (relative paths + sizes + mtimes, see ``corpus.source_fingerprint``),
the tokenizer kind, ``vocab_size`` (BPE only: byte tokens do not depend on it) and
``val_fraction`` (the tokenizer is trained on the train split only).

Atomicity: a corpus is built inside ``data/.tmp-<name>-<pid>-<random>/`` and renamed to
its final name only when every file is written (``os.replace`` of a folder is atomic), so
a killed prepare leaves no half cache -- at worst a stale ``.tmp-*`` folder that the next
build of the same corpus removes.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .corpus import (BAD_RECORD_MODES, HF_KINDS, BadRecords, CorpusSource, StreamSplit,
                     corpus_files, iter_file_documents, list_files, resolve_corpus,
                     source_fingerprint, split_hash, split_keys)
from ..runs.atomic import atomic_path, atomic_write
from .errors import DataError
from .indexed import IndexedWriter, TokenSplit, megatron_indexed, open_indexed, token_dtype
from .tokenizer import (BPETokenizer, ByteTokenizer, Tokenizer, batched_by_bytes,
                        check_vocab_size, load_tokenizer, split_text)

# Bump when the on-disk format or the tokenisation changes, to invalidate old caches.
PIPELINE_VERSION = 1
SPLITS = ("train", "val")

# BPE is trained on a uniform sample of about this many characters of the training split
# (data.tokenizer_sample_bytes): the whole split of any smaller corpus.
DEFAULT_TOKENIZER_SAMPLE_BYTES = 500_000_000
# One tokenisation batch per split: about this many characters or documents.
BATCH_CHARS = 2 << 20
BATCH_DOCS = 256
# data.workers > 1 tokenises in worker processes only from this many characters on: below
# it, starting the processes costs more than it saves (the embedded corpus is ~31M).
PARALLEL_MIN_CHARS = 16 << 20
# Contiguous file ranges per worker process (load balance across unequal shards).
PARTS_PER_WORKER = 4

# Counts BPE trainings in this process; tests use it to prove a cache hit did not retrain.
TRAIN_COUNTER = {"bpe": 0}


@dataclass
class PreparedData:
    """What :func:`prepare_data` returns.

    tokenizer: ByteTokenizer / BPETokenizer (None for a Megatron-prefix corpus that has no
        ``tokenizer.json`` beside it: its ids are used as they are).
    train, val: :class:`~moe.data.indexed.TokenSplit` (``.indexed`` is the megatron
        IndexedDataset; ``.num_tokens``, ``.num_docs``, ``.read(start, length)``).
    fingerprint: full SHA-256 hex of the corpus + tokenizer settings.
    stats: ``docs``/``tokens``/``bytes`` per split, ``seconds`` per stage, ``cached``,
        ``tokenizer_trained``, ``corpus``, ``vocab_size``.
    cache_path: folder holding the prepared files (for a Megatron prefix: its folder).
    """

    tokenizer: Optional[Tokenizer]
    train: TokenSplit
    val: TokenSplit
    fingerprint: str
    stats: dict[str, Any] = field(default_factory=dict)
    cache_path: Optional[Path] = None

    def split(self, name: str) -> TokenSplit:
        """``"train"`` or ``"val"``."""
        if name not in SPLITS:
            raise DataError(f"split must be 'train' or 'val', got {name!r}")
        return getattr(self, name)


def resolve_cache_dir(cache_dir: Union[str, Path, None] = None) -> Path:
    """The cache root: ``cache_dir``, else ``$MOE_TESTBED_CACHE``, else ``~/.cache/moe-testbed``."""
    root = cache_dir or os.environ.get("MOE_TESTBED_CACHE") or "~/.cache/moe-testbed"
    return Path(root).expanduser()


def data_fingerprint(source: CorpusSource, tokenizer: str, vocab_size: int,
                     val_fraction: float, text_field: str = "text",
                     tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES) -> str:
    """The cache key of a prepared corpus (see the module docstring). ``text_field`` and
    ``tokenizer_sample_bytes`` enter only when not at their defaults, so caches built
    before these settings existed keep their keys."""
    h = hashlib.sha256()
    vocab = vocab_size if tokenizer == "bpe" else 0
    h.update(f"moe-testbed-data v{PIPELINE_VERSION}\n{tokenizer}\n{vocab}\n"
             f"{float(val_fraction)!r}\n".encode())
    h.update(source_fingerprint(source).encode())
    if text_field != "text":
        h.update(f"text_field {text_field}\n".encode())
    if tokenizer == "bpe" and tokenizer_sample_bytes != DEFAULT_TOKENIZER_SAMPLE_BYTES:
        h.update(f"tokenizer_sample_bytes {int(tokenizer_sample_bytes)}\n".encode())
    return h.hexdigest()


def _check_options(text_field: str, on_bad_record: str, tokenizer_sample_bytes: int,
                   workers: Optional[int] = None) -> None:
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"data.text_field must be a non-empty string, got {text_field!r}")
    if on_bad_record not in BAD_RECORD_MODES:
        raise DataError(f"data.on_bad_record must be one of {BAD_RECORD_MODES}, "
                        f"got {on_bad_record!r}")
    if (not isinstance(tokenizer_sample_bytes, (int, np.integer))
            or isinstance(tokenizer_sample_bytes, bool) or tokenizer_sample_bytes <= 0):
        raise DataError(f"data.tokenizer_sample_bytes must be a positive int, got "
                        f"{tokenizer_sample_bytes!r}")
    if workers is not None and (not isinstance(workers, (int, np.integer))
                                or isinstance(workers, bool) or workers < 1):
        raise DataError(f"data.workers must be a positive int (1: this process) or null (the "
                        f"CPU count), got {workers!r}")


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock so that N ranks calling prepare_data build the cache once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): rely on the atomic rename alone
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_val_fraction(val_fraction: float) -> None:
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")


def prepare_data(corpus: Union[str, list] = "stdlib", tokenizer: str = "bpe",
                 vocab_size: int = 8192, cache_dir: Union[str, Path, None] = None,
                 val_fraction: float = 0.02, progress: bool = True, *, text_field: str = "text",
                 on_bad_record: str = "error",
                 tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
                 workers: Optional[int] = 1) -> PreparedData:
    """Prepare (or load from cache) the tokenised train/val splits of a corpus.

    Args:
        corpus: ``"stdlib"``, a folder (text files and/or shards), a ``.jsonl``,
            ``.jsonl.gz``, ``.jsonl.zst`` or ``.parquet`` file, a glob or list of files, or
            a Megatron ``.bin/.idx`` prefix (see :mod:`moe.data.corpus`).
        tokenizer: ``"bpe"`` (byte-level BPE trained on the train split) or ``"bytes"``.
            Ignored for a Megatron prefix, whose ids are used as stored.
        vocab_size: the model's vocabulary size; BPE is trained to this size; must be
            >= 257; for a Megatron prefix it must exceed the largest stored id.
        cache_dir: cache root; None: ``$MOE_TESTBED_CACHE`` or ``~/.cache/moe-testbed``.
        val_fraction: share of documents held out (by a hash of each document's key).
        progress: show a tqdm bar while tokenising.
        text_field: the JSON field / parquet column holding the text.
        on_bad_record: ``"error"`` (raise naming the file and line/row) or ``"skip"``
            (skip and count in ``stats["bad_records"]``) for invalid rows / corrupt shards.
        tokenizer_sample_bytes: BPE is trained on a uniform sample of about this many
            characters of the training split (all of it when smaller).
        workers: processes that tokenise contiguous ranges of the corpus' files into shards
            merged into one .bin/.idx (None: the CPU count). 1 (default): this process,
            where the tokenizer library's threads already encode on every core -- measured
            faster on 2 cores (stdlib, BPE 8192: tokenised in 4.5-4.8 s vs 10.1-10.4 s with
            2 processes, whose library threads must be off after a fork;
            benchmarks/results/prepare_data.md). Processes pay off where the
            Python side (reading, decompressing, parsing shards) bounds a many-core node.
            The result is the same token for token whatever the number; a corpus of one
            file, or under :data:`PARALLEL_MIN_CHARS` characters, stays in this process.

    Returns:
        PreparedData. A second call with the same arguments on an unchanged corpus loads
        the cache (no BPE training, no tokenisation).

    Raises:
        DataError: missing/empty/unsupported corpus, JSONL rows without "text", corrupt
            .idx/.bin, vocab_size too small, bad val_fraction.
    """
    t0 = time.perf_counter()
    _check_val_fraction(val_fraction)
    _check_options(text_field, on_bad_record, tokenizer_sample_bytes, workers)
    if tokenizer not in ("bpe", "bytes"):
        raise DataError(f"data.tokenizer must be 'bpe' or 'bytes', got {tokenizer!r}")
    source = resolve_corpus(corpus)
    root = resolve_cache_dir(cache_dir)
    if source.kind == "indexed":
        return _prepare_indexed(source, vocab_size, val_fraction, root, t0)

    check_vocab_size(vocab_size, tokenizer)
    final, fp = _cache_path(source, tokenizer, vocab_size, val_fraction, root, text_field,
                            tokenizer_sample_bytes)
    name = final.name
    built = False
    if not (final / "meta.json").is_file():
        with _file_lock(root / "locks" / f"{name}.lock"):
            if not (final / "meta.json").is_file():  # another rank may have built it meanwhile
                _build(source, tokenizer, vocab_size, val_fraction, fp, root, final, progress,
                       text_field, on_bad_record, tokenizer_sample_bytes,
                       default_workers() if workers is None else int(workers))
                built = True
    return _load_cached(final, fp, t0, built, vocab_size)


def config_data(cfg, progress: bool = False) -> PreparedData:
    """:func:`prepare_data` for a run config (``moe.config.Config``): every ``data.*``
    field and the model's vocabulary, so the cache found is the one training used."""
    d = cfg.data
    return prepare_data(d.corpus, d.tokenizer, cfg.model.vocab_size, cache_dir=d.cache_dir,
                        val_fraction=d.val_fraction, progress=progress, **d.options())


def _cache_path(source: CorpusSource, tokenizer: str, vocab_size: int, val_fraction: float,
                root: Path, text_field: str = "text",
                tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES) -> tuple[Path, str]:
    """(final cache folder, fingerprint) of a text corpus; stat-only, reads no document."""
    fp = data_fingerprint(source, tokenizer, vocab_size, val_fraction, text_field,
                          tokenizer_sample_bytes)
    vocab_tag = f"{tokenizer}{vocab_size}" if tokenizer == "bpe" else tokenizer
    return root / "data" / f"{source.kind}-{vocab_tag}-{fp[:16]}", fp


# Bytes per token assumed when a corpus is not prepared yet (--dry-run estimates only):
# UTF-8 bytes for the bytes tokenizer; ~4 for a BPE (English web text at 32k-50k vocab is
# 4-4.5; the embedded stdlib measured 3.4 at vocab 4096 and 1.8 at 384).
EST_BYTES_PER_TOKEN = {"bytes": 1.0, "bpe": 4.0}


@dataclass
class CorpusSize:
    """The training split's size in tokens, as :func:`train_token_count` found it.

    train_tokens: None when unknown (then ``note`` says why); exact: from a prepared cache
    (or a Megatron prefix); False: an estimate from the corpus' bytes on disk.
    """

    corpus: str
    train_tokens: Optional[int]
    exact: bool
    note: str


def train_token_count(corpus: Union[str, list] = "stdlib", tokenizer: str = "bpe",
                      vocab_size: int = 8192, cache_dir: Union[str, Path, None] = None,
                      val_fraction: float = 0.02, *, build: bool = False,
                      progress: bool = False, **options) -> CorpusSize:
    """How many training tokens ``corpus`` has with these settings (for epoch accounting).

    A prepared cache is read from its ``meta.json`` (nothing is loaded); a Megatron prefix
    is split from its index. Otherwise ``build=True`` prepares the data (as
    :func:`prepare_data`, cached for the runs), and ``build=False`` (``--dry-run``)
    estimates from the bytes on disk at :data:`EST_BYTES_PER_TOKEN`. Never raises for a
    missing/unusable corpus when ``build`` is False: the reason goes in ``note``.
    Raises DataError (``build=True``) for a corpus that cannot be prepared. ``options``:
    :func:`prepare_data`'s keyword options (text_field, on_bad_record, ...).
    """
    spec = str(corpus)
    try:
        _check_val_fraction(val_fraction)
        _check_options(options.get("text_field", "text"), options.get("on_bad_record", "error"),
                       options.get("tokenizer_sample_bytes", DEFAULT_TOKENIZER_SAMPLE_BYTES),
                       options.get("workers", 1))
        source = resolve_corpus(corpus)
        if source.kind == "indexed":
            if build:
                d = prepare_data(corpus, tokenizer, vocab_size, cache_dir, val_fraction, progress,
                                 **options)
                return CorpusSize(spec, len(d.train), True, f"Megatron prefix {source.path}")
            ds = open_indexed(source.path, what=f"data.corpus indexed dataset {source.path}")
            doc_idx = np.asarray(ds.document_indices, dtype=np.int64)
            lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
            n_docs = len(doc_idx) - 1
            is_val = np.array(split_keys([f"doc:{i}" for i in range(n_docs)], val_fraction),
                              dtype=bool)
            seq_val = is_val[np.repeat(np.arange(n_docs), np.diff(doc_idx))]
            return CorpusSize(spec, int(lengths[~seq_val].sum()), True,
                              f"Megatron prefix {source.path}")
        check_vocab_size(vocab_size, tokenizer)
        final, _ = _cache_path(source, tokenizer, vocab_size, val_fraction,
                               resolve_cache_dir(cache_dir), options.get("text_field", "text"),
                               options.get("tokenizer_sample_bytes",
                                           DEFAULT_TOKENIZER_SAMPLE_BYTES))
        meta_path = final / "meta.json"
        if not meta_path.is_file() and build:
            prepare_data(corpus, tokenizer, vocab_size, cache_dir, val_fraction, progress,
                         **options)
        if meta_path.is_file():
            try:
                n = int(json.loads(meta_path.read_text())["stats"]["tokens"]["train"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"cache {meta_path} is unreadable ({e}); delete {final}") from e
            return CorpusSize(spec, n, True, f"prepared cache {final}")
        nbytes = corpus_bytes(source)
        bpt = EST_BYTES_PER_TOKEN[tokenizer]
        est = int(nbytes * (1.0 - float(val_fraction)) / bpt)
        return CorpusSize(spec, est, False,
                          f"ESTIMATED from {nbytes / 1e6:,.1f} MB on disk at ~{bpt:g} bytes/token "
                          f"(not prepared yet; `moe-testbed prepare` gives the exact count)")
    except DataError as e:
        if build:
            raise
        return CorpusSize(spec, None, False, str(e))


def corpus_bytes(source: CorpusSource) -> int:
    """Bytes on disk of a text corpus' files (compressed shards count compressed)."""
    if source.kind in ("stdlib", "folder", "files") + HF_KINDS:
        return sum(full.stat().st_size for _, full in list_files(source))
    return int(source.path.stat().st_size)


def _file_max(path: Path, dtype, chunk: int = 1 << 18) -> int:
    """Largest value of a raw token file, read in chunks of ``chunk`` ids with plain file
    reads: scanning the memmap instead left the whole file resident in this process (a
    4 GB corpus's 2 GB .bin lifted preparation's peak RSS from 1.4 to 2.9 GB)."""
    best = 0
    with open(path, "rb") as fh:
        while True:
            a = np.fromfile(fh, dtype=dtype, count=chunk)
            if a.size == 0:
                return best
            best = max(best, int(a.max()))


def _bins_stamp(folder: Path) -> dict:
    """Size and mtime of each split's .bin in ``folder``: what a max-id memo is valid for
    (renaming the folder keeps them; a rewritten .bin changes them)."""
    stamp = {}
    for s in SPLITS:
        with contextlib.suppress(OSError):
            st = (folder / f"{s}.bin").stat()
            stamp[s] = [st.st_size, st.st_mtime_ns]
    return stamp


def _write_max_id(memo: Path, max_id: int, **key) -> None:
    """Remember ``max_id`` in ``memo`` (JSON) with ``key``; only a speed-up, so a read-only
    cache is fine, and a memo lost to a power cut is only scanned again (not durable)."""
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(memo, json.dumps({"max_id": max_id, **key}), durable=False)


def _memo_max_id(memo: Path, scan, **key) -> int:
    """The max id remembered in ``memo`` when it was written with the same ``key``, else
    ``scan()``, remembered."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if all(saved[k] == v for k, v in key.items()):
            return int(saved["max_id"])
    max_id = int(scan())
    _write_max_id(memo, max_id, **key)
    return max_id


def _max_id(final: Path, splits: dict) -> int:
    """The largest token id of the cached splits, remembered in ``final/max_id.json``
    against each .bin's size and mtime (a rewritten .bin is scanned again; a fresh build
    writes the memo with the max its writers saw)."""
    return _memo_max_id(
        final / "max_id.json",
        lambda: max([_file_max(final / f"{name}.bin", split.dtype)
                     for name, split in splits.items() if split.num_tokens], default=0),
        bins=_bins_stamp(final))


def _load_cached(final: Path, fp: str, t0: float, built: bool,
                 vocab_size: Optional[int] = None) -> PreparedData:
    try:
        meta = json.loads((final / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cache {final}/meta.json is unreadable ({e}); delete {final}") from e
    tok = load_tokenizer(meta["tokenizer"], final / "tokenizer.json")
    splits = {}
    for s in SPLITS:
        ds = open_indexed(final / s, what=f"cached {s} split", allow_empty=True)
        splits[s] = TokenSplit(ds, s, num_docs=meta["stats"]["docs"][s])
        if splits[s].num_tokens != meta["stats"]["tokens"][s]:
            raise DataError(f"cached {s} split in {final} has {splits[s].num_tokens} tokens, "
                            f"meta.json says {meta['stats']['tokens'][s]}; delete {final}")
    if vocab_size is not None:  # checked when opened, not as an index error mid-training
        max_id = _max_id(final, splits)
        if max_id >= vocab_size:
            raise DataError(f"cached data {final} contains token id {max_id}, outside "
                            f"vocab_size={vocab_size} (needs >= {max_id + 1}): the cache is "
                            f"corrupt or was written for another vocabulary; delete {final}")
    stats = dict(meta["stats"])
    stats["cached"] = not built
    stats["seconds"] = dict(stats["seconds"])
    stats["seconds"]["load"] = time.perf_counter() - t0
    return PreparedData(tok, splits["train"], splits["val"], fp, stats, final)


@dataclass
class _CorpusPasses:
    """The corpus' documents, readable in several streaming passes over the same files."""

    source: CorpusSource
    files: list
    text_field: str
    bad: BadRecords

    def docs(self, counted: bool = False):
        """``(file index, document)`` in corpus order. Bad records are counted once (the
        split pass, ``counted``); later passes see the same records."""
        return iter_file_documents(self.source, self.text_field,
                                   self.bad if counted else BadRecords("skip"), files=self.files)


@dataclass
class _Layout:
    """What the split pass found: the split, characters per split, documents and
    characters per file (the file ranges of parallel tokenisation)."""

    split: StreamSplit
    chars: dict[str, int]
    docs_per_file: list[int]
    chars_per_file: list[int]


class _Stages:
    """Seconds and peak RSS (MB, this process) at the end of each build stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.rss: dict[str, Optional[float]] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t
        self.rss[name] = _peak_rss_mb()


def _build(source: CorpusSource, kind: str, vocab_size: int, val_fraction: float, fp: str,
           root: Path, final: Path, progress: bool, text_field: str = "text",
           on_bad_record: str = "error",
           tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
           workers: int = 1) -> None:
    """Stream the corpus: split, train the tokenizer on a sample, tokenise; publish atomically.

    Memory is bounded by one document (cut into CHUNK_CHARS pieces for the tokenizer), one
    batch of BATCH_CHARS characters per split (per worker), and the BPE trainer's word
    counts of the sample -- not by the corpus. Three streaming passes over the documents:

    1. split: every key through :class:`StreamSplit` (the small-corpus guarantee needs
       all keys), counting documents and characters per split and per file;
    2. BPE only (no saved tokenizer): train from an iterator over the training split's
       documents whose ``split_hash("sample:" + key)`` falls below
       ``tokenizer_sample_bytes / train bytes`` -- a uniform sample of about that many
       characters, the whole split when it is smaller (then the tokenizer is the one the
       in-memory pipeline trained);
    3. tokenise in batches, each split's documents in order, written as they come: in this
       process, or (``workers`` > 1, several files, a corpus of at least
       PARALLEL_MIN_CHARS) in worker processes, each over a contiguous range of files
       into its own .bin/.idx shards, merged in file order -- the same bytes either way.
    """
    stages = _Stages()
    with stages.stage("import"):
        megatron_indexed()  # import once up front (seconds) so stage timings are honest
    bad = BadRecords(on_bad_record)
    corpus = _CorpusPasses(source, corpus_files(source), text_field, bad)
    with stages.stage("read"):
        layout = _split_pass(corpus, val_fraction)
    with stages.stage("train_tokenizer"):
        tok, trained, sample_chars = _build_tokenizer(corpus, layout, kind, vocab_size, fp, root,
                                                      tokenizer_sample_bytes, progress)
    tmp = _new_build_folder(final)
    try:
        with stages.stage("tokenize"):
            dtype = token_dtype(max(vocab_size, tok.vocab_size))
            counts, max_id, used, n_parts = _tokenize(corpus, layout, tok, dtype, tmp, workers,
                                                      progress)
        stages.seconds["total"] = sum(stages.seconds.values())
        if used > 1:
            stages.rss["tokenize_worker_max"] = _peak_rss_mb(children=True)
        tok.save(tmp / "tokenizer.json")
        # what the first load would scan the .bin files for (renaming tmp keeps the stamp)
        _write_max_id(tmp / "max_id.json", max_id, bins=_bins_stamp(tmp))
        stats = {"corpus": source.describe(), "tokenizer": kind, "vocab_size": tok.vocab_size,
                 "requested_vocab_size": vocab_size, "val_fraction": val_fraction,
                 **counts, "seconds": stages.seconds, "tokenizer_trained": trained,
                 "bad_records": bad.as_dict(), "peak_rss_mb": stages.rss,
                 "workers": used, "parts": n_parts}
        if trained:
            stats["tokenizer_sample_chars"] = sample_chars
        meta = {"version": PIPELINE_VERSION, "fingerprint": fp, "tokenizer": kind,
                "eos_id": tok.eos_id, "dtype": np.dtype(dtype).name, "stats": stats}
        # meta.json is written last inside tmp, and the folder becomes visible in one rename.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _split_pass(corpus: _CorpusPasses, val_fraction: float) -> _Layout:
    """Pass 1: every document's key through the split, counting per split and per file."""
    split = StreamSplit(val_fraction)
    chars = {"train": 0, "val": 0}
    docs_per_file = [0] * len(corpus.files)
    chars_per_file = [0] * len(corpus.files)
    for fi, d in corpus.docs(counted=True):
        chars["val" if split.observe(d.key) else "train"] += len(d.text)
        docs_per_file[fi] += 1
        chars_per_file[fi] += len(d.text)
    split.finish()
    if split.n == 0:
        source = corpus.source
        raise DataError(f"data.corpus {source.spec!r} is empty: no non-empty documents found in "
                        f"{source.path}")
    if split.overrides:  # the guarantee moved one document; fix the character counts
        chars = {"train": 0, "val": 0}
        for i, (_, d) in enumerate(corpus.docs()):
            chars["val" if split.is_val(i, d.key) else "train"] += len(d.text)
    return _Layout(split, chars, docs_per_file, chars_per_file)


def _build_tokenizer(corpus: _CorpusPasses, layout: _Layout, kind: str, vocab_size: int,
                     fp: str, root: Path, tokenizer_sample_bytes: int,
                     progress: bool) -> tuple[Tokenizer, bool, int]:
    """Pass 2 (BPE without a saved tokenizer): train on a uniform sample of the training
    split and save it at once. Returns (tokenizer, trained, characters sampled)."""
    if kind == "bytes":
        return ByteTokenizer(), False, 0
    tok_path = root / "tokenizers" / f"bpe-{vocab_size}-{fp[:16]}.json"
    if tok_path.is_file():
        return BPETokenizer.load(tok_path), False, 0
    rate = tokenizer_sample_bytes / max(1, layout.chars["train"])
    sample_chars = 0

    def sample():
        nonlocal sample_chars
        for i, (_, d) in enumerate(corpus.docs()):
            if layout.split.is_val(i, d.key):
                continue
            if rate >= 1.0 or split_hash("sample:" + d.key) < rate:
                sample_chars += len(d.text)
                yield from split_text(d.text)

    tok = BPETokenizer.train(sample(), vocab_size, show_progress=progress)
    TRAIN_COUNTER["bpe"] += 1
    # Saved at once (atomically), so a prepare killed while tokenising resumes without
    # retraining.
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(tok_path) as tmp:
        tok.save(tmp)
    return tok, True, sample_chars


def _new_build_folder(final: Path) -> Path:
    """A fresh ``.tmp-<name>-<pid>-<random>`` folder beside ``final``, after removing the
    ones killed builds left (the caller holds the lock)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _tokenize(corpus: _CorpusPasses, layout: _Layout, tok: Tokenizer, dtype, tmp: Path,
              workers: int, progress: bool) -> tuple[dict, int, int, int]:
    """Pass 3: tokenise every document into ``tmp/train`` and ``tmp/val``, here or in
    worker processes. Returns (counts per split, largest id, processes used, parts)."""
    from tqdm.auto import tqdm

    total_chars = layout.chars["train"] + layout.chars["val"]
    parts = _file_ranges(layout.docs_per_file, layout.chars_per_file, workers * PARTS_PER_WORKER)
    used = min(workers, len(parts))
    if used > 1 and (total_chars < PARALLEL_MIN_CHARS or not _can_fork()):
        used = 1
    with tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenize",
              disable=not progress) as bar:
        if used <= 1:
            w = _SplitWriter(tok, tmp, "", dtype, on_flush=bar.update)
            for i, (_, d) in enumerate(corpus.docs()):
                w.add(layout.split.is_val(i, d.key), d.text)
            counts, max_id = w.close(), w.max_id
        else:
            counts, max_id = _tokenize_parallel(corpus.source, corpus.files, parts,
                                                layout.split, tok, dtype, corpus.text_field,
                                                tmp, used, bar)
    return counts, max_id, used, len(parts) if used > 1 else 1


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete build folder ``tmp`` to ``final`` (one atomic rename)."""
    if (final / "meta.json").is_file():  # a builder without flock got there first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        if final.exists():  # a damaged cache folder (no meta.json): replace it
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


def _can_fork() -> bool:
    """Workers are forked (they inherit the corpus list and split); without fork (Windows)
    tokenisation stays in this process."""
    import multiprocessing as mp

    return "fork" in mp.get_all_start_methods()


class _SplitWriter:
    """Tokenises documents into one indexed dataset per split (``DIR/<stem>train``,
    ``DIR/<stem>val``), in batches of about BATCH_CHARS characters or BATCH_DOCS documents
    per split; each document is written as its tokens + EOS, in the order added."""

    def __init__(self, tok: Tokenizer, out_dir: Path, stem: str, dtype, on_flush=None):
        self.tok, self.dtype = tok, dtype
        self.eos = np.array([tok.eos_id], dtype=dtype)
        self.writers = {s: IndexedWriter(out_dir / f"{stem}{s}", dtype) for s in SPLITS}
        self.nbytes = {s: 0 for s in SPLITS}
        self.pending: dict[str, list] = {s: [] for s in SPLITS}  # per split: pieces of each doc
        self.size = {s: 0 for s in SPLITS}
        self.on_flush = on_flush
        self.max_id = 0  # the largest id written (EOS included), 0 before any document

    def add(self, is_val: bool, text: str) -> None:
        s = "val" if is_val else "train"
        self.nbytes[s] += len(text.encode("utf-8"))
        self.pending[s].append(split_text(text))
        self.size[s] += len(text)
        if self.size[s] >= BATCH_CHARS or len(self.pending[s]) >= BATCH_DOCS:
            self._flush(s)

    def _flush(self, s: str) -> None:
        docs_pieces = self.pending[s]
        flat = [p for pieces in docs_pieces for p in pieces]
        # at most ~BATCH_CHARS per call: the library's per-token objects of one call
        # (tokens, masks: ~100 B/token) stay bounded even for a huge document
        ids = []
        for a, b in batched_by_bytes(flat, BATCH_CHARS, BATCH_DOCS):
            ids += self.tok.encode_batch(flat[a:b])
        self.max_id = max(self.max_id, self.tok.eos_id, *(int(a.max()) for a in ids if len(a)))
        k = 0
        for pieces in docs_pieces:
            parts = [a.astype(self.dtype, copy=False) for a in ids[k:k + len(pieces)]]
            k += len(pieces)
            self.writers[s].add(np.concatenate(parts + [self.eos]))
        if self.on_flush is not None:
            self.on_flush(self.size[s])
        self.pending[s], self.size[s] = [], 0

    def close(self) -> dict:
        """Flush, finish the files; ``{"docs", "tokens", "bytes"}`` per split."""
        counts: dict[str, dict[str, int]] = {"docs": {}, "tokens": {}, "bytes": {}}
        for s in SPLITS:
            if self.pending[s]:
                self._flush(s)
            self.writers[s].close()
            counts["docs"][s] = self.writers[s].num_docs
            counts["tokens"][s] = self.writers[s].num_tokens
            counts["bytes"][s] = self.nbytes[s]
        return counts


def _file_ranges(docs_per_file: list[int], chars_per_file: list[int],
                 n_parts: int) -> list[tuple[int, int, int]]:
    """Cut the files into at most ``n_parts`` contiguous ranges of about equal characters:
    ``(first file, end file, index of the range's first document in the corpus)``. Files
    without documents join a neighbour; a range always holds at least one document."""
    total = sum(chars_per_file)
    n_parts = max(1, min(n_parts, sum(1 for n in docs_per_file if n)))
    target = total / n_parts
    ranges: list[tuple[int, int, int]] = []
    start = first_doc = doc = acc = 0
    for fi, (n, c) in enumerate(zip(docs_per_file, chars_per_file)):
        doc += n
        acc += c
        if len(ranges) < n_parts - 1 and doc > first_doc and acc >= target * (len(ranges) + 1):
            ranges.append((start, fi + 1, first_doc))
            start, first_doc = fi + 1, doc
    if doc > first_doc or not ranges:
        ranges.append((start, len(docs_per_file), first_doc))
    else:  # trailing files without documents: extend the last range over them
        a, _, f = ranges[-1]
        ranges[-1] = (a, len(docs_per_file), f)
    return ranges


# What a worker process needs, set by _tokenize_parallel before the workers fork.
_WORKER_STATE: dict[str, Any] = {}


def _tokenize_part(j: int, lo: int, hi: int, first_doc: int) -> None:
    """Tokenise files ``lo:hi`` (first document ``first_doc``) into ``parts/<j>-*``, then
    write ``parts/<j>.json`` (counts, characters) -- last, so it marks a complete part."""
    st = _WORKER_STATE
    w = _SplitWriter(st["tok"], st["out_dir"], f"{j:05d}-", st["dtype"])
    n_chars = 0
    i = first_doc
    for _, d in iter_file_documents(st["source"], st["text_field"], BadRecords("skip"), lo, hi,
                                    files=st["files"]):
        w.add(st["split"].is_val(i, d.key), d.text)
        n_chars += len(d.text)
        i += 1
    counts = w.close()
    # atomic: the parent never reads a half-written file (nothing to make durable: the
    # parts go with the build folder)
    atomic_write(st["out_dir"] / f"{j:05d}.json",
                 json.dumps({"counts": counts, "chars": n_chars, "max_id": w.max_id}),
                 durable=False)


def _worker_main(parts: list, next_part, lock) -> None:
    """A worker process: take the next untaken part until none is left. Ctrl-C goes to the
    parent, which stops the workers; a DataError is written for the parent to raise."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        with lock:
            j = next_part.value
            next_part.value += 1
        if j >= len(parts):
            return
        try:
            _tokenize_part(j, *parts[j])
        except DataError as e:
            (_WORKER_STATE["out_dir"] / f"{j:05d}.error").write_text(str(e))
            sys.exit(1)


def _tokenize_parallel(source: CorpusSource, files: list, parts: list, split: StreamSplit,
                       tok: Tokenizer, dtype, text_field: str, tmp: Path, workers: int,
                       bar) -> tuple[dict, int]:
    """Tokenise ``parts`` (file ranges) in ``workers`` processes, then merge their shards
    in file order into ``tmp/train`` and ``tmp/val`` (megatron's ``add_index``); returns
    the splits' counts and the largest id written.

    Workers are forked (the corpus list, split, tokenizer and settings are inherited, not
    pickled)
    with the tokenizer library's own threads off (``TOKENIZERS_PARALLELISM=false``): the
    processes are the parallelism. Each takes the next part from a shared counter. A
    worker's DataError (a file that changed since the split pass) is re-raised here; a
    worker that dies (killed, out of memory) or fails otherwise is a DataError naming its
    exit; on any error or Ctrl-C the other workers are stopped. Half-written shards go
    with ``tmp``.
    """
    import multiprocessing as mp

    out_dir = tmp / "parts"
    out_dir.mkdir()
    ctx = mp.get_context("fork")
    _WORKER_STATE.update(source=source, files=files, split=split, tok=tok, dtype=dtype,
                         text_field=text_field, out_dir=out_dir)
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    next_part, lock = ctx.RawValue("i", 0), ctx.Lock()
    procs = [ctx.Process(target=_worker_main, args=(parts, next_part, lock), daemon=True)
             for _ in range(workers)]
    gc.freeze()  # forked workers then share the parent's objects without copying their pages
    try:
        for proc in procs:
            proc.start()
        results = _collect_parts(procs, len(parts), out_dir, bar)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
        gc.unfreeze()
        _WORKER_STATE.clear()
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    return _merge_parts(results, out_dir, tmp, dtype)


def _collect_parts(procs: list, n_parts: int, out_dir: Path, bar) -> dict[int, dict]:
    """Wait until every part's ``<j>.json`` is written (ticking ``bar`` by its characters)
    and return them by part; raise a DataError once a worker fails or all exit short."""
    import signal

    results: dict[int, dict] = {}
    while True:
        exits = [proc.exitcode for proc in procs]  # before the scan: no exit is missed
        for j in range(n_parts):
            done = out_dir / f"{j:05d}.json"
            if j not in results and done.is_file():
                results[j] = json.loads(done.read_text())
                bar.update(results[j]["chars"])
        if len(results) == n_parts:
            return results
        failed = [proc for proc, code in zip(procs, exits) if code not in (None, 0)]
        if failed or all(code is not None for code in exits):
            errors = sorted(out_dir.glob("*.error"))
            if errors:
                raise DataError(errors[0].read_text())
            code = failed[0].exitcode if failed else 0
            if code < 0:
                why = (f"was killed by signal {signal.Signals(-code).name}"
                       + (" (out of memory?)" if code == -signal.SIGKILL else ""))
            elif code > 0:
                why = f"exited with code {code} (see its traceback above)"
            else:  # every worker exited cleanly, yet a part has no result
                why = "exited without writing every part"
            raise DataError(f"a data.workers tokenisation process {why}; "
                            f"{len(results)}/{n_parts} parts done, nothing was "
                            "published; rerun (with fewer data.workers if memory ran out)")
        procs[0].join(0.05)


def _merge_parts(results: dict[int, dict], out_dir: Path, tmp: Path, dtype) -> tuple[dict, int]:
    """Merge the parts' shards in part (= file) order into ``tmp/train`` and ``tmp/val``,
    remove them; returns the splits' counts and the largest id written."""
    n_parts = len(results)
    idx = megatron_indexed()
    total: dict[str, dict[str, int]] = {"docs": {}, "tokens": {}, "bytes": {}}
    for s in SPLITS:
        builder = idx.IndexedDatasetBuilder(idx.get_bin_path(str(tmp / s)), dtype=dtype)
        for j in range(n_parts):
            if results[j]["counts"]["docs"][s]:
                builder.add_index(str(out_dir / f"{j:05d}-{s}"))
        builder.finalize(idx.get_idx_path(str(tmp / s)))
        for key in total:
            total[key][s] = sum(results[j]["counts"][key][s] for j in range(n_parts))
    shutil.rmtree(out_dir)
    return total, max(results[j]["max_id"] for j in range(n_parts))


def _peak_rss_mb(children: bool = False) -> Optional[float]:
    """This process' peak resident set so far, in MB (None where getrusage is missing);
    ``children``: the largest of the child processes it has waited for so far (over the
    process' life: an earlier, larger child would show here too)."""
    try:
        import resource
        import sys

        who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
        r = resource.getrusage(who).ru_maxrss
        return round(r / (1 << 20) if sys.platform == "darwin" else r / 1024, 1)
    except (ImportError, OSError):
        return None


def _prepare_indexed(source: CorpusSource, vocab_size: int, val_fraction: float, root: Path,
                     t0: float) -> PreparedData:
    """Use a Megatron prefix in place: split its documents by a hash of the document index.

    Nothing is copied. Document ``i`` (sequences ``document_indices[i]..[i+1]``) goes to val
    iff ``sha256("doc:<i>") < val_fraction`` (the same rule and small-corpus guarantee as
    text corpora). Tokens are used as stored, so EOS separators are whatever the
    preprocessing wrote (Megatron's ``--append-eod``). The largest id is checked against
    ``vocab_size`` once and remembered in ``indexed/<fp16>.json``.
    """
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise DataError(f"vocab_size must be a positive int, got {vocab_size!r}")
    ds = open_indexed(source.path, what=f"data.corpus indexed dataset {source.path}")
    doc_idx = np.asarray(ds.document_indices, dtype=np.int64)
    n_docs = len(doc_idx) - 1
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    if n_docs <= 0 or lengths.sum() == 0:
        raise DataError(f"data.corpus indexed dataset {source.path} is empty: no documents/tokens")
    h = hashlib.sha256(f"moe-testbed-indexed v{PIPELINE_VERSION}\n{float(val_fraction)!r}\n"
                       .encode())
    h.update(source_fingerprint(source).encode())
    fp = h.hexdigest()

    def scan() -> int:
        all_tokens = TokenSplit(ds, "all").tokens() if len(lengths) else np.zeros(0)
        return int(all_tokens.max()) if len(all_tokens) else 0

    max_id = _memo_max_id(root / "indexed" / f"{fp[:16]}.json", scan,
                          prefix=str(source.path))
    if max_id >= vocab_size:
        raise DataError(f"vocab_size={vocab_size} is too small for indexed dataset {source.path}: "
                        f"it contains token id {max_id} (needs vocab_size >= {max_id + 1})")

    is_val = np.array(split_keys([f"doc:{i}" for i in range(n_docs)], val_fraction), dtype=bool)
    doc_of_seq = np.repeat(np.arange(n_docs), np.diff(doc_idx))
    seq_val = is_val[doc_of_seq]
    splits = {
        "train": TokenSplit(ds, "train", np.nonzero(~seq_val)[0], num_docs=int((~is_val).sum())),
        "val": TokenSplit(ds, "val", np.nonzero(seq_val)[0], num_docs=int(is_val.sum())),
    }
    tok = None
    for cand in (Path(str(source.path) + ".tokenizer.json"), source.path.parent / "tokenizer.json"):
        if cand.is_file():
            with contextlib.suppress(DataError):
                tok = BPETokenizer.load(cand)
                break
    stats = {"corpus": source.describe(), "tokenizer": None if tok is None else tok.kind,
             "vocab_size": vocab_size, "val_fraction": val_fraction, "max_id": max_id,
             "docs": {s: splits[s].num_docs for s in SPLITS},
             "tokens": {s: splits[s].num_tokens for s in SPLITS},
             "seconds": {"load": time.perf_counter() - t0}, "cached": True,
             "tokenizer_trained": False}
    return PreparedData(tok, splits["train"], splits["val"], fp, stats, source.path.parent)
