"""python -m benchmarks.bench_train_step [--config configs/tiny-moe.yaml] [--steps 8] [--rounds 3]

Training-step throughput (tokens/s) and MFU on this machine for three models, measured in
the same process, interleaved round by round (so load from other processes on a shared
box hits all three alike), each through the same DeepSpeed engine as ``moe-testbed train``:

  moe       the config as is (our MoE layer: sigmoid, group-limited top-k, dropless
            grouped-GEMM dispatch, aux-loss-free bias update)
  dense     the same backbone with a dense SwiGLU FFN in every layer, ffn_dim chosen so
            ACTIVE parameters (main model + MTP) match the MoE model's as closely as an
            integer width allows
  ds_moe    the same MoE shapes with ``deepspeed.moe.layer.MoE`` (GShard softmax top-k
            gate, einsum dispatch, drop_tokens=False, aux loss 1e-2) as the routed part;
            our shared expert is kept beside it

MFU = model FLOPs/s (accounting.count_params(...).flops_per_token_train x tokens/s, the
same numerator for moe and ds_moe) / a measured fp32 matmul peak (best 2048^3 matmul,
measured before every round; the maximum is used). Rows are appended to
benchmarks/results/train_step_cpu.jsonl with the environment record (device, versions,
commit: benchmarks/common.py) and the config.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import ROOT, add_malloc_option, apply_malloc_option, environment
from moe.accounting import count_params
from moe.config import load_config
from moe.layers import SwiGLU
from moe.model import build_model


def dense_equivalent(cfg_path: str, overrides: list[str]):
    """Dense config with ACTIVE params (incl. MTP) closest to the MoE config's."""
    moe_cfg = load_config(cfg_path, overrides)
    c = count_params(moe_cfg)
    target = c.active + c.mtp_active
    m = moe_cfg.model
    best = None
    for f in range(8, 8 * m.ffn_dim + 1, 8):
        d = load_config(cfg_path, overrides + ["moe.n_routed=0", f"model.ffn_dim={f}",
                                               f"model.first_k_dense={m.n_layers}"])
        dc = count_params(d)
        diff = abs(dc.active + dc.mtp_active - target)
        if best is None or diff < best[0]:
            best = (diff, d)
    return best[1]


class DeepSpeedMoEFFN(nn.Module):
    """Our MoE FFN's interface ((out, balance_loss)) around deepspeed.moe.layer.MoE."""

    def __init__(self, d_model: int, moe_cfg, aux_coef: float = 1e-2):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(hidden_size=d_model, expert=SwiGLU(d_model, moe_cfg.expert_ffn_dim),
                       num_experts=moe_cfg.n_routed, ep_size=1, k=moe_cfg.top_k,
                       capacity_factor=1.0, drop_tokens=False, use_rts=False)
        self.shared = (SwiGLU(d_model, moe_cfg.n_shared * moe_cfg.expert_ffn_dim)
                       if moe_cfg.n_shared else None)
        self.aux_coef = aux_coef

    def forward(self, x):
        out, l_aux, _ = self.moe(x)
        if self.shared is not None:
            out = out + self.shared(x)
        return out, self.aux_coef * l_aux.float()


def build_variant(name: str, cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    if name == "ds_moe":
        for mod in model.modules():
            if getattr(mod, "is_moe", False):
                mod.ffn = DeepSpeedMoEFFN(cfg.model.d_model, cfg.moe)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny-moe.yaml"))
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step_cpu.jsonl"))
    add_malloc_option(p)
    a = p.parse_args(argv)
    malloc = apply_malloc_option(p, a)

    from moe.data import TokenBatches
    from moe.train.engine import build_engine, deepspeed_config, init_process_group
    from moe.train.loop import prepare
    from moe.train.metrics import measure_matmul_peak

    init_process_group(600)
    cfg = load_config(a.config, a.overrides)
    variants = {"moe": cfg, "dense": dense_equivalent(a.config, a.overrides), "ds_moe": cfg}
    data = prepare(cfg, progress=False)
    # The matmul peak is re-measured every round and the best kept: on a shared box a
    # single measurement taken while another job runs can be half the real peak.
    peaks = [measure_matmul_peak("cpu", torch.float32)]

    state = {}
    for name, vcfg in variants.items():
        model = build_variant(name, vcfg)
        engine, _, _ = build_engine(vcfg, model, 10**6, deepspeed_config(vcfg, 1, "cpu"))
        batches = TokenBatches(data.train, vcfg.train.micro_batch_size, vcfg.train.seq_len,
                               vcfg.mtp.depth, seed=0)
        state[name] = {"engine": engine, "batches": batches, "cfg": vcfg, "times": []}

    def step(st):
        eng = st["engine"]
        xb = next(st["batches"])
        out = eng(xb)
        eng.backward(out["loss"])
        eng.module.update_expert_bias()  # no-op for dense / ds_moe (no MoEFeedForward)
        eng.step()

    for st in state.values():
        for _ in range(a.warmup):
            step(st)
    for _ in range(a.rounds):
        peaks.append(measure_matmul_peak("cpu", torch.float32))
        for st in state.values():
            for _ in range(a.steps):
                t0 = time.perf_counter()
                step(st)
                st["times"].append(time.perf_counter() - t0)

    peak = max(peaks)
    rows = []
    base = {"bench": "train_step", **environment(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "config": os.path.relpath(a.config, ROOT), "overrides": a.overrides,
            "precision": "fp32", "cpu_malloc": malloc,
            "peak_flops_fp32_matmul_measured": peak,
            "peak_flops_all_measurements": peaks,
            "load_avg_1m": os.getloadavg()[0]}
    for name, st in state.items():
        vcfg = st["cfg"]
        c = count_params(vcfg)
        # MFU numerator: the MoE config's model FLOPs for ds_moe too (same useful work)
        fpt = c.flops_per_token_train
        tok = vcfg.train.micro_batch_size * vcfg.train.grad_accum * vcfg.train.seq_len
        med = statistics.median(st["times"])
        tps = tok / med
        rows.append({**base, "variant": name, "ffn_dim": vcfg.model.ffn_dim,
                     "params_total": c.total_with_mtp, "params_active": c.active + c.mtp_active,
                     "flops_per_token_train": fpt, "tokens_per_step": tok,
                     "steps_timed": len(st["times"]), "step_s_median": med,
                     "step_s_min": min(st["times"]), "tokens_per_s": tps,
                     "model_flops_per_s": tps * fpt, "mfu": tps * fpt / peak})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"device: {base['device']}, load {base['load_avg_1m']:.2f}; fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s; malloc {base['cpu_malloc']}")
    print("| variant | active params | total params | tokens/s | step s (median) | MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['params_active']:,} | {r['params_total']:,} | "
              f"{r['tokens_per_s']:,.0f} | {r['step_s_median']:.3f} | {100 * r['mfu']:.1f}% |")
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
