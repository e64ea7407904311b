"""Data pipeline: corpus -> deterministic split -> tokenizer -> Megatron indexed datasets -> batches.

    from moe.data import prepare_data, TokenBatches, eval_batches
    data = prepare_data("stdlib", "bpe", vocab_size=8192)          # cached after the first call
    train = TokenBatches(data.train, batch_size=8, seq_len=256, extra_tokens=1, seed=0,
                         rank=rank, world_size=world_size)
    x = next(train)                                                # int64 (8, 258)
    for xb in eval_batches(data.val, 8, 256, extra_tokens=1, max_batches=20): ...

Corpus rules: :mod:`moe.data.corpus`; cache layout and atomicity: :mod:`moe.data.prepare`;
sample layout and order: :mod:`moe.data.loader`. Heavy imports (megatron-core, tokenizers)
happen on first use, not at ``import moe.data``.
"""

from .corpus import CorpusSource, Document, iter_documents, resolve_corpus, split_keys, stdlib_root
from .errors import DataError
from .indexed import TokenSplit, open_indexed, write_indexed
from .loader import TokenBatches, eval_batches, num_samples
from .prepare import (CorpusSize, PreparedData, config_data, data_fingerprint, prepare_data,
                      resolve_cache_dir, train_token_count)
from .tokenizer import EOS_TOKEN, BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = [
    "DataError", "prepare_data", "PreparedData", "TokenBatches", "eval_batches", "num_samples",
    "TokenSplit", "open_indexed", "write_indexed", "BPETokenizer", "ByteTokenizer",
    "load_tokenizer", "EOS_TOKEN", "resolve_corpus", "iter_documents", "split_keys",
    "stdlib_root", "CorpusSource", "Document", "data_fingerprint", "resolve_cache_dir",
    "CorpusSize", "train_token_count", "config_data",
]
