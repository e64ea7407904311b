"""Tests of moe.data: corpus split, tokenizers, indexed-dataset caches, loaders, errors.

Everything runs on tiny temporary corpora except ``test_stdlib_corpus_bytes``, which
prepares the real default corpus (Python stdlib) with the bytes tokenizer (~3-5 s).
The cache always lives under a temporary MOE_TESTBED_CACHE.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moe.data import (BPETokenizer, ByteTokenizer, DataError, TokenBatches, TokenSplit,
                      eval_batches, open_indexed, prepare_data, resolve_corpus, split_keys,
                      write_indexed)
from moe.data import prepare as prep_mod
from moe.data.corpus import iter_documents, list_files

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega def class return import yield").split()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOE_TESTBED_CACHE", str(cache))
    return cache


def _text(rng: random.Random, n_words: int) -> str:
    lines = []
    for _ in range(max(1, n_words // 8)):
        lines.append("    " * rng.randint(0, 2) + " ".join(rng.choice(WORDS) for _ in range(8)))
    return "\n".join(lines) + "\n"


def make_folder(root: Path, n: int = 40, seed: int = 0, order=None, n_words: int = 200) -> Path:
    """A folder corpus of ``n`` files in nested dirs; ``order`` permutes creation order."""
    rng = random.Random(seed)
    contents = {f"pkg{i % 3}/sub{i % 2}/file_{i:03d}.py": _text(rng, n_words) for i in range(n)}
    names = list(contents)
    if order is not None:
        random.Random(order).shuffle(names)
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(contents[name])
    return root


# ---------------------------------------------------------------- corpus & split


def test_split_deterministic_and_order_independent(tmp_path):
    a = make_folder(tmp_path / "a", order=1)
    b = make_folder(tmp_path / "b", order=2)  # same files, created in another order
    da = [(d.key, d.text) for d in iter_documents(resolve_corpus(str(a)))]
    db = [(d.key, d.text) for d in iter_documents(resolve_corpus(str(b)))]
    assert da == db and [k for k, _ in da] == sorted(k for k, _ in da)
    keys = [k for k, _ in da]
    split = dict(zip(keys, split_keys(keys, 0.2)))
    assert split == dict(zip(keys, split_keys(keys, 0.2)))  # same split on a second call
    shuffled = keys[:]
    random.Random(3).shuffle(shuffled)
    assert dict(zip(shuffled, split_keys(shuffled, 0.2))) == split  # independent of order
    assert 0 < sum(split.values()) < len(keys)
    # Raising val_fraction only moves documents train -> val.
    bigger = dict(zip(keys, split_keys(keys, 0.5)))
    assert all(bigger[k] for k, v in split.items() if v)

    pa = prepare_data(str(a), "bytes", 257, val_fraction=0.2, progress=False)
    pb = prepare_data(str(b), "bytes", 257, val_fraction=0.2, progress=False)
    for s in ("train", "val"):
        assert np.array_equal(pa.split(s).tokens(), pb.split(s).tokens())
    assert pa.val.num_docs == sum(split.values())


def test_small_corpus_still_gets_a_val_doc():
    keys = ["a.py", "b.py", "c.py"]
    assert sum(split_keys(keys, 0.02)) == 1
    assert sum(split_keys(keys, 0.0)) == 0
    assert sum(split_keys(keys, 0.999)) == 2  # at least one train document stays


def test_folder_skips_hidden_pycache_and_binary(tmp_path):
    root = make_folder(tmp_path / "c", n=3)
    (root / ".hidden.txt").write_text("secret")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.txt").write_text("cached")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    (root / "empty.txt").write_text("")
    (root / "notes.md").write_text("# notes\n")
    keys = [d.key for d in iter_documents(resolve_corpus(str(root)))]
    assert "notes.md" in keys and len(keys) == 4
    assert not any(k.startswith(".") or "__pycache__" in k or k in ("blob.bin", "empty.txt")
                   for k in keys)


def test_stdlib_listing_excludes_site_packages():
    src = resolve_corpus("stdlib")
    files = list_files(src)
    assert files and all(rel.endswith(".py") for rel, _ in files)
    assert not any(rel.split("/")[0] in ("site-packages", "dist-packages") for rel, _ in files)


def test_jsonl_corpus(tmp_path):
    rng = random.Random(0)
    rows = [{"text": _text(rng, 80), "id": i} for i in range(30)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = prepare_data(str(path), "bytes", 257, val_fraction=0.1, progress=False)
    assert data.train.num_docs + data.val.num_docs == 30
    total = sum(len(r["text"].encode()) + 1 for r in rows)
    assert data.train.num_tokens + data.val.num_tokens == total
    # Content-keyed split: reversing the rows keeps every row in its split.
    path2 = tmp_path / "rev.jsonl"
    path2.write_text("\n".join(json.dumps(r) for r in rows[::-1]))
    data2 = prepare_data(str(path2), "bytes", 257, val_fraction=0.1, progress=False)
    assert data2.val.num_docs == data.val.num_docs
    assert data2.val.num_tokens == data.val.num_tokens


# ---------------------------------------------------------------- tokenizers


def test_bpe_round_trip_and_cache(tmp_path):
    root = make_folder(tmp_path / "c", n=30)
    before = prep_mod.TRAIN_COUNTER["bpe"]
    d1 = prepare_data(str(root), "bpe", 400, val_fraction=0.1, progress=False)
    assert prep_mod.TRAIN_COUNTER["bpe"] == before + 1 and d1.stats["tokenizer_trained"]
    assert not d1.stats["cached"]
    tok = d1.tokenizer
    assert isinstance(tok, BPETokenizer) and tok.vocab_size <= 400 and tok.eos_id == 0
    for s in ["def f(x):\n    return x  # comment\n\n\t\ttabs", "ünïcödé ✓ 🐍 中文",
              "  leading and trailing  ", "", "literal <|endoftext|> is text", "\r\n\x00\x7f"]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.eos_id not in ids
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    # Compression on in-domain text: merges were learned.
    sample = _text(random.Random(9), 200)
    assert len(tok.encode(sample)) < len(sample.encode()) / 2

    # Second prepare: loaded from cache, no training, same tokens, same fingerprint.
    t = time.perf_counter()
    d2 = prepare_data(str(root), "bpe", 400, val_fraction=0.1, progress=False)
    assert time.perf_counter() - t < 2.0
    assert prep_mod.TRAIN_COUNTER["bpe"] == before + 1
    assert d2.stats["cached"] and d2.fingerprint == d1.fingerprint
    assert np.array_equal(d2.train.tokens(), d1.train.tokens())
    assert d2.tokenizer.encode(sample) == tok.encode(sample)

    # Data cache lost but tokenizer cache kept: re-tokenise without retraining.
    import shutil
    shutil.rmtree(d1.cache_path)
    d3 = prepare_data(str(root), "bpe", 400, val_fraction=0.1, progress=False)
    assert prep_mod.TRAIN_COUNTER["bpe"] == before + 1 and not d3.stats["cached"]
    assert np.array_equal(d3.train.tokens(), d1.train.tokens())

    # A changed corpus gets a new fingerprint (and a retrain).
    (root / "new.py").write_text("brand new file\n" * 20)
    d4 = prepare_data(str(root), "bpe", 400, val_fraction=0.1, progress=False)
    assert d4.fingerprint != d1.fingerprint


def test_stream_layout_documents_joined_by_eos(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    for name, text in [("a.txt", "first doc"), ("b.txt", "second"), ("c.txt", "third one")]:
        (root / name).write_text(text)
    data = prepare_data(str(root), "bytes", 300, val_fraction=0.0, progress=False)
    tok = data.tokenizer
    assert isinstance(tok, ByteTokenizer) and data.val.num_tokens == 0
    assert tok.decode(data.train.tokens().tolist()) == \
        "first doc<|endoftext|>second<|endoftext|>third one<|endoftext|>"
    assert tok.decode(tok.encode("héllo")) == "héllo"


# ---------------------------------------------------------------- indexed datasets


def test_indexed_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 5000, size=int(n)).astype(np.uint16)
            for n in rng.integers(1, 300, size=50)]
    write_indexed(tmp_path / "ds", docs, np.uint16)
    ds = open_indexed(tmp_path / "ds")
    assert len(ds) == 50
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
    whole = TokenSplit(ds, "all")
    flat = np.concatenate(docs)
    assert whole.num_tokens == len(flat) and np.array_equal(whole.tokens(), flat)
    # A non-contiguous subset reads across sequence boundaries correctly.
    pick = np.array([1, 4, 5, 20, 49])
    sub = TokenSplit(ds, "sub", pick)
    ref = np.concatenate([docs[i] for i in pick])
    assert np.array_equal(sub.tokens(), ref)
    for start, length in [(0, 1), (3, len(ref) - 3), (len(docs[1]) - 1, 5)]:
        assert np.array_equal(sub.read(start, length), ref[start:start + length])


def test_megatron_prefix_corpus(tmp_path):
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(1, 999, size=int(n)), 0).astype(np.uint16)
            for n in rng.integers(20, 60, size=100)]
    write_indexed(tmp_path / "mega_text_document", docs, np.uint16)
    data = prepare_data(str(tmp_path / "mega_text_document"), "bpe", 1000, val_fraction=0.1,
                        progress=False)
    assert data.tokenizer is None
    assert data.train.num_docs + data.val.num_docs == 100 and data.val.num_docs > 0
    assert data.train.num_tokens + data.val.num_tokens == sum(len(d) for d in docs)
    again = prepare_data(str(tmp_path / "mega_text_document.idx"), "bpe", 1000, val_fraction=0.1,
                         progress=False)
    assert np.array_equal(again.val.tokens(), data.val.tokens())
    x = next(TokenBatches(data.train, 4, 16, seed=0))
    assert x.shape == (4, 17) and int(x.max()) < 1000
    with pytest.raises(DataError, match=r"vocab_size=500 .*token id 9\d\d"):
        prepare_data(str(tmp_path / "mega_text_document"), "bpe", 500, progress=False)


def test_megatron_prefix_multi_sequence_documents(tmp_path):
    """Megatron data may store several sequences (e.g. sentences) per document."""
    from moe.data.indexed import megatron_indexed
    idx = megatron_indexed()
    prefix = str(tmp_path / "sent")
    builder = idx.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs = []
    for d in range(60):
        parts = [np.full(5 + (d + k) % 7, d + 1, dtype=np.uint16) for k in range(3)]
        for p in parts:
            builder.add_item(torch.from_numpy(p.astype(np.int64)))
        builder.end_document()
        docs.append(np.concatenate(parts))
    builder.finalize(prefix + ".idx")
    data = prepare_data(prefix, "bytes", 257, val_fraction=0.2, progress=False)
    assert data.train.num_docs + data.val.num_docs == 60
    val_ids = set(data.val.tokens().tolist())
    train_ids = set(data.train.tokens().tolist())
    assert val_ids and not (val_ids & train_ids)  # documents are never cut between splits
    expect = np.concatenate([docs[i - 1] for i in sorted(val_ids)])
    assert np.array_equal(data.val.tokens(), expect)  # document order kept within a split


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch, _cache):
    root = make_folder(tmp_path / "c", n=10)
    from moe.data import indexed

    def boom(self):
        raise KeyboardInterrupt("killed mid-write")

    with monkeypatch.context() as m:
        m.setattr(indexed.IndexedWriter, "close", boom)
        with pytest.raises(KeyboardInterrupt):
            prepare_data(str(root), "bytes", 257, progress=False)
    assert list((_cache / "data").iterdir()) == []  # neither a final nor a temporary folder
    data = prepare_data(str(root), "bytes", 257, progress=False)
    assert not data.stats["cached"] and data.train.num_tokens > 0


# ---------------------------------------------------------------- loaders


@pytest.fixture
def small_data(tmp_path):
    root = make_folder(tmp_path / "c", n=40, n_words=400)
    return prepare_data(str(root), "bytes", 257, val_fraction=0.1, progress=False)


@pytest.fixture
def position_split(tmp_path):
    """A split whose token at stream position p is p (so a row's first token is its start)."""
    stream = np.arange(6000, dtype=np.uint16)
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, 6000), 40, replace=False))
    write_indexed(tmp_path / "pos", np.split(stream, cuts), np.uint16)
    return TokenSplit(open_indexed(tmp_path / "pos"), "train")


