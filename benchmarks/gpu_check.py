"""python -m benchmarks.gpu_check [--out DIR] [--wheels DIR] [--smoke] [--only STAGE ...]

One prepared command for a short GPU window (one H100/H200, <= ~8 minutes): validates
and measures the Triton kernels and bf16 training, writing at most 8 files to one folder
($OUT when set, else --out), stage by stage, so a later failure or timeout loses nothing
already measured:

    file              stage  what
    stages.jsonl      all    one row per stage: name, status (ok|failed|timeout), seconds
    env.json          a      the environment record (benchmarks/common.py), GPU clocks
                             (nvidia-smi), which carried wheels import, `import kernels`
    pytest_gpu.txt    b      `pytest -m gpu` over the kernel tests (tail of the output)
    correctness.json  b      grouped MLP forward, dx, dW13, dW2 and the whole routed layer
                             at the Qwen3-30B-A3B expert shape (D 2048, F 768, 128 experts,
                             top-8, T 32768), bf16, balanced and skewed routing: relative
                             error of the Triton kernels and of torch._grouped_mm, each
                             against an fp32 reference
    kernels.jsonl/.csv c     benchmarks.kernels.bench_kernels at that shape: grouped MLP
                             fwd/bwd/fwd+bwd TFLOP/s on active FLOPs, route/permute/unpermute
                             times, torch._grouped_mm and torch baselines, fused gather on
                             and off, the dense bf16 matmul of the same run
    train.json        d      `moe-testbed train configs/gpu-base.yaml` for a fixed number of
                             steps in bf16 with moe.kernels=triton and =torch (tokens/s, MFU
                             against the measured matmul peak), and the README main job's
                             model on the GPU (final eval loss)
    log.txt           all    each stage's command and the tail of its output

Each stage runs in its own process with its own time limit. --wheels DIR: wheels to
install first (deepspeed, megatron-core, pydantic, ... that the GPU image lacks; build
them with benchmarks/build_gpu_wheels.sh), with pip --no-index --no-deps --target into a
temporary site directory put on PYTHONPATH for every stage. --smoke: the same stages on
CPU at tiny shapes (Triton interpreter, fp32, a few training steps), so the GPU window is
never spent on an import error; tests/test_gpu_check.py runs it.

Run it from the repository root as a module (``benchmarks`` is a package; the root's
``kernels`` and ``moe`` are imported from the working tree). On the device
(benchmarks/gpu_wheels built here first, carried as an ignored path):
    python3 -m benchmarks.gpu_check --wheels benchmarks/gpu_wheels      (timeout ~540 s)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, environment

STAGES = ("env", "pytest", "correctness", "kernels", "train")
# seconds per stage on the GPU (sum ~8 min) and in --smoke mode on a 2-core CPU
LIMITS = {"env": 30, "pytest": 90, "correctness": 60, "kernels": 150, "train": 150}
SMOKE_LIMITS = {"env": 60, "pytest": 300, "correctness": 120, "kernels": 300, "train": 400}
TRAIN_STEPS = 60  # gpu-base steps per kernel backend


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


# ------------------------------------------------------------------------------ stages
def stage_env(out: Path, smoke: bool) -> None:
    import torch

    info = {**environment(), "cuda_available": torch.cuda.is_available(), "smoke": smoke,
            "TRITON_CACHE_AUTOTUNING": os.environ.get("TRITON_CACHE_AUTOTUNING")}
    from importlib import metadata

    # triton, the carried wheels (--wheels) and what they need from the image: importable,
    # and which distribution version (typing_extensions has no __version__)
    for mod, dist in (("triton", "triton"), ("deepspeed", "deepspeed"),
                      ("megatron.core", "megatron-core"),
                      ("pydantic", "pydantic"), ("hjson", "hjson"),
                      ("typing_extensions", "typing-extensions")):
        try:
            __import__(mod, fromlist=["_"])
            info[mod] = metadata.version(dist)
        except ImportError as e:
            info[mod] = f"not importable: {e}"
        except metadata.PackageNotFoundError:
            info[mod] = "importable (no distribution metadata)"
    import kernels

    info["kernels_available"] = bool(kernels.available())
    if shutil.which("nvidia-smi"):
        q = ("name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,"
             "temperature.gpu,persistence_mode")
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    (out / "env.json").write_text(json.dumps(info, indent=1) + "\n")


def _rel(a, ref) -> float:
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def stage_correctness(out: Path, smoke: bool) -> None:
    """Triton and torch._grouped_mm against an fp32 reference at the Qwen3 expert shape."""
    import torch

    import kernels
    from benchmarks.kernels.bench_kernels import SHAPES, SMOKE_SHAPE, grouped_mm_mlp, make_logits

    s = SMOKE_SHAPE["smoke"] if smoke else SHAPES["qwen3-30b-a3b"]
    T = 64 if smoke else 32768
    dev, dt = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    D, Fh, E, K = s["D"], s["F"], s["E"], s["K"]
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, D, 2 * Fh, generator=gen) * D ** -0.5).to(dev, dt)
    w2 = (torch.randn(E, Fh, D, generator=gen) * Fh ** -0.5).to(dev, dt)
    rows = []
    for routing in ("balanced", "skewed"):
        logits = make_logits(T, E, routing == "skewed", dev, gen)
        x = (torch.randn(T, D, generator=gen) * 0.5).to(dev, dt)
        rkw = dict(top_k=K, score_fn=s["score_fn"])
        w_TK, idx_TK, counts = kernels.route(logits, **rkw)
        xm, _, offs = kernels.permute(x, idx_TK, E)
        gy = torch.randn(xm.shape[0], D, generator=gen).to(dev, dt)

        def run(fn, dtype):
            xa = xm.detach().to(dtype).requires_grad_(True)
            a13 = w13.detach().to(dtype).requires_grad_(True)
            a2 = w2.detach().to(dtype).requires_grad_(True)
            y = fn(xa, offs, a13, a2)
            y.backward(gy.to(dtype))
            return {"y": y.detach(), "dx": xa.grad, "dW13": a13.grad, "dW2": a2.grad}

        ref = run(kernels.grouped_swiglu_mlp_ref, torch.float32)
        got = {"triton": run(kernels.grouped_swiglu_mlp, dt),
               "grouped_mm": run(grouped_mm_mlp, dt)}
        row = {"routing": routing, "T": T, "D": D, "F": Fh, "E": E, "top_k": K,
               "dtype": str(dt).replace("torch.", ""),
               "max_over_mean_load": float(counts.float().max() / counts.float().mean())}
        for impl, g in got.items():
            row[impl] = {k: _rel(g[k], ref[k]) for k in ref}
        # the whole routed layer (route, permute, MLP, combine), output only
        lay, _ = kernels.moe_layer_triton(x, logits, w13, w2, **rkw)
        lref, _ = kernels.moe_layer_ref(x.float(), logits, w13.float(), w2.float(), **rkw)
        row["layer_triton_out"] = _rel(lay, lref)
        # pass: the Triton kernels' error within 2x torch._grouped_mm's at the same dtype
        # (bf16 rounding sets both; the fp32 smoke run compares at fp32 rounding)
        row["ok"] = all(row["triton"][k] <= max(2 * row["grouped_mm"][k], 1e-5)
                        for k in row["triton"])
        rows.append(row)
        del ref, got
    (out / "correctness.json").write_text(json.dumps(rows, indent=1) + "\n")
    if not all(r["ok"] for r in rows):
        raise SystemExit("correctness: Triton error above 2x torch._grouped_mm's (see file)")


def _pytest_cmd(smoke: bool) -> list[str]:
    tests = ["tests/test_kernels_routing.py", "tests/test_kernels_permute.py",
             "tests/test_kernels_grouped_mlp.py"]
    # smoke: the gpu-marked tests are skipped without CUDA, so run the CPU ones of one file
    return ([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernels_permute.py"]
            if smoke else [sys.executable, "-m", "pytest", "-q", "-m", "gpu", *tests])


def _kernels_cmd(out: Path, smoke: bool) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.kernels.bench_kernels",
           "--out", str(out / "kernels.jsonl")]
    return cmd + (["--cpu-smoke"] if smoke else
                  ["--shapes", "qwen3-30b-a3b", "--tokens", "32768", "--no-expert-loop"])


def stage_train(out: Path, smoke: bool) -> None:
    """gpu-base with each kernel backend, then the README main job's model."""
    work = Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    if smoke:
        common = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2",
                  "model.n_heads=2", "model.ffn_dim=64", "moe.n_routed=4", "moe.top_k=2",
                  "moe.expert_ffn_dim=16", "data.tokenizer=bytes", "train.seq_len=32",
                  "train.micro_batch_size=2", "train.precision=fp32", "train.max_steps=2",
                  "train.eval_every=2", "train.eval_batches=1", "train.ckpt_every=2"]
        runs = [("gpu-base", "configs/gpu-base.yaml", common + ["moe.kernels=torch"]),
                ("tiny-moe", "configs/tiny-moe.yaml", common)]
    else:
        steps = [f"train.max_steps={TRAIN_STEPS}", "train.eval_every=1000000",
                 "train.eval_at_start=false", f"train.ckpt_every={10 * TRAIN_STEPS}"]
        runs = [("gpu-base triton", "configs/gpu-base.yaml", steps + ["moe.kernels=triton"]),
                ("gpu-base torch", "configs/gpu-base.yaml", steps + ["moe.kernels=torch"]),
                ("tiny-moe (README main job)", "configs/tiny-moe.yaml", [])]
    keys = ("status", "precision", "steps", "tokens", "tokens_per_s", "mfu", "peak_flops",
            "peak_flops_source", "final_eval_loss", "wall_time_s", "train_time_s",
            "total_params", "active_params", "flops_per_token_train")
    results = []
    for i, (name, cfg, ov) in enumerate(runs):
        rd = work / f"run{i}"
        cmd = [sys.executable, "-m", "moe.cli", "train", cfg, *ov, "--out", str(rd),
               "--no-progress"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        row = {"name": name, "command": " ".join(cmd[2:]), "exit_code": r.returncode}
        summ = rd / "summary.json"
        if summ.exists():
            s = json.loads(summ.read_text())
            row.update({k: s.get(k) for k in keys})
        else:
            row["error"] = _tail(r.stdout + r.stderr, 1500)
        results.append(row)
        # written after every run: a timeout in the next one keeps this one
        (out / "train.json").write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    if any(r["exit_code"] != 0 for r in results):
        raise SystemExit("train: a run failed (see train.json)")


IN_PROCESS = {"env": stage_env, "correctness": stage_correctness, "train": stage_train}


# ------------------------------------------------------------------------------ driver
def install_wheels(wheels: Path) -> str:
    """pip install every wheel in ``wheels`` into a temporary site dir; returns it."""
    site = tempfile.mkdtemp(prefix="gpu_check_site_")
    whl = sorted(str(p) for p in wheels.glob("*.whl"))
    if not whl:
        raise SystemExit(f"--wheels {wheels}: no .whl files there")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                        "--no-deps", "--target", site, *whl], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"--wheels {wheels}: pip could not install them on Python "
                         f"{sys.version.split()[0]} (the cp312 wheels are for the GPU "
                         f"image's 3.12): {_tail(r.stderr, 400).strip()}")
    return site


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check")
    p.add_argument("--wheels", help="folder of wheels to install first (see module doc)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (a dry run)")
    p.add_argument("--only", nargs="*", choices=STAGES, help="run these stages only")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # child process
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.stage:  # one in-process stage, in a child of the driver below
        IN_PROCESS[a.stage](out, a.smoke)
        return 0

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if a.smoke:
        env["TRITON_INTERPRET"] = "1"
    elif not __import__("torch").cuda.is_available():
        print("error: no CUDA device; run with --smoke to check the script on CPU",
              file=sys.stderr)
        return 2
    # stages are separate processes: keep each autotuned kernel's chosen tile on disk so the
    # benchmark and training reuse what the correctness stage tuned at the same key (M, N,
    # K, epilogue, gather) instead of timing every candidate again (compiles are cached
    # on disk anyway)
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    if a.wheels:
        site = install_wheels(Path(a.wheels))
        env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
    limits = SMOKE_LIMITS if a.smoke else LIMITS
    smoke = ["--smoke"] if a.smoke else []
    cmds = {name: [sys.executable, "-m", "benchmarks.gpu_check", "--stage", name, "--out",
                   str(out), *smoke]
            for name in IN_PROCESS}
    cmds["pytest"] = _pytest_cmd(a.smoke)
    cmds["kernels"] = _kernels_cmd(out, a.smoke)
    failed = 0
    with open(out / "log.txt", "a") as log, open(out / "stages.jsonl", "a") as st:
        for name in a.only or STAGES:
            t0 = time.perf_counter()
            try:
                r = subprocess.run(cmds[name], cwd=ROOT, env=env, capture_output=True,
                                   text=True, timeout=limits[name])
                status, text = ("ok" if r.returncode == 0 else "failed"), r.stdout + r.stderr
            except subprocess.TimeoutExpired as e:
                status = "timeout"
                got = e.stdout or b""
                text = (got.decode(errors="replace") if isinstance(got, bytes) else got) \
                    + f"\n[timed out after {limits[name]} s]"
            secs = round(time.perf_counter() - t0, 1)
            if name == "pytest":
                (out / "pytest_gpu.txt").write_text(_tail(text) + "\n")
            log.write(f"=== {name}: {status} in {secs} s\n$ {' '.join(cmds[name])}\n"
                      f"{_tail(text)}\n")
            st.write(json.dumps({"stage": name, "status": status, "seconds": secs}) + "\n")
            log.flush(), st.flush()
            print(f"{name}: {status} ({secs} s)", flush=True)
            failed += status != "ok"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
