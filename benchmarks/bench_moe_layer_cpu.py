"""CPU MoE-layer benchmark: our layer against dense and peer MoE layers, fp32 and bf16.

    python -m benchmarks.bench_moe_layer_cpu [--rounds 15] [--tokens 4096]
        [--shape e64k8 e8k2] [--dtype fp32 bf16] [--routing varying|fixed]
        [--variants dense ours naive deepspeed torchtitan ours-loop] [--upstream sum|random]

Forward+backward of one MoE FFN (no shared expert), d_model 256, per shape preset
  e64k8: E=64 routed experts, top-8, expert FFN 128 (DeepSeek-style fine-grained)
  e8k2 : E=8, top-2, expert FFN 512 (Mixtral-style)
against, in the same run and interleaved round by round (so background load hits all
alike), in each --dtype (parameters and input in that dtype):
  * dense      : a SwiGLU FFN with the same ACTIVE params (hidden k*F)
  * ours       : moe.moe_layer.layer.MoEFeedForward, torch backend, torch._grouped_mm
  * ours-nopad : the same layer without padding expert segments to 16 rows (what bf16 on
                 CPU does, moe.moe_layer.dispatcher.pad_segments): the padding's effect
  * ours-loop  : the same layer with the per-expert loop (reference path; not by default)
  * naive      : argsort + x[idx] + torch._grouped_mm + index_add (autograd-generic indexing)
  * deepspeed  : deepspeed.moe.layer.MoE, dropless (drop_tokens=False), same expert shape
  * torchtitan : torchtitan 0.3.0's MoE (sigmoid top-k router, LocalTokenDispatcher,
                 GroupedExperts on torch._grouped_mm). Its experts cast to bf16 whatever
                 the input dtype, so at fp32 its row records compute "bf16 experts".
``--routing varying`` (default) feeds a different input every step, so the routing and
the per-expert row counts change every step as in training (every new GEMM shape may
cost a oneDNN primitive build in bf16); ``fixed`` repeats one input (a best case).
glibc malloc keeps freed memory (moe.cpu_malloc, as training on CPU does) unless
``--malloc system``: otherwise every large tensor is page-faulted in afresh each step.
Rows go to benchmarks/results/moe_layer_cpu.jsonl: median / p20 / p80 / min ms, active
GFLOP/s, the dtype each variant really computes in, and the ratio to the dense median of
the same run, shape and dtype.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (add_malloc_option, append_rows, apply_malloc_option, dist_version,
                               environment)
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
        out = torch.zeros_like(x).index_add_(0, tok, y * w.reshape(-1)[order][:, None].to(y.dtype))
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


SHAPES = {"e64k8": {"E": 64, "K": 8, "F": 128}, "e8k2": {"E": 8, "K": 2, "F": 512}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_torchtitan(D, E, K, Fh):
    """torchtitan 0.3.0's MoE layer (sigmoid top-k, no shared expert), weights N(0, 0.02)."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (GroupedExperts, MoE, RoutedExperts,
                                              TokenChoiceTopKRouter)
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    cfg = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=D, hidden_dim=Fh, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K)),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E, gate=Linear.Config(in_features=D, out_features=E), top_k=K,
            score_func="sigmoid"),
        load_balance_coeff=1e-3)
    m = cfg.build()
    for prm in m.parameters():
        torch.nn.init.normal_(prm, 0, 0.02)
    return m


def build_variants(names, D, E, K, Fh, dtype):
    """{name: (module, the dtype its expert GEMMs compute in)}; a peer that cannot be built
    here is reported and left out."""
    torch.manual_seed(0)
    cfg = MoEConfig(n_routed=E, n_shared=0, expert_ffn_dim=Fh, top_k=K, kernels="torch")
    ours = MoEFeedForward(D, cfg)
    for prm in ours.parameters():
        torch.nn.init.normal_(prm, 0, 0.02)
    dname = "bf16" if dtype == torch.bfloat16 else "fp32"
    out = {}
    for n in names:
        try:
            if n == "dense":
                m, comp = SwiGLU(D, K * Fh), dname
            elif n == "ours":
                m, comp = ours, dname
            elif n == "ours-nopad":  # the same layer without bf16's padded segments
                m = MoEFeedForward(D, cfg)
                m.load_state_dict(ours.state_dict())
                m.experts.pad_rows = lambda w2_EFD: 0
                comp = dname
            elif n == "ours-loop":
                m = MoEFeedForward(D, MoEConfig(**{**cfg.__dict__, "dispatch": "loop"}))
                m.load_state_dict(ours.state_dict())
                comp = dname
            elif n == "naive":
                m, comp = NaiveMoE(ours), dname
            elif n == "deepspeed":
                m, comp = build_deepspeed(D, E, K, Fh), dname
            elif n == "torchtitan":
                m, comp = build_torchtitan(D, E, K, Fh), "bf16 experts"
            else:
                raise SystemExit(f"--variants: unknown {n!r}")
        except ImportError as e:
            print(f"{n}: not measured ({e})")
            continue
        out[n] = (m.to(dtype), comp)
    return out