def test_batches_shape_layout_and_epoch_coverage(position_split):
    seq, extra, bs = 32, 2, 8
    tb = TokenBatches(position_split, bs, seq, extra_tokens=extra, seed=3)
    n = tb.num_samples
    assert n == (6000 - 1 - extra) // seq
    starts = []
    for _ in range(-(-n // bs) + 2):  # a bit more than one epoch
        x = next(tb)
        assert x.shape == (bs, seq + 1 + extra) and x.dtype == torch.int64
        # Rows are contiguous windows [s, s + seq + 1 + extra) starting at multiples of seq.
        assert torch.equal(x - x[:, :1], torch.arange(seq + 1 + extra).expand(bs, -1))
        assert bool((x[:, 0] % seq == 0).all())
        starts += x[:, 0].tolist()
    assert sorted(starts[:n]) == list(range(0, n * seq, seq))  # each sample once per epoch
    assert starts[n:2 * n] != starts[:n]  # the next epoch is reshuffled
    assert tb.epoch == 1


def test_batches_deterministic_and_resume(small_data):
    a = TokenBatches(small_data.train, 4, 16, extra_tokens=1, seed=7)
    b = TokenBatches(small_data.train, 4, 16, extra_tokens=1, seed=7)
    first = [next(a) for _ in range(5)]
    assert all(torch.equal(x, next(b)) for x in first)
    c = TokenBatches(small_data.train, 4, 16, extra_tokens=1, seed=8)
    assert not torch.equal(first[0], next(c))

    # Resume after k batches, across an epoch boundary too.
    ref = TokenBatches(small_data.train, 4, 16, extra_tokens=1, seed=7)
    k = ref.num_samples // 4 - 1
    for _ in range(k):
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a plain-JSON checkpoint
    expect = [next(ref) for _ in range(4)]
    resumed = TokenBatches(small_data.train, 4, 16, extra_tokens=1, seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, next(resumed)) for e in expect)
    bare = TokenBatches(small_data.train, 4, 16, extra_tokens=1, seed=7)
    bare.load_state_dict(state["consumed_samples"])
    assert torch.equal(expect[0], next(bare))

    with pytest.raises(DataError, match="seed"):
        TokenBatches(small_data.train, 4, 16, extra_tokens=1, seed=99).load_state_dict(state)
    with pytest.raises(DataError, match="global batches"):
        TokenBatches(small_data.train, 3, 16, extra_tokens=1, seed=7).load_state_dict(
            {"consumed_samples": 4})


def test_data_parallel_ranks_disjoint_union_global(small_data):
    W, B = 3, 2
    glob = TokenBatches(small_data.train, B * W, 16, extra_tokens=1, seed=5)
    ranks = [TokenBatches(small_data.train, B, 16, extra_tokens=1, seed=5, rank=r, world_size=W)
             for r in range(W)]
    for _ in range(6):
        g = next(glob)
        parts = [next(r) for r in ranks]
        for r, p in enumerate(parts):
            assert torch.equal(p, g[r::W])  # rank r takes samples r, r+W, ... of the global batch
        rows = [tuple(row.tolist()) for p in parts for row in p]
        assert len(set(rows)) == len(rows) == B * W  # disjoint
        assert sorted(rows) == sorted(tuple(row.tolist()) for row in g)  # union = global batch
    # A checkpoint from W ranks resumes on 1 rank with the same global batch size.
    one = TokenBatches(small_data.train, B * W, 16, extra_tokens=1, seed=5)
    one.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(one), next(glob))


