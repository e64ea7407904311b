"""The ladder command's wall time with the local executor's --jobs settings, each from a
fresh clone of HEAD (its own temporary corpus cache: data preparation, the DeepSpeed op
build, training, fits and report are all inside the time), measured one after another
in one invocation.

    python -m benchmarks.bench_ladder_jobs [--config configs/ladder/cpu.yaml] [--jobs 1 2]

Per setting one row: wall time, the runs' total training FLOPs (results.csv) over the wall
time, the fp32 matmul peak the trainer measured on this machine (summary.json
peak_flops), the fraction of it, and every run's final eval loss (so the settings can be
checked for identical results). Rows -> benchmarks/results/ladder_jobs.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, append_rows, environment


def _clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    return dest


def measure(config: str, jobs: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"ladder-jobs{jobs}-"))
    repo = _clone(tmp / "repo")
    out = tmp / "out"
    env = {**os.environ, "PYTHONPATH": str(repo), "MOE_TESTBED_CACHE": str(tmp / "cache")}
    cmd = [sys.executable, "-m", "moe.cli", "ladder", config, "--out", str(out),
           "--jobs", str(jobs), "--no-progress"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"jobs {jobs}: exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    rows = list(csv.DictReader(open(out / "results.csv")))
    done = [x for x in rows if x["status"] == "done"]
    flops = sum(float(x["flops"]) for x in done)
    peaks = [json.loads((out / "runs" / x["name"] / "summary.json").read_text()).get("peak_flops")
             for x in done]
    peak = statistics.median([p for p in peaks if p])
    return {"bench": "ladder_jobs", "config": config, "jobs": jobs, "wall_s": round(wall, 1),
            "runs": len(rows), "runs_done": len(done), "train_flops": flops,
            "flops_per_s": flops / wall, "matmul_peak_flops": peak,
            "fraction_of_peak": flops / wall / peak,
            "train_time_s": sum(float(x["wall_time_s"] or 0) for x in done),
            "final_eval_loss": {x["name"]: float(x["final_eval_loss"]) for x in done}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/ladder/cpu.yaml")
    p.add_argument("--jobs", nargs="*", type=int, default=[1, 2])
    a = p.parse_args(argv)
    env = environment()
    rows = []
    for jobs in a.jobs:
        row = {**env, **measure(a.config, jobs)}
        print(json.dumps({k: v for k, v in row.items() if k != "final_eval_loss"}), flush=True)
        rows.append(row)
    if len(rows) > 1:
        same = all(r["final_eval_loss"] == rows[0]["final_eval_loss"] for r in rows)
        for r in rows:
            r["losses_equal_across_jobs"] = same
        print(f"final eval losses identical across --jobs {a.jobs}: {same}")
    print(append_rows("ladder_jobs.jsonl", rows))


if __name__ == "__main__":
    main()
