"""Stand-in for `moe-testbed train` used ONLY by the ladder runner's tests (kill and rerun,
--jobs, --status): it mimics the run-directory contract (checkpoints/latest,
summary.json) in milliseconds, and records when it started and ended.

    python tests/stub_trainer.py BASE [overrides...] --out RUN_DIR [--resume] [--no-progress]
"""

import json
import os
import sys
import time
from pathlib import Path

started = time.time()
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
resume = "--resume" in args
name = next(a.split("=", 1)[1] for a in args if a.startswith("name="))
steps, ckpt_at = 10, 5
delay = float(os.environ.get("STUB_DELAY", "0.05"))
log = out.parent.parent / "calls.log"
with open(log, "a") as f:
    f.write(f"start {name} resume={resume}\n")
if name in os.environ.get("STUB_FAIL", "").split(","):
    print("stub: simulated failure: loss is nan at step 3", file=sys.stderr)
    sys.exit(3)
start = 0
ck = out / "checkpoints"
if resume:
    start = int((ck / (ck / "latest").read_text().strip() / "step").read_text())
for step in range(start, steps):
    time.sleep(delay)
    with open(out / "steps.log", "a") as f:
        f.write(f"{step}\n")
    if step + 1 == ckpt_at:
        d = ck / f"step{ckpt_at}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "step").write_text(str(ckpt_at))
        (ck / "latest").write_text(d.name)
size = {"xs": 1e4, "s": 1e5, "m": 1e6}.get(name.split("-")[0], 1e5)
d_model = int(next((a.split("=", 1)[1] for a in args if a.startswith("model.d_model=")), 0))
# the loss also depends on d_model, so a result can be traced to the config that made it
summary = {"status": "done", "final_eval_loss": 2.0 + 10 * size ** -0.3 + d_model * 1e-4,
           "tokens": 1000, "d_model": d_model,
           "total_flops": 6 * size * 1000, "maxvio_global": [0.1, 0.2], "tokens_per_s": 1e4,
           "wall_time_s": 1.0, "started": started, "ended": time.time()}
tmp = out / "summary.json.tmp"
tmp.write_text(json.dumps(summary))
os.replace(tmp, out / "summary.json")
with open(log, "a") as f:
    f.write(f"finish {name}\n")
