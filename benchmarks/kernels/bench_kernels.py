"""python -m benchmarks.kernels.bench_kernels [--shapes qwen3-30b-a3b olmoe ...] [--tokens 4096 ...]

Kernel microbenchmarks for the MoE layer, each beside baselines measured in the same run:

    op               impls (baselines)                               figure
    route            triton | torch_ref                              GB/s
    route_bwd        triton | torch_ref (autograd)                   GB/s
    permute          triton | torch_ref                              GB/s
    unpermute        triton | torch_ref                              GB/s
    mlp_fwd          triton | grouped_mm | expert_loop               TFLOP/s, % of dense
    mlp_bwd          triton | grouped_mm | expert_loop               TFLOP/s, % of dense
    mlp_fwd_bwd      triton | grouped_mm | expert_loop               TFLOP/s, % of dense
    moe_layer_fwd    triton (moe_layer_triton) | triton_fused_gather (permute gather in
                     the first GEMM's prologue) | torch (refs + grouped_mm)   TFLOP/s
    moe_layer_fwd_bwd  same                                          TFLOP/s
    dense_matmul     torch (one (T*K) x D x 3F GEMM: the same forward FLOPs, the roofline)

Shapes are one GPU's share of each model's expert layer: DeepSeek-V3 (D 7168, F 2048,
32 local experts of 256, top-8; routing over all 256 with 8 groups / 4 kept),
Qwen3-30B-A3B (2048, 768, 128, 8), OLMoE (2048, 1024, 64, 8), Mixtral (4096, 14336, 8, 2);
T in {4096, 16384, 32768}; balanced (N(0,1) logits) and skewed (logits + a Zipf-like
per-expert offset) routing, with the resulting max/mean expert load recorded per row.
TFLOP/s counts ACTIVE FLOPs (6*T*K*D*F forward, 12*T*K*D*F backward); GB/s counts the
bytes each op must move (see each kernel's docstring).

Timing: what is timed is what training runs: the triton rows call the unchecked entry
points (`permute_unchecked`, `unpermute_unchecked`, `grouped_swiglu_mlp_unchecked`; the
public functions' value checks read indices back to the host), and the torch baselines
are written without host syncs (scatter_add counts instead of bincount / .tolist()). Forward-only rows are timed inside a
CUDA graph (triton.testing.do_bench_cudagraph: no launch overhead, which dominates the
small ops) with do_bench as the fallback, backward rows with triton.testing.do_bench (L2
flushed); median with p20/p80, bf16 on CUDA; each row names its `timer`. A ~3 s bf16
matmul loop warms the clocks before the first row. Correctness at the benchmark shapes:
the triton MLP and layer outputs are compared with the grouped_mm / torch baselines of the
same row (`max_rel_err_vs_baseline`) and permute/unpermute with the torch ones
(`matches_baseline`), so a fast wrong kernel is visible in its own row.
Rows: benchmarks/results/kernels_<device>.jsonl and .csv, each with the environment
record of benchmarks/common.py (device name, torch/triton versions, commit: HEAD, marked
-dirty when tracked files have changes), shape and routing. Summarise with
``python -m benchmarks.kernels.summarize``.

Without CUDA it refuses to run, unless given --cpu-smoke: one tiny shape on CPU under the
Triton interpreter, timed with perf_counter, rows marked "smoke": true and written to
/tmp/kernels_smoke.jsonl (not results: do not commit them). Needs only torch and triton.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, environment

SHAPES = {
    # D, F, local experts E, top-k K; routing over E_route experts (groups G, keep TG)
    "deepseek-v3": dict(D=7168, F=2048, E=32, K=8, E_route=256, G=8, TG=4, score_fn="sigmoid"),
    "qwen3-30b-a3b": dict(D=2048, F=768, E=128, K=8, E_route=128, G=1, TG=1, score_fn="softmax"),
    "olmoe": dict(D=2048, F=1024, E=64, K=8, E_route=64, G=1, TG=1, score_fn="softmax"),
    "mixtral": dict(D=4096, F=14336, E=8, K=2, E_route=8, G=1, TG=1, score_fn="softmax"),
}
SMOKE_SHAPE = {"smoke": dict(D=32, F=16, E=4, K=2, E_route=8, G=2, TG=1, score_fn="sigmoid")}


# ------------------------------------------------------------------------------ timing
def make_timer(smoke: bool):
    """(fn, graph) -> ((median, p20, p80) milliseconds, timer name). graph: try a CUDA
    graph first (forward-only, sync-free functions), falling back to do_bench."""
    if smoke:
        def bench(fn, graph=False):
            fn()  # compile / warm
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            ts.sort()
            return (ts[1], ts[0], ts[2]), "perf_counter"
        return bench
    import triton.testing

    def bench(fn, graph=False):
        if graph:
            try:
                return (tuple(triton.testing.do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8])),
                        "do_bench_cudagraph")
            except Exception as e:  # not capturable (a host sync, an allocator limit)
                print(f"  (CUDA graph capture failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''}; timing with do_bench)")
                torch.cuda.synchronize()
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])), "do_bench"
    return bench


def warm_up_clocks(seconds: float = 3.0, device="cuda") -> float:
    """Run bf16 matmuls until `seconds` have passed, so the first timed row does not run
    at idle clocks; returns the seconds spent."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ baselines
