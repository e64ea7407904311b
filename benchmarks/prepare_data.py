"""Streaming data preparation at scale: throughput and peak memory of ``prepare_data``.

    python -m benchmarks.prepare_data --mb 256 --huge-doc-mb 50 --vocab 32768

Generates a corpus of ``--mb`` MB of real text (the running Python's stdlib sources,
cycled, each copy made unique by a header line) as shards of ``--shard-mb`` MB cycling
through .jsonl, .jsonl.gz and .parquet (when pyarrow is installed), plus one document of
``--huge-doc-mb`` MB (the case that drove the old in-memory pipeline to 9.25 GB), then
prepares it in a child process with a fresh cache and records: characters/s and tokens/s
over the whole preparation, seconds per stage, and the child's peak RSS (getrusage
ru_maxrss) -- before preparing (imports: torch via megatron-core) and at the end.

``--workers 1,2`` prepares the same corpus once per data.workers value (each in a fresh
cache, so each trains its own BPE; compare the tokenise stage); default 1, the pipeline's
default; ``auto`` is the CPU count. The workers' peak RSS is the largest child's (forked:
pages shared with the parent, e.g. the imports, count in both).

One row per run is appended to benchmarks/results/prepare_data.jsonl; ``--out`` keeps the
corpus.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, append_rows, environment

CHILD = r"""
import json, resource, sys, time
from moe.data import prepare_data
from moe.data.indexed import megatron_indexed
megatron_indexed()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
corpus, vocab, tok, sample = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
workers = None if sys.argv[5] == "auto" else int(sys.argv[5])
t = time.perf_counter()
d = prepare_data(corpus, tok, vocab, progress=False, tokenizer_sample_bytes=sample,
                 workers=workers)
secs = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": secs, "rss_after_imports_mb": rss0, "peak_rss_mb": rss,
                  "stats": d.stats}))
"""


def stdlib_texts():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    while True:
        for p in files:
            try:
                yield p.relative_to(root).as_posix(), p.read_text("utf-8", "replace")
            except OSError:
                continue


def generate(out: Path, mb: float, shard_mb: float, huge_doc_mb: float) -> dict:
    """Write the corpus; returns its file count and sizes."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = pq = None
    formats = [".jsonl", ".jsonl.gz"] + ([".parquet"] if pq else [])
    out.mkdir(parents=True, exist_ok=True)
    src = stdlib_texts()
    target, written, copy, shard = mb * 1e6, 0, 0, 0
    if huge_doc_mb > 0:  # one document: huge_doc_mb of text with no row structure
        parts, n = [], 0
        while n < huge_doc_mb * 1e6:
            _, text = next(src)
            parts.append(text)
            n += len(text)
        (out / "huge_document.txt").write_text("".join(parts))
        written += n
        del parts
    while written < target:
        fmt = formats[shard % len(formats)]
        rows, size = [], 0
        while size < shard_mb * 1e6 and written + size < target:
            name, text = next(src)
            text = f"# copy {copy} of {name}\n{text}"
            copy += 1
            rows.append(text)
            size += len(text)
        path = out / f"shard_{shard:04d}{fmt}"
        if fmt == ".parquet":
            pq.write_table(pa.table({"text": rows}), path, row_group_size=2048)
        else:
            lines = "".join(json.dumps({"text": r}) + "\n" for r in rows)
            if fmt == ".jsonl.gz":
                with gzip.open(path, "wt", compresslevel=3) as f:
                    f.write(lines)
            else:
                path.write_text(lines)
        written += size
        shard += 1
    files = sorted(out.iterdir())
    return {"files": len(files), "chars": written,
            "disk_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
            "formats": formats}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=256, help="corpus size in MB of text")
    p.add_argument("--shard-mb", type=float, default=48)
    p.add_argument("--huge-doc-mb", type=float, default=50)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "bytes"])
    p.add_argument("--sample-mb", type=float, default=500,
                   help="data.tokenizer_sample_bytes in MB (default: the pipeline default)")
    p.add_argument("--workers", default="1",
                   help="comma-separated data.workers values, 'auto' = the CPU count")
    p.add_argument("--out", help="keep the generated corpus here (default: a temp dir)")
    p.add_argument("--corpus", help="prepare this existing corpus (e.g. 'stdlib', the embedded "
                                    "one) instead of generating one")
    p.add_argument("--note", default="")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    corpus = Path(a.out) if a.out else tmp / "corpus"
    try:
        if a.corpus:
            from moe.data.corpus import corpus_files, iter_documents, resolve_corpus
            from moe.data.prepare import corpus_bytes

            source = resolve_corpus(a.corpus)
            corpus = a.corpus
            info = {"files": len(corpus_files(source)), "formats": [a.corpus],
                    "chars": sum(len(d.text) for d in iter_documents(source)),
                    "disk_mb": round(corpus_bytes(source) / 1e6, 1)}
            a.huge_doc_mb = 0.0
        else:
            t = time.perf_counter()
            info = generate(corpus, a.mb, a.shard_mb, a.huge_doc_mb)
            gen_s = time.perf_counter() - t
            print(f"generated {info['chars'] / 1e6:,.0f} M chars in {info['files']} files "
                  f"({info['disk_mb']:,} MB on disk) in {gen_s:.0f} s", flush=True)
        for workers in a.workers.split(","):
            cache = tmp / f"cache-{workers}"
            env = {**os.environ, "MOE_TESTBED_CACHE": str(cache),
                   "PYTHONPATH": str(ROOT)}
            res = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(a.vocab),
                                  a.tokenizer, str(int(a.sample_mb * 1e6)), workers],
                                 env=env, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return res.returncode
            shutil.rmtree(cache, ignore_errors=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            st = r["stats"]
            tokens = st["tokens"]["train"] + st["tokens"]["val"]
            row = {"bench": "prepare_data", "corpus_chars": info["chars"],
                   "corpus_disk_mb": info["disk_mb"], "files": info["files"],
                   "formats": info["formats"], "huge_doc_mb": a.huge_doc_mb,
                   "tokenizer": a.tokenizer, "vocab": a.vocab,
                   "workers_requested": workers, "workers": st.get("workers"),
                   "parts": st.get("parts"),
                   "tokenizer_sample_chars": st.get("tokenizer_sample_chars"),
                   "docs": st["docs"], "tokens": st["tokens"],
                   "seconds": round(r["seconds"], 1),
                   "stage_seconds": {k: round(v, 1) for k, v in st["seconds"].items()},
                   "chars_per_s": round(info["chars"] / r["seconds"]),
                   "tokens_per_s": round(tokens / r["seconds"]),
                   "tokenize_chars_per_s": round(info["chars"] / st["seconds"]["tokenize"]),
                   "rss_after_imports_mb": round(r["rss_after_imports_mb"]),
                   "peak_rss_mb_by_stage": st.get("peak_rss_mb"),
                   "peak_rss_mb": round(r["peak_rss_mb"]), "note": a.note, **environment()}
            path = append_rows("prepare_data.jsonl", [row])
            print(json.dumps(row, indent=1))
            print(f"appended to {path}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
