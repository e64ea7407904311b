"""Weak scaling of data-parallel training on this machine: 1, 2, 4 processes (torchrun,
gloo) at a fixed per-process micro-batch, tokens/s from each run's summary.json.

    python benchmarks/bench_dp_scaling.py [--procs 1 2 4] [--steps 40]

Each process gets torch threads = cores / processes (so the comparison is at equal
hardware). Expert parallelism is not wired into the trainer yet, so only pure data
parallel is measured; rows -> benchmarks/results/dp_scaling_cpu.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import append_rows, environment  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", nargs="*", type=int, default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny-moe.yaml"))
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    rows = []
    for n in a.procs:
        out = Path(tempfile.mkdtemp(prefix=f"dp{n}-"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(n), "-m", "moe.cli", "train", a.config, f"train.max_steps={a.steps}",
               "train.eval_every=100000", "train.ckpt_every=100000", "train.eval_batches=1",
               "--out", str(out), "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{n} procs failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        s = json.loads((out / "summary.json").read_text())
        rows.append({**environment(), "bench": "dp_weak_scaling", "procs": n,
                     "threads_per_proc": max(1, cores // n), "config": os.path.relpath(a.config, REPO),
                     "micro_batch_per_proc": s.get("params") and None, "steps": s["steps"],
                     "tokens": s["tokens"], "train_time_s": s["train_time_s"],
                     "tokens_per_s": s["tokens_per_s"]})
        print(f"{n} procs: {s['tokens_per_s']:.0f} tokens/s ({s['tokens']} tokens, {s['train_time_s']:.1f} s)")
    base = next((r["tokens_per_s"] for r in rows if r["procs"] == 1), None)
    for r in rows:
        r["speedup_vs_1"] = r["tokens_per_s"] / base if base else None
        r.pop("micro_batch_per_proc")
    print(f"rows appended to {append_rows('dp_scaling_cpu.jsonl', rows)}")


if __name__ == "__main__":
    main()