def test_eval_batches(small_data):
    seq = 16
    val = small_data.val
    batches = list(eval_batches(val, 4, seq))
    n = (val.num_tokens - 1) // seq
    assert sum(len(b) for b in batches) == n
    stream = val.tokens().astype(np.int64)
    flat = torch.cat(batches)
    for i in (0, n // 2, n - 1):
        assert np.array_equal(flat[i].numpy(), stream[i * seq:i * seq + seq + 1])
    assert all(torch.equal(x, y) for x, y in zip(batches, eval_batches(val, 4, seq)))
    assert len(list(eval_batches(val, 4, seq, max_batches=2))) == 2
    parts = [list(eval_batches(val, 2, seq, rank=r, world_size=2)) for r in range(2)]
    assert sum(len(b) for p in parts for b in p) == n


# ---------------------------------------------------------------- bad inputs


def test_error_missing_corpus(tmp_path):
    with pytest.raises(DataError, match=r"corpus path does not exist: .*nope"):
        prepare_data(str(tmp_path / "nope"), "bytes", 257)


def test_error_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        prepare_data(str(tmp_path / "empty"), "bytes", 257)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.txt").write_text("")
    with pytest.raises(DataError, match=r"empty: no non-empty documents"):
        prepare_data(str(tmp_path / "blank"), "bytes", 257)


def test_error_jsonl_without_text(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(DataError, match=r"line 2 has no \"text\" field"):
        prepare_data(str(p), "bytes", 257)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_error_vocab_too_small(tmp_path, kind):
    root = make_folder(tmp_path / "c", n=3)
    with pytest.raises(DataError, match=rf"vocab_size=100 is too small for the '{kind}'.*257"):
        prepare_data(str(root), kind, 100)


def test_error_seq_len_larger_than_split(small_data):
    n = small_data.val.num_tokens
    with pytest.raises(DataError, match=rf"the val split has {n} tokens.*seq_len={n + 5}"):
        list(eval_batches(small_data.val, 1, n + 5))
    with pytest.raises(DataError, match=r"train split"):
        TokenBatches(small_data.train, 1, small_data.train.num_tokens)


@pytest.mark.parametrize("damage", ["garbage_idx", "truncated_idx", "truncated_bin", "no_bin"])
def test_error_corrupt_indexed(tmp_path, damage):
    docs = [np.arange(1, 200, dtype=np.uint16) for _ in range(20)]
    prefix = tmp_path / "ds"
    write_indexed(prefix, docs, np.uint16)
    idx, binp = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if damage == "garbage_idx":
        idx.write_bytes(b"not an index at all" * 5)
    elif damage == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:60])
    elif damage == "truncated_bin":
        binp.write_bytes(binp.read_bytes()[:1000])
    else:
        binp.unlink()
    words = "no .bin" if damage == "no_bin" else "corrupt or truncated"
    with pytest.raises(DataError, match=words):
        prepare_data(str(prefix), "bytes", 257)
    if damage != "no_bin":
        with pytest.raises(DataError, match=rf"{idx.name}.*corrupt or truncated"):
            open_indexed(prefix)


