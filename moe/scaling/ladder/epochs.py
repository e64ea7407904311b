"""Epoch accounting: how many passes over its corpus' training split each run makes,
checked against the ladder's max_epochs before anything trains."""

from __future__ import annotations

from moe.scaling.ladder.design import LadderConfig, Run


def attach_epochs(runs: list[Run], build: bool = False, progress: bool = False) -> list:
    """Set every run's ``train_tokens``/``epochs`` from its corpus' training split.

    Each distinct data key (corpus, tokenizer, vocab, cache, val_fraction, data options)
    is counted once (:func:`moe.data.train_token_count`): ``build=True`` prepares what is
    not cached yet (so the runs then find it) and raises DataError for an unusable corpus;
    ``build=False`` (``--dry-run``) reads a prepared cache or estimates, and leaves
    ``epochs`` None with the reason when the corpus cannot be found. Returns the CorpusSize
    of each corpus.
    """
    from moe.data import train_token_count

    sizes: dict = {}
    for r in runs:
        if r.data_key not in sizes:
            corpus, tok, vocab, cache, vf, options = r.data_key
            sizes[r.data_key] = train_token_count(
                list(corpus) if isinstance(corpus, tuple) else corpus, tok, vocab, cache, vf,
                build=build, progress=progress, **dict(options))
        cs = sizes[r.data_key]
        r.train_tokens = cs.train_tokens
        r.epochs = r.tokens / cs.train_tokens if cs.train_tokens else None
        r.epochs_exact = cs.exact
    return list(sizes.values())


def over_epochs(cfg: LadderConfig, runs: list[Run]) -> list[Run]:
    """Runs whose (known) epochs exceed ``cfg.max_epochs``, most epochs first."""
    over = [r for r in runs if r.epochs is not None and r.epochs > cfg.max_epochs]
    return sorted(over, key=lambda r: -r.epochs)


def epochs_message(cfg: LadderConfig, over: list[Run]) -> str:
    """One line naming the worst run, its epochs and the corpus size."""
    w = over[0]
    more = f"; {len(over) - 1} more run(s) exceed it" if len(over) > 1 else ""
    est = "" if w.epochs_exact else " (corpus size ESTIMATED, not prepared yet)"
    return (f"ladder {cfg.name}: run {w.name} would train {w.epochs:.2f} epochs "
            f"({w.tokens:,} tokens over data.corpus {w.data_key[0]!r} of {w.train_tokens:,} "
            f"training tokens{est}) > max_epochs={cfg.max_epochs:g}{more}; use a larger "
            "corpus, fewer tokens per run, or raise max_epochs")
