"""CPU MoE-layer benchmark (issue: CPU target of the torch backend).

    python -m benchmarks.bench_moe_layer_cpu [--rounds 15] [--tokens 4096] [--upstream sum|random]

Forward+backward of one MoE FFN at E=64, k=8, expert FFN 128, d_model 256, fp32 against,
in the same run and interleaved round by round (so background load hits all alike):
  * dense      : a SwiGLU FFN with the same ACTIVE params (hidden k*F = 1024)
  * ours       : moe.moe_layer.layer.MoEFeedForward, torch backend, torch._grouped_mm
  * ours-loop  : the same layer with the per-expert loop
  * naive      : argsort + x[idx] + torch._grouped_mm + index_add (autograd-generic indexing)
  * deepspeed  : deepspeed.moe.layer.MoE, dropless (drop_tokens=False), same expert shape
glibc malloc keeps freed memory (moe.cpu_malloc, as training on CPU does) unless
``--malloc system``: otherwise every large tensor is page-faulted in afresh each step.
Rows go to benchmarks/results/moe_layer_cpu.jsonl: median / p20 / p80 / min ms, active
GFLOP/s, and the ratio to the dense median of the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import add_malloc_option, append_rows, apply_malloc_option, environment
from moe import MoEConfig
from moe.layers import SwiGLU
from moe.moe_layer.layer import MoEFeedForward


class NaiveMoE(torch.nn.Module):
    """The straightforward layer: argsort, fancy indexing, grouped_mm, index_add."""

    def __init__(self, ref: MoEFeedForward):
        super().__init__()
        self.ref = ref

    def forward(self, x_BSD):
        r = self.ref
        x = x_BSD.reshape(-1, x_BSD.shape[-1])
        _, w, idx = r.route(x)
        K = idx.shape[1]
        order = torch.argsort(idx.reshape(-1))
        tok = order // K
        offs = torch.cumsum(torch.bincount(idx.reshape(-1), minlength=r.n_experts), 0).to(torch.int32)
        h = torch._grouped_mm(x[tok], r.w13_ED2F, offs=offs)
        Fh = r.w2_EFD.shape[1]
        y = torch._grouped_mm(F.silu(h[:, :Fh]) * h[:, Fh:], r.w2_EFD, offs=offs)
        out = torch.zeros_like(x).index_add_(0, tok, y * w.reshape(-1)[order][:, None])
        return out.view_as(x_BSD)


def build_deepspeed(D, E, K, Fh):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29561"), ("RANK", "0"),
                 ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo")
    return MoE(hidden_size=D, expert=SwiGLU(D, Fh), num_experts=E, ep_size=1, k=K,
               drop_tokens=False, use_rts=False)


def gemm_floor(layer: MoEFeedForward, x_TD, Fh: int, env: dict, rounds: int) -> list[dict]:
    """Median time of each GEMM of a fwd+bwd, run alone on operands of the right shapes:
    the routed experts' six grouped GEMMs (segments from the layer's routing of x) and
    the dense SwiGLU's six GEMMs (same FLOPs). Their sums bound what removing every
    non-GEMM cost could reach."""
    T, D = x_TD.shape
    E, K = layer.n_experts, layer.cfg.top_k
    with torch.no_grad():
        _, _, idx = layer.route(x_TD)
    offs = torch.cumsum(torch.bincount(idx.reshape(-1), minlength=E), 0).to(torch.int32)
    M, H = T * K, K * Fh
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w13, w2 = r(E, D, 2 * Fh), r(E, Fh, D)
    xm, am, dym, dhm = r(M, D), r(M, Fh), r(M, D), r(M, 2 * Fh)
    w1, wd = r(D, 2 * H), r(H, D)
    ad, dyd, dhd = r(T, H), r(T, D), r(T, 2 * H)

    def gmm(A, B):
        return lambda: torch._grouped_mm(A, B, offs=offs)

    cases = {"moe": {"up": gmm(xm, w13), "down": gmm(am, w2), "dW2": gmm(am.t(), dym),
                     "da": gmm(dym, w2.transpose(-2, -1)), "dW13": gmm(xm.t(), dhm),
                     "dx": gmm(dhm, w13.transpose(-2, -1))},
             "dense": {"up": lambda: x_TD @ w1, "down": lambda: ad @ wd,
                       "dW2": lambda: ad.t() @ dyd, "da": lambda: dyd @ wd.t(),
                       "dW13": lambda: x_TD.t() @ dhd, "dx": lambda: dhd @ w1.t()}}
    out = []
    for layer_name, gemms in cases.items():
        total = 0.0
        for name, fn in gemms.items():
            for _ in range(3):
                fn()
            ts = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            med = statistics.median(ts) * 1e3
            total += med
            out.append({**env, "bench": "moe_layer_gemm_floor", "layer": layer_name,
                        "gemm": name, "median_ms": med})
        out.append({**env, "bench": "moe_layer_gemm_floor", "layer": layer_name,
                    "gemm": "sum", "median_ms": total})
        print(f"GEMMs alone, {layer_name:5s}: " + "  ".join(
            f"{r['gemm']} {r['median_ms']:.1f}" for r in out if r["layer"] == layer_name) + " ms")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--out", default="moe_layer_cpu.jsonl")
    p.add_argument("--profile", action="store_true",
                   help="also record the top ops of 'ours' by self CPU time (torch profiler)")
    p.add_argument("--upstream", choices=["sum", "random"], default="sum",
                   help="gradient fed to the layer output: that of out.sum() (expanded ones, "
                        "the earlier runs' method) or a fixed dense random tensor")
    add_malloc_option(p)
    p.add_argument("--gemm-floor", action="store_true",
                   help="also time, alone, the six GEMMs of each layer's fwd+bwd (the "
                        "experts' grouped GEMMs at this run's routing vs the dense FFN's)")
    a = p.parse_args(argv)
    malloc = apply_malloc_option(p, a)
    T, D, E, K, Fh = a.tokens, 256, 64, 8, 128
    torch.manual_seed(0)
    cfg = MoEConfig(n_routed=E, n_shared=0, expert_ffn_dim=Fh, top_k=K, kernels="torch")
    ours = MoEFeedForward(D, cfg)
    for prm in ours.parameters():
        torch.nn.init.normal_(prm, 0, 0.02)
    loop = MoEFeedForward(D, MoEConfig(**{**cfg.__dict__, "dispatch": "loop"}))
    loop.load_state_dict(ours.state_dict())
    variants = {"dense": SwiGLU(D, K * Fh), "ours": ours, "ours-loop": loop, "naive": NaiveMoE(ours)}
    if not a.no_deepspeed:
        variants["deepspeed"] = build_deepspeed(D, E, K, Fh)
    x = torch.randn(1, T, D, requires_grad=True)
    # upstream gradient of the layer output: "sum" backpropagates out.sum() (an expanded,
    # stride-0 gradient), "random" a fixed dense gradient as a transformer's residual
    # stream would deliver
    g_out = torch.randn(1, T, D)

    def step(m):
        out = m(x)
        y = out[0] if isinstance(out, tuple) else out
        roots, grads = [y], [y.new_ones(()).expand_as(y) if a.upstream == "sum" else g_out]
        if isinstance(out, tuple) and len(out) == 3:  # deepspeed: (out, l_aux, counts)
            roots.append(out[1])
            grads.append(torch.ones_like(out[1]))
        torch.autograd.backward(roots, grads)

    for m in variants.values():
        for _ in range(3):
            step(m)
    times = {n: [] for n in variants}
    for _ in range(a.rounds):
        for n, m in variants.items():
            t0 = time.perf_counter()
            step(m)
            times[n].append(time.perf_counter() - t0)

    env = {**environment(), "cpu_malloc": malloc}
    flops = 3 * 2 * T * 3 * D * Fh * K  # fwd+bwd matmul FLOPs of the active expert path
    dense_med = statistics.median(times["dense"])
    rows = []
    for n, ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=5)
        rows.append({**env, "bench": "moe_layer_fwd_bwd", "variant": n, "dtype": "float32",
                     "shape": {"T": T, "D": D, "E": E, "K": K, "F": Fh, "shared": 0},
                     "rounds": a.rounds, "upstream_grad": a.upstream,
                     "median_ms": med * 1e3, "p20_ms": q[0] * 1e3,
                     "p80_ms": q[3] * 1e3, "min_ms": ts[0] * 1e3,
                     "active_gflops_per_s": flops / med / 1e9,
                     "ratio_vs_dense_median": med / dense_med})
        print(f"{n:10s} median {med*1e3:8.1f} ms  min {ts[0]*1e3:8.1f} ms  "
              f"{flops/med/1e9:7.1f} GFLOP/s  x{med/dense_med:.2f} dense")
    if a.profile:
        # where "ours" spends its time: torch profiler self CPU time per op, per step
        steps = 5
        with torch.profiler.profile() as prof:
            for _ in range(steps):
                step(ours)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        for e in ops[:12]:
            rows.append({**env, "bench": "moe_layer_profile", "variant": "ours",
                         "upstream_grad": a.upstream, "op": e.key,
                         "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                         "calls_per_step": e.count / steps})
            print(f"  {e.key:45s} {e.self_cpu_time_total / 1e3 / steps:8.1f} ms/step "
                  f"{e.count / steps:8.0f} calls/step")
    if a.gemm_floor:
        rows += gemm_floor(ours, x.detach()[0], Fh, env, a.rounds)
    path = append_rows(a.out, rows)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