def test_error_bad_val_fraction_and_tokenizer(tmp_path):
    root = make_folder(tmp_path / "c", n=3)
    with pytest.raises(DataError, match="val_fraction"):
        prepare_data(str(root), "bytes", 257, val_fraction=1.5)
    with pytest.raises(DataError, match="tokenizer"):
        prepare_data(str(root), "wordpiece", 257)


# ---------------------------------------------------------------- the real default corpus


def test_stdlib_corpus_bytes(tmp_path):
    cache = tmp_path / "stdlib-cache"
    t = time.perf_counter()
    d1 = prepare_data("stdlib", "bytes", 257, cache_dir=cache, progress=False)
    cold = time.perf_counter() - t
    docs = d1.train.num_docs + d1.val.num_docs
    assert 1000 < docs < 5000
    frac = d1.val.num_docs / docs
    assert 0.01 < frac < 0.035, frac  # ~2% by document
    assert 0.003 < d1.val.num_tokens / (d1.train.num_tokens + d1.val.num_tokens) < 0.08
    t = time.perf_counter()
    d2 = prepare_data("stdlib", "bytes", 257, cache_dir=cache, progress=False)
    assert time.perf_counter() - t < 2.0 and d2.stats["cached"], cold
    assert d2.fingerprint == d1.fingerprint
    assert np.array_equal(d2.val.tokens(), d1.val.tokens())
    # The split is a pure function of relative paths: recompute it independently.
    from moe.data.corpus import iter_documents
    keys = [d.key for d in iter_documents(resolve_corpus("stdlib"))]
    assert sum(split_keys(keys, 0.02)) == d1.val.num_docs
    x = next(TokenBatches(d1.train, 2, 128, seed=0))
    assert x.shape == (2, 129)


# ---------------------------------------------------------------- streaming & formats (issue 17)


def _reference_prepare(source, vocab_size: int, val_fraction: float):
    """The in-memory pipeline this streaming one replaced (whole corpus in lists)."""
    import hashlib

    from moe.data.tokenizer import BPETokenizer as BPE

    docs = list(iter_documents(source))
    keys = [d.key for d in docs]
    hashes = [int.from_bytes(hashlib.sha256(k.encode("utf-8", "surrogatepass")).digest()[:8],
                             "big") / 2.0**64 for k in keys]
    is_val = [h < val_fraction for h in hashes]
    if not any(is_val):
        is_val[min(range(len(keys)), key=lambda i: (hashes[i], keys[i]))] = True
    elif all(is_val):
        is_val[max(range(len(keys)), key=lambda i: (hashes[i], keys[i]))] = False
    texts = {"train": [d.text for d, v in zip(docs, is_val) if not v],
             "val": [d.text for d, v in zip(docs, is_val) if v]}
    tok = BPE.train(texts["train"], vocab_size)
    out = {s: np.concatenate([np.append(tok.encode_batch([t])[0], tok.eos_id) for t in ts])
           for s, ts in texts.items()}
    return tok, out, {s: len(ts) for s, ts in texts.items()}, sum(map(len, texts["train"]))