def grouped_mm_mlp(x_MD, offs_E, w13_ED2F, w2_EFD):
    """torch._grouped_mm (CUTLASS on H100) with an unfused SwiGLU between the GEMMs."""
    Fh = w2_EFD.shape[1]
    h = torch._grouped_mm(x_MD, w13_ED2F, offs=offs_E)
    return torch._grouped_mm(F.silu(h[:, :Fh]) * h[:, Fh:], w2_EFD, offs=offs_E)


def permute_torch(x_TD, idx_TK, E):
    """Sync-free torch permute: stable sort of the (token, k) slots by expert, a row gather,
    per-expert counts by scatter_add and their cumulative ends (no bincount, no .tolist())."""
    K = idx_TK.shape[1]
    flat = idx_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, device=flat.device, dtype=torch.int32).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    return x_TD[order // K], row_map.view(-1, K), torch.cumsum(counts, 0, dtype=torch.int32)


def unpermute_torch(y_MD, row_map_TK, w_TK):
    """Sync-free torch unpermute: gather each token's K rows, weight in fp32, sum."""
    T, K = row_map_TK.shape
    rows = y_MD.index_select(0, row_map_TK.reshape(-1)).view(T, K, -1)
    return (w_TK.float().unsqueeze(-1) * rows.float()).sum(1).to(y_MD.dtype)


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_logits(T, E, skewed, device, gen):
    logits = torch.randn(T, E, generator=gen)
    if skewed:  # expert i's popularity ~ 1/(i+1): a hot head and a cold tail
        logits = logits + 2.0 * torch.log(1.0 / torch.arange(1, E + 1, dtype=torch.float))
    return logits.to(device)


def max_over_mean(counts_E) -> float:
    c = counts_E.float()
    return float(c.max() / c.mean())


# ------------------------------------------------------------------------------ one run
@dataclass
class Case:
    """One (shape, tokens, routing) that rows are measured at."""

    name: str
    s: dict
    T: int
    routing: str

    @property
    def flops_fwd(self) -> int:
        """Active forward FLOPs of the expert MLP: 6*T*K*D*F."""
        return 6 * self.T * self.s["K"] * self.s["D"] * self.s["F"]


class Run:
    """One invocation: device, dtype, timer, environment record, the unchecked kernel entry
    points training calls, and the rows measured so far."""

    def __init__(self, smoke: bool, expert_loop: bool):
        # imported here: in smoke mode TRITON_INTERPRET must be set first
        from kernels.grouped_mlp import grouped_swiglu_mlp_unchecked
        from kernels.permute import permute_unchecked, unpermute_unchecked

        def mlp_unchecked(x_MD, offs_E, w13, w2):
            return grouped_swiglu_mlp_unchecked(x_MD, offs_E, w13, w2, tail=False)

        self.permute, self.unpermute, self.mlp = (permute_unchecked, unpermute_unchecked,
                                                  mlp_unchecked)
        self.smoke, self.expert_loop = smoke, expert_loop
        self.device = "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.bench = make_timer(smoke)
        self.info = environment()
        self.gen = torch.Generator().manual_seed(0)
        self.rows: list[dict] = []

    def leaf(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` on the run's device and dtype, a leaf that takes gradients."""
        return w.to(self.device, self.dtype).requires_grad_(True)

    def record(self, c: Case, op, impl, fn, flops=None, nbytes=None, dense=None, extra=None,
               graph=False):
        """Time ``fn`` and append its row (a failure is kept as a row with its error)."""
        head = {**self.info, "shape": c.name, **c.s, "T": c.T, "routing": c.routing, "op": op,
                "impl": impl, "dtype": str(self.dtype).removeprefix("torch.")}
        label = f"{c.name:14s} T={c.T:6d} {c.routing:8s} {op:17s} {impl:12s}"
        try:
            ms, timer = self.bench(fn, graph)
        except Exception as e:  # keep the failure as a row (e.g. OOM, unsupported on CPU)
            if not self.smoke and isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            r = {**head, "smoke": self.smoke,
                 "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            self.rows.append(r)
            print(f"{label} FAILED {r['error']}")
            return None
        r = {**head, "median_ms": ms[0], "p20_ms": ms[1], "p80_ms": ms[2],
             "median_us": ms[0] * 1e3, "timer": timer, "smoke": self.smoke, **(extra or {})}
        if flops:
            r["tflops"] = flops / ms[0] / 1e9
            if dense:
                r["pct_of_dense"] = 100.0 * r["tflops"] / dense
        if nbytes:
            r["gb_per_s"] = nbytes / ms[0] / 1e6
        self.rows.append(r)
        print(f"{label} {ms[0]:9.3f} ms"
              + (f" {r['tflops']:7.1f} TFLOP/s" if flops else "")
              + (f" ({r['pct_of_dense']:4.0f}% dense)" if "pct_of_dense" in r else "")
              + (f" {r['gb_per_s']:8.1f} GB/s" if nbytes else ""), flush=True)
        return r


@dataclass
class Routed:
    """One case's routing over the GPU's local experts and its permuted tokens."""

    lk: dict  # route keywords
    logits: torch.Tensor
    x: torch.Tensor
    w_TK: torch.Tensor  # detached gates
    xm: torch.Tensor
    row_map: torch.Tensor
    offs: torch.Tensor
    extra: dict  # fields of every row of the case (max/mean expert load)


# ------------------------------------------------------------------------------ cases
def dense_case(run: Run, name: str, s: dict, T: int):
    """The roofline: one dense GEMM of the same forward FLOPs, (T*K) x D x 3F."""
    M, D, Fh = T * s["K"], s["D"], s["F"]
    xa = torch.randn(M, D, device=run.device, dtype=run.dtype)
    wd = torch.randn(D, 3 * Fh, device=run.device, dtype=run.dtype)
    r = run.record(Case(name, s, T, "-"), "dense_matmul", "torch", lambda: xa @ wd,
                   6 * M * D * Fh, graph=True)
    return r["tflops"] if r else None


def routed_case(run: Run, c: Case, dense, w13, w2) -> None:
    """Every op for one (shape, T, routing); tensors die when this returns."""
    rkw = route_rows(run, c)
    r = permute_rows(run, c, rkw)
    unpermute_rows(run, c, r)
    mlp_rows(run, c, r, dense, w13, w2)
    layer_rows(run, c, r, dense, w13, w2)


def route_rows(run: Run, c: Case) -> dict:
    """route and route_bwd over the model's full expert set (DeepSeek-V3: 256, grouped);
    returns the route keywords."""
    import kernels

    T, K, ER, fn = c.T, c.s["K"], c.s["E_route"], c.s["score_fn"]
    lr = make_logits(T, ER, c.routing == "skewed", run.device, run.gen).requires_grad_(True)
    rkw = dict(top_k=K, score_fn=fn, n_groups=c.s["G"], topk_groups=c.s["TG"],
               expert_bias=torch.zeros(ER, device=run.device) if fn == "sigmoid" else None,
               route_scale=2.5 if fn == "sigmoid" else 1.0)
    rbytes = T * ER * 4 + T * K * 12
    for impl, f in (("triton", kernels.route), ("torch_ref", kernels.route_ref)):
        with torch.no_grad():
            run.record(c, "route", impl, lambda f=f: f(lr, **rkw), nbytes=rbytes, graph=True)
        w_ = f(lr, **rkw)[0]
        gw = torch.randn_like(w_)
        run.record(c, "route_bwd", impl,
                   lambda w_=w_, gw=gw: torch.autograd.grad(w_, lr, gw, retain_graph=True),
                   nbytes=2 * T * ER * 4 + T * K * 12)
    return rkw


def permute_rows(run: Run, c: Case, rkw: dict) -> Routed:
    """Route over the GPU's local experts (groups kept where they divide E), then the
    permute rows (triton checked against the torch baseline)."""
    import kernels

    T, D, E, G, TG, fn = c.T, c.s["D"], c.s["E"], c.s["G"], c.s["TG"], c.s["score_fn"]
    M, el = T * c.s["K"], run.dtype.itemsize
    grouped = E % G == 0
    lk = dict(rkw, n_groups=G if grouped else 1, topk_groups=TG if grouped else 1,
              expert_bias=torch.zeros(E, device=run.device) if fn == "sigmoid" else None)
    logits = make_logits(T, E, c.routing == "skewed", run.device, run.gen).requires_grad_(True)
    w_TK, idx_TK, counts = kernels.route(logits, **lk)
    extra = {"max_over_mean_load": max_over_mean(counts)}
    x = run.leaf(torch.randn(T, D, generator=run.gen) * 0.5)
    xd = x.detach()
    xm, rm, offs = run.permute(xd, idx_TK, E)
    xt, rt, ot = permute_torch(xd, idx_TK, E)
    perm_ok = {"matches_baseline": bool(torch.equal(xm, xt) and torch.equal(offs, ot))}
    for impl, f in (("triton", run.permute), ("torch", permute_torch)):
        with torch.no_grad():
            run.record(c, "permute", impl, lambda f=f: f(xd, idx_TK, E),
                       nbytes=2 * M * D * el, extra={**extra, **perm_ok}, graph=True)
    return Routed(lk, logits, x, w_TK.detach(), xm, rm, offs, extra)


def unpermute_rows(run: Run, c: Case, r: Routed) -> None:
    T, D, M, el = c.T, c.s["D"], c.T * c.s["K"], run.dtype.itemsize
    unpermute, xm, rm, wts = run.unpermute, r.xm, r.row_map, r.w_TK
    un_ok = {"max_rel_err_vs_baseline": rel_err(unpermute(xm, rm, wts),
                                                unpermute_torch(xm, rm, wts))}
    for impl, f in (("triton", lambda: unpermute(xm, rm, wts)),
                    ("torch", lambda: unpermute_torch(xm, rm, wts))):
        with torch.no_grad():
            run.record(c, "unpermute", impl, f, nbytes=(M * D + T * D) * el,
                       extra={**r.extra, **un_ok}, graph=True)


def mlp_rows(run: Run, c: Case, r: Routed, dense, w13, w2) -> None:
    """mlp_fwd, mlp_bwd, mlp_fwd_bwd of each grouped MLP (triton checked against
    grouped_mm)."""
    import kernels

    M, D, flops_fwd = c.T * c.s["K"], c.s["D"], c.flops_fwd
    mlp, xm, offs = run.mlp, r.xm, r.offs
    mlps = [("triton", mlp), ("grouped_mm", grouped_mm_mlp)]
    if run.expert_loop:
        mlps.append(("expert_loop", kernels.grouped_swiglu_mlp_ref))
    xg = xm.detach().requires_grad_(True)
    gy = torch.randn(M, D, device=run.device, dtype=run.dtype)
    with torch.no_grad():
        mlp_err = rel_err(mlp(xm, offs, w13, w2), grouped_mm_mlp(xm, offs, w13, w2))
    fk = dict(dense=dense, extra={**r.extra, "max_rel_err_vs_baseline": mlp_err})
    for impl, f in mlps:
        with torch.no_grad():
            run.record(c, "mlp_fwd", impl, lambda f=f: f(xm, offs, w13, w2), flops_fwd,
                       graph=True, **fk)
        try:
            y = f(xg, offs, w13, w2)
        except Exception as e:  # e.g. a baseline without autograd support here
            print(f"{c.name} {impl}: forward with grad failed: {e}")
            continue
        run.record(c, "mlp_bwd", impl,
                   lambda y=y: torch.autograd.grad(y, (xg, w13, w2), gy, retain_graph=True),
                   2 * flops_fwd, **fk)
        y = None  # free the graph before the fwd+bwd run

        def full(f=f):
            torch.autograd.grad(f(xg, offs, w13, w2), (xg, w13, w2), gy)
        run.record(c, "mlp_fwd_bwd", impl, full, 3 * flops_fwd, **fk)


def layer_rows(run: Run, c: Case, r: Routed, dense, w13, w2) -> None:
    """The whole routed layer (route, permute, MLP, combine), forward and forward+backward:
    moe_layer_triton without and with the fused gather, and the torch baseline."""
    import kernels

    x, logits, lk, E = r.x, r.logits, r.lk, c.s["E"]

    def layer_triton():
        return kernels.moe_layer_triton(x, logits, w13, w2, **lk)[0]

    def layer_triton_fused():
        return kernels.moe_layer_triton(x, logits, w13, w2, fuse_gather=True, **lk)[0]

    def layer_torch():
        w, i, _ = kernels.route_ref(logits, **lk)
        a_, r_, o_ = permute_torch(x, i, E)
        return unpermute_torch(grouped_mm_mlp(a_, o_, w13, w2), r_, w)
    go = torch.randn(c.T, c.s["D"], device=run.device, dtype=run.dtype)
    with torch.no_grad():
        ref = layer_torch()
        errs = {"triton": rel_err(layer_triton(), ref),
                "triton_fused_gather": rel_err(layer_triton_fused(), ref), "torch": 0.0}
        ref = None
    for impl, f in (("triton", layer_triton), ("triton_fused_gather", layer_triton_fused),
                    ("torch", layer_torch)):
        fk = dict(dense=dense, extra={**r.extra, "max_rel_err_vs_baseline": errs[impl]})
        with torch.no_grad():
            run.record(c, "moe_layer_fwd", impl, f, c.flops_fwd, graph=True, **fk)

        def full(f=f):
            torch.autograd.grad(f(), (x, logits, w13, w2), go)
        run.record(c, "moe_layer_fwd_bwd", impl, full, 3 * c.flops_fwd, **fk)


# ------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="*", type=int, default=[4096, 16384, 32768])
    p.add_argument("--routing", nargs="*", default=["balanced", "skewed"],
                   choices=["balanced", "skewed"])
    p.add_argument("--no-expert-loop", action="store_true",
                   help="skip the per-expert loop baseline (slow at E=128)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="one tiny shape on CPU under the Triton interpreter (proves the script runs)")
    p.add_argument("--out", default=None, help="JSONL path (a .csv is written beside it)")
    return p.parse_args(argv)


def output_path(out: str | None, smoke: bool, device: str) -> Path:
    """--out, else /tmp/kernels_smoke.jsonl (smoke) or results/kernels_<device>.jsonl."""
    slug = "".join(ch if ch.isalnum() else "_" for ch in device).strip("_")
    path = Path(out) if out else (Path("/tmp/kernels_smoke.jsonl") if smoke else
                                  RESULTS / f"kernels_{slug}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_rows(rows: list[dict], out: Path, smoke: bool) -> None:
    """Append ``rows`` to the JSONL ``out``; rewrite the CSV beside it from the whole file
    (so its header covers every field)."""
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    csv_path = out.with_suffix(".csv")
    all_rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    fields = sorted({k for r in all_rows for k in r})
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(all_rows)
    print(f"{len(rows)} rows appended to {out} and {csv_path}"
          + (" (SMOKE rows: not results, do not commit)" if smoke else ""))


def main(argv=None):
    a = parse_args(argv)
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("error: no CUDA device. These are GPU benchmarks; to check the script on CPU "
              "run it with --cpu-smoke (tiny shape, Triton interpreter, rows marked smoke).",
              file=sys.stderr)
        return 2
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules load (lazily)
    run = Run(smoke, expert_loop=not a.no_expert_loop)
    shapes = SMOKE_SHAPE if smoke else {k: SHAPES[k] for k in a.shapes}
    tokens = [64] if smoke else a.tokens
    out = output_path(a.out, smoke, run.info["device"])
    if not smoke:
        run.info["clock_warmup_s"] = round(warm_up_clocks(), 2)
    for name, s in shapes.items():
        D, Fh, E = s["D"], s["F"], s["E"]
        w13 = run.leaf(torch.randn(E, D, 2 * Fh, generator=run.gen) * 0.02)
        w2 = run.leaf(torch.randn(E, Fh, D, generator=run.gen) * 0.02)
        for T in tokens:
            dense = dense_case(run, name, s, T)
            for routing in a.routing:
                routed_case(run, Case(name, s, T, routing), dense, w13, w2)
                if not smoke:
                    torch.cuda.empty_cache()
    write_rows(run.rows, out, smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
