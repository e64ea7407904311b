"""Weak scaling of `moe-testbed train` on this machine: 1, 2, 4 processes (torchrun, gloo)
at a fixed per-process micro-batch, pure data parallel (every rank holds all experts)
against expert parallel (parallel.ep = processes: experts sharded, tokens exchanged by
all-to-all), both measured in the same invocation. Tokens/s from each run's summary.json.

    python -m benchmarks.bench_weak_scaling [--procs 1 2 4] [--modes dp ep] [--steps 40]

Each process gets torch threads = cores / processes (equal hardware for every row).
One process is the same run in both modes (ep=1), measured once.
Rows -> benchmarks/results/weak_scaling_cpu.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import ROOT, append_rows, environment


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", nargs="*", type=int, default=[1, 2, 4])
    p.add_argument("--modes", nargs="*", choices=["dp", "ep"], default=["dp", "ep"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny-moe.yaml"))
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    rows = []
    runs = [(n, m) for n in a.procs for m in a.modes if not (n == 1 and m == "ep" and "dp" in a.modes)]
    for n, mode in runs:
        ep = n if mode == "ep" else 1
        out = Path(tempfile.mkdtemp(prefix=f"{mode}{n}-"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(n), "-m", "moe.cli", "train", a.config, f"train.max_steps={a.steps}",
               "train.eval_every=100000", "train.ckpt_every=100000", "train.eval_batches=1",
               f"parallel.ep={ep}", "--out", str(out), "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{mode} x{n} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        s = json.loads((out / "summary.json").read_text())
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        rows.append({**environment(), "bench": "weak_scaling", "mode": "dp" if ep == 1 else "ep",
                     "procs": n, "ep": ep, "threads_per_proc": max(1, cores // n),
                     "config": os.path.relpath(a.config, ROOT),
                     "micro_batch_per_proc": cfg["train"]["micro_batch_size"],
                     "seq_len": cfg["train"]["seq_len"], "n_routed": cfg["moe"]["n_routed"],
                     "steps": s["steps"], "tokens": s["tokens"],
                     "train_time_s": s["train_time_s"], "tokens_per_s": s["tokens_per_s"],
                     "final_eval_loss": s["final_eval_loss"],
                     "cpu_malloc": s.get("cpu_malloc")})
        print(f"{mode} x{n} (ep={ep}): {s['tokens_per_s']:.0f} tokens/s "
              f"({s['tokens']} tokens, {s['train_time_s']:.1f} s), eval loss {s['final_eval_loss']:.4f}")
    base = next((r["tokens_per_s"] for r in rows if r["procs"] == 1), None)
    for r in rows:
        r["speedup_vs_1"] = r["tokens_per_s"] / base if base else None
    print(f"rows appended to {append_rows('weak_scaling_cpu.jsonl', rows)}")


if __name__ == "__main__":
    main()