def make_mixed_shards(root: Path, seed: int = 0) -> Path:
    """A folder of text files and .jsonl / .jsonl.gz / .jsonl.zst / .parquet shards, with one
    large document (cut into pieces when CHUNK_CHARS is lowered)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(6):
        (root / f"a_text_{i}.py").write_text(_text(rng, 150))
    (root / "b_big.txt").write_text(_text(rng, 12000))  # ~80k characters
    rows = lambda n: [{"text": _text(rng, rng.randint(20, 120)), "id": i} for i in range(n)]
    (root / "c_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(15)))
    with gzip.open(root / "d_rows.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows(15)))
    data = "".join(json.dumps(r) + "\n" for r in rows(15)).encode()
    (root / "e_rows.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"text": [r["text"] for r in rows(25)]}), root / "f_rows.parquet",
                   row_group_size=7)
    return root


def test_streaming_prepare_equals_in_memory_token_for_token(tmp_path, monkeypatch):
    from moe.data import tokenizer as tok_mod

    pytest.importorskip("pyarrow")
    pytest.importorskip("zstandard")
    root = make_mixed_shards(tmp_path / "mixed")
    source = resolve_corpus(str(root))
    kinds = {Path(d.key).suffix if not d.key.startswith("sha256:") else "row"
             for d in iter_documents(source)}
    assert kinds == {".py", ".txt", "row"} and len(list(iter_documents(source))) == 6 + 1 + 70
    monkeypatch.setattr(tok_mod, "CHUNK_CHARS", 4096)  # the big document is cut in ~20 pieces
    data = prepare_data(str(root), "bpe", 400, val_fraction=0.1, progress=False)
    ref_tok, ref, ref_docs, ref_chars = _reference_prepare(source, 400, 0.1)
    assert data.tokenizer.hf_tokenizer.to_str() == ref_tok.hf_tokenizer.to_str()
    for s in ("train", "val"):
        assert np.array_equal(data.split(s).tokens(), ref[s]), s
        assert data.stats["docs"][s] == ref_docs[s]
    assert data.stats["bad_records"]["skipped"] == 0
    assert data.stats["tokenizer_sample_chars"] == ref_chars  # the whole train split


def _cache_bytes(d) -> dict:
    return {f: (d.cache_path / f).read_bytes()
            for f in ("train.bin", "train.idx", "val.bin", "val.idx")}


@pytest.mark.parametrize("kind,vocab", [("bytes", 257), ("bpe", 400)])
def test_workers_write_the_same_bytes_as_one_process(tmp_path, monkeypatch, capfd, kind, vocab):
    """data.workers: contiguous file ranges tokenised in forked processes and merged in
    file order give the one-process .bin/.idx byte for byte (split, order, EOS, dtype), with
    a bad record counted once and no fork warning from the tokenizer library."""
    from moe.data import tokenizer as tok_mod

    pytest.importorskip("pyarrow")
    pytest.importorskip("zstandard")
    root = make_mixed_shards(tmp_path / "mixed")
    (root / "c_rows.jsonl").write_text((root / "c_rows.jsonl").read_text() + "{bad json\n")
    (root / "g_empty.txt").write_text("")  # a file without documents inside a range
    monkeypatch.setattr(tok_mod, "CHUNK_CHARS", 4096)
    monkeypatch.setattr(prep_mod, "PARALLEL_MIN_CHARS", 0)
    opts = dict(val_fraction=0.1, progress=False, on_bad_record="skip")
    one = prepare_data(str(root), kind, vocab, cache_dir=tmp_path / "c1", workers=1, **opts)
    many = prepare_data(str(root), kind, vocab, cache_dir=tmp_path / "c3", workers=3, **opts)
    assert one.stats["workers"] == 1 and many.stats["workers"] == 3
    assert many.stats["parts"] > 3  # several ranges per worker
    assert _cache_bytes(one) == _cache_bytes(many)
    for d in (one, many):  # the build's max-id memo is what a scan of its .bin files gives
        scan = max(int(np.fromfile(d.cache_path / f"{s}.bin", dtype=d.train.dtype).max())
                   for s in ("train", "val"))
        assert json.loads((d.cache_path / "max_id.json").read_text())["max_id"] == scan
    for key in ("docs", "tokens", "bytes", "bad_records"):
        assert one.stats[key] == many.stats[key], key
    assert many.stats["bad_records"]["skipped"] == 1
    assert many.stats["peak_rss_mb"]["tokenize_worker_max"] > 0
    assert not list((tmp_path / "c3" / "data").glob(".tmp-*"))  # shards merged and removed
    assert "forked" not in capfd.readouterr().err


def test_worker_failure_fails_the_build_and_publishes_nothing(tmp_path, monkeypatch):
    """A DataError in a worker (e.g. a shard changed between the split pass and
    tokenisation) reaches the caller; no cache folder is published and nothing is left."""
    root = make_folder(tmp_path / "c", n=12)
    monkeypatch.setattr(prep_mod, "PARALLEL_MIN_CHARS", 0)
    real = prep_mod.iter_file_documents

    def flaky(source, text_field, bad, start=0, stop=None, files=None):
        if start > 0:  # a worker's range (the parent reads from file 0)
            raise DataError("data.corpus: doc007.txt changed while it was read")
        return real(source, text_field, bad, start, stop, files)

    monkeypatch.setattr(prep_mod, "iter_file_documents", flaky)  # forked workers inherit it
    with pytest.raises(DataError, match="doc007.txt changed"):
        prepare_data(str(root), "bytes", 257, progress=False, workers=2)
    data_dir = tmp_path / "cache" / "data"
    assert data_dir.is_dir() and not list(data_dir.iterdir())  # no cache, no .tmp-* left
    monkeypatch.setattr(prep_mod, "iter_file_documents", real)
    ok = prepare_data(str(root), "bytes", 257, progress=False, workers=2)
    assert ok.stats["workers"] == 2 and sum(ok.stats["docs"].values()) == 12


def test_a_killed_worker_fails_the_build_instead_of_hanging(tmp_path, monkeypatch):
    """A worker killed mid-part (the OOM killer's SIGKILL) is reported with its signal and
    the other worker is stopped; no cache is published, and a rerun builds it."""
    import signal

    root = make_folder(tmp_path / "c", n=12)
    monkeypatch.setattr(prep_mod, "PARALLEL_MIN_CHARS", 0)
    real = prep_mod.iter_file_documents

    def killed(source, text_field, bad, start=0, stop=None, files=None):
        if start > 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(source, text_field, bad, start, stop, files)

    monkeypatch.setattr(prep_mod, "iter_file_documents", killed)
    t = time.perf_counter()
    with pytest.raises(DataError, match=r"tokenisation process was killed by signal SIGKILL "
                                        r"\(out of memory\?\); \d+/\d+ parts done, nothing "
                                        r"was published"):
        prepare_data(str(root), "bytes", 257, progress=False, workers=2)
    assert time.perf_counter() - t < 60
    assert not list((tmp_path / "cache" / "data").iterdir())
    monkeypatch.setattr(prep_mod, "iter_file_documents", real)
    assert sum(prepare_data(str(root), "bytes", 257, progress=False,
                            workers=2).stats["docs"].values()) == 12


def test_file_ranges_cover_every_file_once_in_order():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        docs = [rng.choice([0, 0, 1, 3, 10]) for _ in range(n)]
        if not any(docs):
            docs[rng.randrange(n)] = 1
        chars = [d * rng.randint(1, 1000) for d in docs]
        k = rng.randint(1, 12)
        ranges = prep_mod._file_ranges(docs, chars, k)
        assert 1 <= len(ranges) <= k
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous
        for lo, hi, first in ranges:
            assert first == sum(docs[:lo]) and sum(docs[lo:hi]) > 0


def test_bad_workers_setting_is_named():
    from moe.config import ConfigError, load_config

    with pytest.raises(DataError, match="data.workers must be a positive int"):
        prepare_data("stdlib", "bytes", 257, progress=False, workers=0)
    with pytest.raises(ConfigError, match="data.workers"):
        load_config(None, ["data.workers=0"]).validate()


def test_tokenizer_trained_on_a_sample(tmp_path):
    root = make_folder(tmp_path / "c", n=60, n_words=300)
    full = prepare_data(str(root), "bpe", 400, progress=False)
    small = prepare_data(str(root), "bpe", 400, progress=False, tokenizer_sample_bytes=20_000)
    assert small.cache_path != full.cache_path  # a non-default sample is its own cache
    n = small.stats["tokenizer_sample_chars"]
    assert 5_000 < n < 50_000 < full.stats["tokenizer_sample_chars"]
    assert small.stats["docs"] == full.stats["docs"]  # same split, other merges


def test_split_text_pieces_encode_like_the_whole():
    from moe.data.tokenizer import split_text

    rng = random.Random(3)
    words = ["alpha", "beta", "x's", "12", "345", ",.;", "()", "ñé", "漢字", "'", '"']
    seps = [" ", "  ", "\n", "\n\n", "", "\t", " \n"]
    docs = ["".join(rng.choice(words) + rng.choice(seps) for _ in range(2000)) for _ in range(8)]
    tok = BPETokenizer.train(docs, 500)
    for d in docs:
        for mc in (64, 300):
            parts = split_text(d, mc)
            assert "".join(parts) == d and all(len(p) <= mc for p in parts)
            for a, b in zip(parts, parts[1:]):
                if not a[-1].isspace() and b[:1] in (" ", "\n") and not b[1:2].isspace():
                    # a safe cut (the usual case in real text): ids unchanged
                    assert tok.encode(a) + tok.encode(b) == tok.encode(a + b)


def test_streaming_prepare_memory_is_bounded(tmp_path):
    """Peak Python allocations while preparing a ~20 MB JSONL corpus with one ~0.5 MB
    document stay bounded by a few batches plus a small multiple of the largest document
    (its line, text, pieces and ids), far below the corpus: documents stream."""
    import tracemalloc

    rng = random.Random(1)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        big = _text(rng, 80_000)  # ~0.5 MB document
        f.write(json.dumps({"text": big}) + "\n")
        size = 0
        while size < 20_000_000:
            line = json.dumps({"text": _text(rng, 400)}) + "\n"
            f.write(line)
            size += len(line)
    total = path.stat().st_size
    tracemalloc.start()
    try:
        data = prepare_data(str(path), "bytes", 257, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data.stats["bytes"]["train"] + data.stats["bytes"]["val"] > 0.9 * total
    # the in-memory pipeline held every text (> the corpus) at once
    assert peak < min(total / 2, 4_000_000 + 12 * len(big)), (peak, total, len(big))


def test_parquet_compressed_jsonl_text_field_glob_and_list(tmp_path):
    import gzip

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = random.Random(5)
    texts = [_text(rng, 60) for _ in range(20)]
    pq.write_table(pa.table({"body": texts[:10]}), tmp_path / "p1.parquet")
    with gzip.open(tmp_path / "p2.jsonl.gz", "wt") as f:
        for t in texts[10:]:
            f.write(json.dumps({"body": t}) + "\n")
    for corpus in (str(tmp_path / "p*.*"), f"{tmp_path / 'p1.parquet'},{tmp_path / 'p2.jsonl.gz'}",
                   [str(tmp_path / "p1.parquet"), str(tmp_path / "p2.jsonl.gz")]):
        src = resolve_corpus(corpus)
        assert src.kind == "files"
        assert [d.text for d in iter_documents(src, text_field="body")] == texts
    with pytest.raises(DataError, match=r"p1.parquet has no column 'text'.*data.text_field"):
        prepare_data(str(tmp_path / "p1.parquet"), "bytes", 257, progress=False)
    data = prepare_data(str(tmp_path / "p*"), "bytes", 257, progress=False, text_field="body")
    assert sum(data.stats["docs"].values()) == 20
    with pytest.raises(DataError, match=r"glob .* matches no file"):
        prepare_data(str(tmp_path / "q*.parquet"), "bytes", 257, progress=False)


def test_missing_optional_readers_name_the_extra(tmp_path, monkeypatch):
    import sys

    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    (tmp_path / "x.jsonl.zst").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    for name, lib in (("x.parquet", "pyarrow"), ("x.jsonl.zst", "zstandard")):
        with pytest.raises(DataError, match=rf"{lib}.*pip install 'moe-testbed\[data\]'"):
            prepare_data(str(tmp_path / name), "bytes", 257, progress=False)


def test_corrupt_shards_are_named_or_skipped_and_counted(tmp_path):
    import gzip

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = random.Random(7)
    good = [json.dumps({"text": _text(rng, 50)}) + "\n" for _ in range(30)]
    # invalid JSON on line 3
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text(good[0] + good[1] + "{nope\n" + good[2])
    with pytest.raises(DataError, match=r"a.jsonl line 3 is not valid JSON"):
        prepare_data(str(tmp_path / "j"), "bytes", 257, progress=False)
    d = prepare_data(str(tmp_path / "j"), "bytes", 257, progress=False, on_bad_record="skip")
    assert sum(d.stats["docs"].values()) == 3 and d.stats["bad_records"]["skipped"] == 1
    assert "line 3" in d.stats["bad_records"]["examples"][0]
    # a truncated gzip stream
    blob = gzip.compress("".join(good).encode())
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "b.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "g" / "c.txt").write_text(_text(rng, 50))
    with pytest.raises(DataError, match=r"b.jsonl.gz is corrupt after line \d+"):
        prepare_data(str(tmp_path / "g"), "bytes", 257, progress=False)
    d = prepare_data(str(tmp_path / "g"), "bytes", 257, progress=False, on_bad_record="skip")
    assert d.stats["bad_records"]["skipped"] == 1 and sum(d.stats["docs"].values()) >= 2
    # a truncated parquet file
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": [_text(rng, 50) for _ in range(20)]}), tmp_path / "x.parquet")
    raw = (tmp_path / "x.parquet").read_bytes()
    (tmp_path / "p" / "x.parquet").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "p" / "y.txt").write_text(_text(rng, 50))
    (tmp_path / "p" / "z.txt").write_text(_text(rng, 50))
    with pytest.raises(DataError, match=r"x.parquet is not a readable parquet file"):
        prepare_data(str(tmp_path / "p"), "bytes", 257, progress=False)
    d = prepare_data(str(tmp_path / "p"), "bytes", 257, progress=False, on_bad_record="skip")
    assert d.stats["bad_records"]["skipped"] == 1 and sum(d.stats["docs"].values()) == 2


def test_hugging_face_dataset_directories(tmp_path, monkeypatch):
    """save_to_disk folders (Dataset; DatasetDict -> its train split) and a local Hub dataset
    repository (dataset card + data files, read through datasets.load_dataset's train
    split) prepare exactly as a .jsonl of the same rows; errors name the folder."""
    import sys

    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    rng = random.Random(11)
    texts = [_text(rng, rng.randint(10, 80)) for _ in range(40)]
    held = [_text(rng, 30) for _ in range(7)]  # a test split that must not be read
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ref = prepare_data(str(jsonl), "bytes", 257, progress=False)

    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_dict({"text": held})}) \
        .save_to_disk(str(tmp_path / "dict"))
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nlicense: mit\n---\n# A corpus\n\nNot a document.\n")
    ds.select(range(25)).to_parquet(str(hub / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(25, 40)).to_parquet(str(hub / "data" / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_dict({"text": held}).to_parquet(
        str(hub / "data" / "test-00000-of-00001.parquet"))

    for name, kind in (("disk", "hf_disk"), ("dict", "hf_disk"), ("hub", "hf_dir")):
        assert resolve_corpus(str(tmp_path / name)).kind == kind
        d = prepare_data(str(tmp_path / name), "bytes", 257, progress=False)
        assert d.stats["docs"] == ref.stats["docs"], name
        for s in ("train", "val"):
            assert np.array_equal(d.split(s).tokens(), ref.split(s).tokens()), (name, s)
    # folders whose README is not a dataset card stay plain folders of documents and
    # shards: no card, a card with other front matter, data files without Hub shard names
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "README.md").write_text("# notes\n")
    (plain / "a.txt").write_text(texts[0])
    assert resolve_corpus(str(plain)).kind == "folder"
    notes = tmp_path / "notes"
    (notes / "eval").mkdir(parents=True)
    (notes / "README.md").write_text("---\ntitle: my notes\n---\n# Notes\n")
    (notes / "part-a.jsonl").write_text(json.dumps({"text": texts[1]}) + "\n")
    (notes / "test.jsonl").write_text(json.dumps({"text": texts[2]}) + "\n")
    (notes / "eval" / "b.jsonl").write_text(json.dumps({"text": texts[3]}) + "\n")
    (notes / "package.json").write_text('{"name": "x", "version": "1"}')
    assert resolve_corpus(str(notes)).kind == "folder"
    carded = tmp_path / "carded"
    (carded / "data").mkdir(parents=True)
    (carded / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: "
                                      "data/*.jsonl\n---\n")
    (carded / "data" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                     for t in texts[:5]))
    (carded / "data" / "b.jsonl").write_text(
        json.dumps({"text": texts[5]}) + "\n{broken\n" + json.dumps({"text": texts[6]}) + "\n")
    assert resolve_corpus(str(carded)).kind == "hf_dir"
    # the library's reader stops for good at a bad file (here before yielding a.jsonl's
    # rows: one batch spans both files), so skip would lose the rest: it is an error
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=r"carded is corrupt at row 1 \(ArrowInvalid: JSON "
                                            r"parse.*cannot skip past it.*a glob"):
            prepare_data(str(carded), "bytes", 257, progress=False, on_bad_record=mode)
    # read as shards, skip drops the one bad line
    skipped = prepare_data(str(carded / "data" / "*.jsonl"), "bytes", 257, progress=False,
                           on_bad_record="skip")
    assert skipped.stats["bad_records"]["skipped"] == 1
    assert sum(skipped.stats["docs"].values()) == 7

    with pytest.raises(DataError, match=r"disk has no column 'body'.*columns: \['text', 'n'\]"):
        prepare_data(str(tmp_path / "disk"), "bytes", 257, progress=False, text_field="body")
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(DataError, match=r"DatasetDict without a 'train' split \(splits: "
                                        r"\['validation'\]\)"):
        prepare_data(str(tmp_path / "notrain"), "bytes", 257, progress=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"hub is a Hugging Face dataset directory and the "
                                        r"datasets package is not installed.*\*\*/\*\.parquet"):
        prepare_data(str(hub), "bytes", 257, progress=False, cache_dir=tmp_path / "c2")


def test_folder_caches_of_text_only_corpora_keep_their_key(tmp_path):
    """Reading shards as rows changes what a folder with .jsonl files means: such folders
    get a new cache key; folders of text files keep the key caches were built under."""
    from moe.data.corpus import source_fingerprint

    root = make_folder(tmp_path / "c", n=5)
    before = source_fingerprint(resolve_corpus(str(root)))
    import hashlib

    h = hashlib.sha256(b"folder\n")
    from moe.data.corpus import list_files

    for rel, full in list_files(resolve_corpus(str(root))):
        st = full.stat()
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    assert before == h.hexdigest()


def test_prepare_command_builds_then_finds_the_cache(tmp_path, capsys, monkeypatch):
    from moe.cli import main

    monkeypatch.setattr(prep_mod, "PARALLEL_MIN_CHARS", 0)
    root = make_folder(tmp_path / "c", n=12)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: p\n")
    args = ["prepare", str(cfg), f"data.corpus={root}", "data.tokenizer=bytes",
            "model.vocab_size=300", "data.workers=2", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    data = prepare_data(str(root), "bytes", 300, progress=False)
    assert f"{data.cache_path} (built)" in out
    assert f"train:  {data.stats['docs']['train']:,} documents, {len(data.train):,} tokens" in out
    assert "peak memory" in out and "took" in out
    assert "tokenised by 2 worker processes, the largest peaking at" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(found in the cache)" in out and "worker" not in out
    assert main(["prepare", str(cfg), f"data.corpus={tmp_path / 'nope'}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.corpus path does not exist")


def test_cached_ids_outside_vocab_are_refused_when_opened(tmp_path, monkeypatch):
    """A cache whose .bin holds an id >= vocab_size (corrupt, or written for another
    vocabulary) is a DataError naming the cache when it is opened, not an index error in
    the embedding mid-training; a rewritten .bin is rescanned (max_id.json is a memo, which
    the build writes from what it tokenised: no scan of the fresh files)."""
    root = make_folder(tmp_path / "c", n=6)
    with monkeypatch.context() as m:
        m.setattr(prep_mod, "_file_max", lambda *a, **k: pytest.fail("fresh build rescanned"))
        d = prepare_data(str(root), "bytes", 257, val_fraction=0.2, progress=False)
    (final,) = (tmp_path / "cache" / "data").iterdir()
    memo = json.loads((final / "max_id.json").read_text())["max_id"]
    assert memo == max(int(np.fromfile(final / f"{s}.bin", dtype=d.train.dtype).max())
                       for s in ("train", "val")) <= 256  # written by the build, no rescan
    raw = np.memmap(final / "train.bin", dtype=d.train.dtype, mode="r+")
    raw[3] = 4000  # an id no byte tokenizer writes
    raw.flush()
    del raw
    st = (final / "train.bin").stat()  # a later rewrite: its mtime moves on (not within a tick)
    os.utime(final / "train.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=rf"cached data {final} contains token id 4000, outside "
                                        r"vocab_size=257 .*delete"):
        prepare_data(str(root), "bytes", 257, val_fraction=0.2, progress=False)
