"""Kernel microbenchmarks: routing, permute/unpermute, grouped SwiGLU MLP (fwd, bwd, full)
and the routed MoE layer, against baselines measured in the same run.

    python benchmarks/kernels/bench_kernels.py                      # CUDA: all shapes
    python benchmarks/kernels/bench_kernels.py --shapes qwen3 --tokens 32768
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_kernels.py --cpu-smoke   # proves the script runs

Shapes (one GPU's share of the expert layer): DeepSeek-V3 (D 7168, F 2048, 32 local
experts of 256, top-8), Qwen3-30B-A3B (2048, 768, 128, 8), OLMoE (2048, 1024, 64, 8),
Mixtral (4096, 14336, 8, 2); T in {4096, 16384, 32768}; balanced (uniform random) and
skewed (Zipf-like) routing. Baselines: the torch reference (*_ref), torch._grouped_mm,
a per-expert loop of dense matmuls, and a dense matmul of the same FLOPs (the roofline
figure). Timing: triton.testing.do_bench (median, p20, p80; L2 flushed). Figures: TFLOP/s
on ACTIVE FLOPs for GEMMs, GB/s for routing/permute, % of the dense-matmul TFLOP/s of the
same run. Rows: benchmarks/results/kernels_<device>.jsonl (smoke rows go to /tmp).
Needs only torch and triton.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "deepseek-v3": dict(D=7168, F=2048, E=32, K=8),
    "qwen3": dict(D=2048, F=768, E=128, K=8),
    "olmoe": dict(D=2048, F=1024, E=64, K=8),
    "mixtral": dict(D=4096, F=14336, E=8, K=2),
}


def env() -> dict:
    import triton

    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        commit = "unknown"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor()})"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def timer(smoke: bool):
    if smoke:
        def bench(fn):
            fn()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            ts.sort()
            return ts[1], ts[0], ts[2]
        return bench
    import triton.testing

    def bench(fn):
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    return bench


def make_routing(T, E, K, skewed, device, gen):
    if skewed:  # Zipf-like expert popularity: expert i drawn with weight 1/(i+1)
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
        idx = torch.multinomial(p.expand(T, E).float(), K, replacement=False, generator=gen)
    else:
        idx = torch.rand(T, E, generator=gen).argsort(-1)[:, :K]
    return idx.to(device)


def torch_grouped(x_MD, offs, w13, w2):
    Fh = w2.shape[1]
    h = torch._grouped_mm(x_MD, w13, offs=offs)
    return torch._grouped_mm(F.silu(h[:, :Fh]) * h[:, Fh:], w2, offs=offs)


def main(argv=None):
    p = argparse.ArgumentParser(description="Triton MoE kernel microbenchmarks")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="*", type=int, default=[4096, 16384, 32768])
    p.add_argument("--cpu-smoke", action="store_true", help="one tiny shape on CPU (interpreter)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    if not torch.cuda.is_available() and not smoke:
        print("error: no CUDA device: these are GPU benchmarks (use --cpu-smoke with "
              "TRITON_INTERPRET=1 to check the script on CPU)", file=sys.stderr)
        return 2
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import kernels

    device = "cuda" if not smoke else "cpu"
    dtype = torch.bfloat16 if not smoke else torch.float32
    shapes = {"smoke": dict(D=32, F=16, E=4, K=2)} if smoke else {k: SHAPES[k] for k in a.shapes}
    tokens = [64] if smoke else a.tokens
    bench = timer(smoke)
    info = env()
    out = Path(a.out) if a.out else (Path("/tmp/kernels_smoke.jsonl") if smoke else
                                     ROOT / "benchmarks" / "results" /
                                     f"kernels_{info['device'].replace(' ', '_')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    rows = []

    def row(shape, T, routing, op, impl, ms, flops=None, nbytes=None, dense_tflops=None):
        r = {**info, "shape": shape, **shapes[shape], "T": T, "routing": routing, "op": op,
             "impl": impl, "dtype": str(dtype).replace("torch.", ""), "median_ms": ms[0],
             "p20_ms": ms[1], "p80_ms": ms[2], "smoke": smoke}
        if flops:
            r["tflops"] = flops / ms[0] / 1e9
            if dense_tflops:
                r["pct_of_dense"] = 100 * r["tflops"] / dense_tflops
        if nbytes:
            r["gb_per_s"] = nbytes / ms[0] / 1e6
        rows.append(r)
        print(f"{shape:12s} T={T:6d} {routing:8s} {op:14s} {impl:14s} {ms[0]:9.3f} ms"
              + (f" {r['tflops']:8.1f} TFLOP/s" if flops else "")
              + (f" {r['gb_per_s']:8.1f} GB/s" if nbytes else ""))

    for name, s in shapes.items():
        D, Fh, E, K = s["D"], s["F"], s["E"], s["K"]
        w13 = (torch.randn(E, D, 2 * Fh, generator=gen) * 0.02).to(device, dtype).requires_grad_(True)
        w2 = (torch.randn(E, Fh, D, generator=gen) * 0.02).to(device, dtype).requires_grad_(True)
        for T in tokens:
            M = T * K
            flops_fwd = 6 * M * D * Fh
            # dense matmul of the same forward FLOPs: (T*K) x D x 3F as one GEMM
            xa = torch.randn(M, D, device=device, dtype=dtype)
            wd = torch.randn(D, 3 * Fh, device=device, dtype=dtype)
            ms = bench(lambda: xa @ wd)
            row(name, T, "-", "dense_matmul", "torch", ms, flops_fwd)
            dense_tf = flops_fwd / ms[0] / 1e9
            for routing in ("balanced", "skewed"):
                idx = make_routing(T, E, K, routing == "skewed", device, gen)
                x = (torch.randn(T, D, generator=gen) * 0.5).to(device, dtype)
                logits = torch.randn(T, E, generator=gen).to(device)
                rbytes = T * E * 4 + T * K * 12
                row(name, T, routing, "route", "triton", bench(lambda: kernels.route(logits, top_k=K)), nbytes=rbytes)
                row(name, T, routing, "route", "torch_ref", bench(lambda: kernels.route_ref(logits, top_k=K)), nbytes=rbytes)
                pbytes = 2 * M * D * x.element_size()
                row(name, T, routing, "permute", "triton", bench(lambda: kernels.permute(x, idx, E)), nbytes=pbytes)
                row(name, T, routing, "permute", "torch_ref", bench(lambda: kernels.permute_ref(x, idx, E)), nbytes=pbytes)
                xm, rm, offs = kernels.permute(x, idx, E)
                wts = torch.rand(T, K, device=device)
                ubytes = (M * D + T * D) * x.element_size()
                row(name, T, routing, "unpermute", "triton", bench(lambda: kernels.unpermute(xm, rm, wts, T)), nbytes=ubytes)
                row(name, T, routing, "unpermute", "torch_ref", bench(lambda: kernels.unpermute_ref(xm, rm, wts, T)), nbytes=ubytes)
                with torch.no_grad():
                    row(name, T, routing, "mlp_fwd", "triton",
                        bench(lambda: kernels.grouped_swiglu_mlp(xm, offs, w13, w2)), flops_fwd, dense_tflops=dense_tf)
                    row(name, T, routing, "mlp_fwd", "grouped_mm",
                        bench(lambda: torch_grouped(xm, offs, w13, w2)), flops_fwd, dense_tflops=dense_tf)
                    row(name, T, routing, "mlp_fwd", "expert_loop",
                        bench(lambda: kernels.grouped_swiglu_mlp_ref(xm, offs, w13, w2)), flops_fwd, dense_tflops=dense_tf)
                xg = xm.detach().requires_grad_(True)
                for impl, fn in (("triton", kernels.grouped_swiglu_mlp), ("grouped_mm", torch_grouped)):
                    y = fn(xg, offs, w13, w2)
                    gy = torch.randn_like(y)
                    row(name, T, routing, "mlp_bwd", impl,
                        bench(lambda: torch.autograd.grad(y, (xg, w13, w2), gy, retain_graph=True)),
                        2 * flops_fwd, dense_tflops=dense_tf)

                    def full(fn=fn):
                        out = fn(xg, offs, w13, w2)
                        torch.autograd.grad(out, (xg, w13, w2), gy)
                    row(name, T, routing, "mlp_fwd_bwd", impl, bench(full), 3 * flops_fwd, dense_tflops=dense_tf)

                def layer_triton():
                    w, i, _ = kernels.route(logits, top_k=K)
                    a_, r_, o_ = kernels.permute(x, i, E)
                    return kernels.unpermute(kernels.grouped_swiglu_mlp(a_, o_, w13, w2), r_, w, T)

                def layer_torch():
                    w, i, _ = kernels.route_ref(logits, top_k=K)
                    a_, r_, o_ = kernels.permute_ref(x, i, E)
                    return kernels.unpermute_ref(torch_grouped(a_, o_, w13, w2), r_, w, T)
                with torch.no_grad():
                    row(name, T, routing, "moe_layer_fwd", "triton", bench(layer_triton), flops_fwd, dense_tflops=dense_tf)
                    row(name, T, routing, "moe_layer_fwd", "torch+grouped_mm", bench(layer_torch), flops_fwd, dense_tflops=dense_tf)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{len(rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
