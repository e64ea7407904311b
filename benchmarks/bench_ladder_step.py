"""Where a CPU ladder step's time goes, per size, sparsity and precision.

    python -m benchmarks.bench_ladder_step [--config configs/ladder/cpu.yaml]
        [--runs s1-dense s1-moe8 s7-dense s7-moe8 s7-moe32 s9-dense s9-moe32]
        [--precision fp32 bf16] [--threads 1] [--steps 40] [--profile]

Each (run, precision) is measured in a process of its own (a fresh torch.distributed
group and DeepSpeed engine, as a ladder run gets), built by the trainer exactly as
`moe-testbed ladder` builds that run (its overrides; ``train.precision`` replaced), then
10 warm-up steps and ``--steps`` timed optimizer steps of :meth:`Trainer.train_step`.
The step is split by timing the engine's calls: forward (model + loss), backward, and
the rest (gradient clipping, expert-bias update, ``engine.step`` = optimizer + scheduler,
loss bookkeeping). ``--threads`` is the torch thread count of a run (the ladder's
``--jobs 2`` gives each run 1 thread on the 2-core box). Rows ->
benchmarks/results/ladder_step_cpu.jsonl, each with the step's model FLOPs, FLOP/s and
the fraction of the fp32 matmul peak measured at the same thread count in the same
process. ``--profile`` adds the top ops by self CPU time (torch profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import ROOT, append_rows, environment

DEFAULT_RUNS = ["s1-dense", "s1-moe8", "s7-dense", "s7-moe8", "s7-moe32", "s9-dense", "s9-moe32"]


def _timed(fn, acc: list):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        acc.append(time.perf_counter() - t0)
        return out
    return wrapper


def measure_one(config: str, run: str, precision: str, steps: int, profile: bool) -> dict:
    """Build ``run`` of the ladder ``config`` in this process and time its steps."""
    import torch
    from tqdm import tqdm

    from moe.config import load_config
    from moe.scaling.ladder.design import load_ladder, plan
    from moe.train.loop import Trainer
    from moe.train.metrics import measure_matmul_peak

    lcfg, base = load_ladder(config)
    r = next((x for x in plan(lcfg, base) if x.name == run), None)
    if r is None:
        raise SystemExit(f"--runs: no run {run!r} in {config}")
    over = [o for o in r.overrides if not o.startswith("train.precision=")]
    cfg = load_config(str(base), over + [f"train.precision={precision}", "train.peak_flops=1",
                                         f"train.max_steps={steps + 30}",
                                         "train.token_budget=null"])
    tr = Trainer(cfg, progress=False)
    tr.setup()
    tr.claim_run_dir(tempfile.mkdtemp(prefix="ladder-step-"), False)
    tr.find_resume_point(False)
    tr.build()
    tr.module.train()
    tr.bar = tqdm(disable=True)
    eng = tr.engine
    fwd, bwd = [], []
    eng.forward = _timed(eng.forward, fwd)
    eng.backward = _timed(eng.backward, bwd)
    for _ in range(10):
        tr.train_step()
    fwd.clear()
    bwd.clear()
    total = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tr.train_step()
        total.append(time.perf_counter() - t0)
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    step_ms, fwd_ms, bwd_ms = ms(total), ms(fwd), ms(bwd)
    peak = measure_matmul_peak("cpu", torch.float32)
    flops = tr.fpt * tr.tokens_per_step
    row = {"bench": "ladder_step", "config": config, "run": run, "precision": precision,
           "d_model": cfg.model.d_model, "n_routed": cfg.moe.n_routed,
           "top_k": cfg.moe.top_k if cfg.moe.n_routed else 0,
           "tokens_per_step": tr.tokens_per_step, "threads": torch.get_num_threads(),
           "steps_timed": steps, "step_ms": step_ms, "forward_ms": fwd_ms,
           "backward_ms": bwd_ms, "rest_ms": step_ms - fwd_ms - bwd_ms,
           "p20_step_ms": statistics.quantiles(total, n=5)[0] * 1e3,
           "p80_step_ms": statistics.quantiles(total, n=5)[3] * 1e3,
           "model_flops_per_step": flops, "flops_per_s": flops / (step_ms / 1e3),
           "fp32_matmul_peak": peak, "fraction_of_fp32_peak": flops / (step_ms / 1e3) / peak}
    if profile:
        with torch.profiler.profile() as prof:
            for _ in range(10):
                tr.train_step()
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        row["top_ops_ms_per_step"] = {e.key: round(e.self_cpu_time_total / 1e3 / 10, 3)
                                      for e in ops[:10]}
    tr.close()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/ladder/cpu.yaml")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default="ladder_step_cpu.jsonl")
    p.add_argument("--one", nargs=2, metavar=("RUN", "PRECISION"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(measure_one(a.config, a.one[0], a.one[1], a.steps, a.profile)))
        return
    env = environment()
    rows = []
    for run in a.runs:
        for prec in a.precision:
            cmd = [sys.executable, "-m", "benchmarks.bench_ladder_step", "--config", a.config,
                   "--threads", str(a.threads), "--steps", str(a.steps), "--one", run, prec]
            if a.profile:
                cmd.append("--profile")
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
            if res.returncode != 0:
                raise SystemExit(f"{run} {prec}: exit {res.returncode}\n{res.stderr[-3000:]}")
            row = {**env, **json.loads(res.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{run:10s} {prec}: {row['step_ms']:6.1f} ms/step (fwd {row['forward_ms']:.1f}, "
                  f"bwd {row['backward_ms']:.1f}, rest {row['rest_ms']:.1f})  "
                  f"{row['flops_per_s']:.3g} FLOP/s = {row['fraction_of_fp32_peak']:.3f} of the "
                  f"{a.threads}-thread fp32 peak", flush=True)
    path = append_rows(a.out, rows)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
