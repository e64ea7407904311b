"""``moe-testbed`` command line.

    moe-testbed params CONFIG [key=value ...]     parameter / FLOP accounting of a config
    moe-testbed prepare CONFIG [key=value ...]    tokenise the config's corpus into the cache
    moe-testbed train CONFIG [key=value ...]      train (DeepSpeed engine), see moe/train
    moe-testbed plot-run RUN_DIR                  loss curves and per-layer MaxVio PNG
    moe-testbed fit RESULTS [--out DIR]           scaling-law fits + report from a results table
    moe-testbed ladder CONFIG [--dry-run]         run / plan a scaling ladder
    moe-testbed plan FITS --flops C [...]         compute-optimal runs from fitted laws
    moe-testbed consolidate CKPT --out FILE       one state dict from a sharded checkpoint
    moe-testbed generate RUN_DIR --prompt TEXT    text from a run (--speculative mtp: MTP draft)
    moe-testbed export-hf RUN_DIR --out HF_DIR    transformers DeepseekV3 (config, safetensors)
    moe-testbed import-hf HF_DIR --out RUN_DIR    the reverse (config.yaml + model.pt)

Bad configs fail here, before any compute, with one line naming the field.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_params(argv: list[str]) -> int:
    from .accounting import count_params
    from .config import load_config

    p = argparse.ArgumentParser(prog="moe-testbed params", description="Parameter and FLOP accounting.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    c = count_params(cfg)
    print(f"{cfg.name}: seq_len {c.seq_len}")
    for k, v in c.as_dict().items():
        if k == "seq_len":
            continue
        print(f"  {k:22s} {v:>20,.0f}" if isinstance(v, (int, float)) else f"  {k:22s} {v}")
    return 0


def _cmd_prepare(argv: list[str]) -> int:
    """Prepare (or find in the cache) a config's data without training: a cluster job
    preprocesses once before a multi-node launch, whose ranks then load the cache."""
    import resource
    import time

    from .config import load_config
    from .data import DataError, config_data

    p = argparse.ArgumentParser(prog="moe-testbed prepare",
                                description="Tokenise a config's corpus into the cache; train nothing.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. data.corpus=/data/shards")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    t0 = time.perf_counter()
    try:
        data = config_data(cfg, progress=not a.no_progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    st = data.stats
    print(f"data:   {data.cache_path} ({'found in the cache' if st.get('cached') else 'built'})")
    print(f"corpus: {st.get('corpus')}  tokenizer {st.get('tokenizer')}, vocab "
          f"{st.get('vocab_size')}")
    for s in ("train", "val"):
        print(f"{s + ':':7s} {st['docs'][s]:,} documents, {st['tokens'][s]:,} tokens")
    bad = st.get("bad_records") or {}
    if bad.get("skipped"):
        print(f"skipped {bad['skipped']:,} bad record(s) (data.on_bad_record=skip), e.g. "
              f"{bad['examples'][0]}")
    workers = st.get("workers")
    print(f"took {seconds:.1f} s, peak memory {peak_mb:,.0f} MB (max RSS of this process)"
          + (f"; tokenised by {workers} worker processes, the largest peaking at "
             f"{st['peak_rss_mb'].get('tokenize_worker_max', 0):,.0f} MB (pages shared with "
             "this process included)" if workers and workers > 1 and not st.get("cached")
             else ""))
    return 0


COMMANDS = {
    "params": ("_cmd_params", "parameter / FLOP accounting of a config"),
    "prepare": ("_cmd_prepare", "tokenise a config's corpus into the cache (no training)"),
    "train": ("moe.train.cli:train_main", "train a model"),
    "plot-run": ("moe.train.plots:plot_run_main", "plot a run directory"),
    "fit": ("moe.scaling:fit_main", "fit scaling laws to a results table and write a report"),
    "ladder": ("moe.scaling.ladder.command:ladder_main", "run or plan a scaling ladder"),
    "plan": ("moe.scaling.planner.command:plan_main",
             "plan compute-optimal dense/MoE runs at a FLOP budget from a fits.json"),
    "generate": ("moe.generate:generate_main",
                 "generate text from a run (KV cache, MTP speculative decoding)"),
    "export-hf": ("moe.hf:export_main", "write a run as a transformers DeepseekV3 directory"),
    "import-hf": ("moe.hf:import_main", "import a transformers DeepseekV3 directory as a run"),
    "consolidate": ("moe.runs.shards:consolidate_main",
                    "merge a TP/EP-sharded checkpoint into one model state dict"),
}


def _resolve(target: str):
    if ":" not in target:
        return globals()[target]
    import importlib

    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def _strip_local_rank(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` that the ``deepspeed`` launcher puts before the user's
    arguments (it also exports LOCAL_RANK, which is what we read)."""
    return [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: moe-testbed COMMAND [args]\n\ncommands:")
        for name, (_, desc) in COMMANDS.items():
            print(f"  {name:10s} {desc}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        fn = _resolve(COMMANDS[cmd][0])
    except (ImportError, AttributeError) as exc:
        print(f"error: command {cmd!r} is not available in this build ({exc})", file=sys.stderr)
        return 2
    try:
        return int(fn(rest) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