def measure(a, shape: str, dname: str, env: dict) -> list[dict]:
    """One shape at one dtype: every variant interleaved round by round."""
    T, D = a.tokens, 256
    E, K, Fh = SHAPES[shape]["E"], SHAPES[shape]["K"], SHAPES[shape]["F"]
    dtype = DTYPES[dname]
    variants = build_variants(a.variants, D, E, K, Fh, dtype)
    warm = 3
    n_inputs = 1 if a.routing == "fixed" else warm + a.rounds
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, T, D, generator=g).to(dtype).requires_grad_() for _ in range(n_inputs)]
    # upstream gradient of the layer output: "sum" backpropagates out.sum() (an expanded,
    # stride-0 gradient), "random" a fixed dense gradient as a transformer's residual
    # stream would deliver
    g_out = torch.randn(1, T, D, generator=g).to(dtype)

    def step(m, i):
        x = xs[i % n_inputs]
        out = m(x)
        y = out[0] if isinstance(out, tuple) else out
        roots, grads = [y], [y.new_ones(()).expand_as(y) if a.upstream == "sum" else g_out]
        if isinstance(out, tuple) and len(out) == 3:  # deepspeed: (out, l_aux, counts)
            roots.append(out[1])
            grads.append(torch.ones_like(out[1]))
        torch.autograd.backward(roots, grads)

    for m, _ in variants.values():
        for i in range(warm):
            step(m, i)
    times = {n: [] for n in variants}
    for r in range(a.rounds):
        for n, (m, _) in variants.items():
            t0 = time.perf_counter()
            step(m, warm + r)
            times[n].append(time.perf_counter() - t0)

    flops = 3 * 2 * T * 3 * D * Fh * K  # fwd+bwd matmul FLOPs of the active expert path
    dense_med = statistics.median(times["dense"]) if "dense" in times else float("nan")
    rows = []
    print(f"-- {shape} (E={E} top-{K} F={Fh}), {dname}, routing {a.routing}")
    for n, ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=5)
        rows.append({**env, "bench": "moe_layer_fwd_bwd", "variant": n, "dtype": dname,
                     "computes_in": variants[n][1], "routing": a.routing,
                     "shape": {"T": T, "D": D, "E": E, "K": K, "F": Fh, "shared": 0},
                     "rounds": a.rounds, "upstream_grad": a.upstream,
                     "median_ms": med * 1e3, "p20_ms": q[0] * 1e3,
                     "p80_ms": q[3] * 1e3, "min_ms": ts[0] * 1e3,
                     "active_gflops_per_s": flops / med / 1e9,
                     "ratio_vs_dense_median": med / dense_med})
        print(f"{n:10s} median {med*1e3:8.1f} ms  min {ts[0]*1e3:8.1f} ms  "
              f"{flops/med/1e9:7.1f} GFLOP/s  x{med/dense_med:.2f} dense  ({variants[n][1]})")
    if a.profile and "ours" in variants:
        # where "ours" spends its time: torch profiler self CPU time per op, per step
        steps = 5
        with torch.profiler.profile() as prof:
            for i in range(steps):
                step(variants["ours"][0], i)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        for e in ops[:12]:
            rows.append({**env, "bench": "moe_layer_profile", "variant": "ours", "dtype": dname,
                         "shape": shape, "upstream_grad": a.upstream, "op": e.key,
                         "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                         "calls_per_step": e.count / steps})
            print(f"  {e.key:45s} {e.self_cpu_time_total / 1e3 / steps:8.1f} ms/step "
                  f"{e.count / steps:8.0f} calls/step")
    if a.gemm_floor and "ours" in variants and dtype == torch.float32:
        rows += gemm_floor(variants["ours"][0], xs[0].detach()[0], Fh, env, a.rounds)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--shape", nargs="+", default=["e64k8", "e8k2"], choices=sorted(SHAPES))
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--routing", choices=["varying", "fixed"], default="varying")
    p.add_argument("--variants", nargs="+",
                   default=["dense", "ours", "ours-nopad", "naive", "deepspeed", "torchtitan"])
    p.add_argument("--out", default="moe_layer_cpu.jsonl")
    p.add_argument("--profile", action="store_true",
                   help="also record the top ops of 'ours' by self CPU time (torch profiler)")
    p.add_argument("--upstream", choices=["sum", "random"], default="random",
                   help="gradient fed to the layer output: a fixed dense random tensor (as "
                        "a residual stream delivers) or that of out.sum() (expanded ones)")
    add_malloc_option(p)
    p.add_argument("--gemm-floor", action="store_true",
                   help="also time, alone, the six GEMMs of each layer's fwd+bwd (the "
                        "experts' grouped GEMMs at this run's routing vs the dense FFN's; fp32)")
    a = p.parse_args(argv)
    malloc = apply_malloc_option(p, a)
    env = {**environment(), "cpu_malloc": malloc, "torchtitan": dist_version("torchtitan"),
           "onednn_primitive_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default"),
           "threads": torch.get_num_threads()}
    rows = []
    for shape in a.shape:
        for dname in a.dtype:
            rows += measure(a, shape, dname, env)
    path = append_rows(a.out, rows)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
