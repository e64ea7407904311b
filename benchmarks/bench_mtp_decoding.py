"""MTP speculative decoding vs plain greedy decoding on the held-out split.

    moe-testbed train configs/tiny-moe.yaml --out runs/bench-tiny-moe      # README main job
    python -m benchmarks.bench_mtp_decoding runs/bench-tiny-moe [--prompts 32] [--prompt-len 64] [--new 64]

For each of ``--prompts`` prompts cut at evenly spaced offsets of the run's validation
split, both decoders generate ``--new`` tokens greedily (moe/generate.py, KV cache, batch
1, CPU threads as torch sets them); the outputs must be identical token for token. Rows:
acceptance rate of the MTP drafts (accepted / drafted), tokens/s of each decoder (total
new tokens / total seconds, after one warm-up prompt), the speed-up, main-model passes
per token. Results: benchmarks/results/mtp_decoding/<run name>.jsonl (+ .md), each row with
the machine, versions, commit and settings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, environment


@torch.no_grad()
def call_costs(model, prompt, n: int = 200) -> dict:
    """Milliseconds per call after the prompt: a main pass (+ head) of 1 and of 2 tokens
    (plain decoding's step; speculative verification) and an MTP draft (1 position + head):
    what the speed-up is made of."""
    from moe.layers import KVCache

    caches = [KVCache() for _ in model.layers]
    h = model.hidden(torch.tensor([prompt]), caches)
    P = len(prompt)
    mc = KVCache()
    model.mtp_hidden(0, torch.tensor([prompt[1:] + [prompt[0]]]), h, mc)

    def main_pass(k):
        hh = model.hidden(torch.tensor([prompt[:k]]), caches)
        model.head(model.norm(hh))
        for c in caches:
            c.truncate(P)

    def draft():
        hk = model.mtp_hidden(0, torch.tensor([prompt[:1]]), h[:, :1], mc)
        model.mtp_logits(0, hk[:, -1])
        mc.truncate(P)

    out = {}
    for name, f in (("ms_main_1_token", lambda: main_pass(1)),
                    ("ms_main_2_tokens", lambda: main_pass(2)), ("ms_mtp_draft", draft)):
        for _ in range(20):
            f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        out[name] = (time.perf_counter() - t0) / n * 1e3
    return out


def main(argv=None) -> int:
    from moe.generate import generate
    from moe.runs.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    model, cfg = load_model(a.run_dir)
    if cfg.mtp.depth < 1:
        print("error: the run has no MTP module (mtp.depth = 0)", file=sys.stderr)
        return 2
    if a.prompt_len + a.new > cfg.train.seq_len:
        print(f"error: --prompt-len + --new = {a.prompt_len + a.new} exceeds the model's "
              f"context {cfg.train.seq_len}", file=sys.stderr)
        return 2
    from moe.data import config_data

    val = config_data(cfg).val
    n = val.num_tokens
    starts = [int(i * (n - a.prompt_len) / a.prompts) for i in range(a.prompts)]
    prompts = [[int(t) for t in val.read(s, a.prompt_len)] for s in starts]
    generate(model, prompts[0], 8)  # warm-up (allocator, first-call overheads)
    generate(model, prompts[0], 8, speculative="mtp")
    tot = {"plain_s": 0.0, "spec_s": 0.0, "tokens": 0, "drafted": 0, "accepted": 0,
           "passes": 0, "identical": 0}
    for p in prompts:
        plain = generate(model, p, a.new)
        spec = generate(model, p, a.new, speculative="mtp")
        tot["plain_s"] += plain.seconds
        tot["spec_s"] += spec.seconds
        tot["tokens"] += len(spec.tokens)
        tot["drafted"] += spec.drafted
        tot["accepted"] += spec.accepted
        tot["passes"] += spec.main_passes
        tot["identical"] += int(spec.tokens == plain.tokens)
    per_call = call_costs(model, prompts[0])
    row = {
        "run": str(a.run_dir), "model": cfg.name, "attention": cfg.model.attention,
        "params_total": int(sum(p.numel() for p in model.parameters())),
        "prompts": a.prompts, "prompt_len": a.prompt_len, "new_tokens": a.new,
        "split": "val", "decoding": "greedy, batch 1, KV cache",
        "acceptance_rate": tot["accepted"] / tot["drafted"],
        "drafted": tot["drafted"], "accepted": tot["accepted"],
        "plain_tokens_per_s": tot["tokens"] / tot["plain_s"],
        "spec_tokens_per_s": tot["tokens"] / tot["spec_s"],
        "speedup": tot["plain_s"] / tot["spec_s"],
        "main_passes_per_token_spec": tot["passes"] / tot["tokens"],
        "identical_outputs": f"{tot['identical']}/{a.prompts}",
        **per_call, **environment(),
    }
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / "mtp_decoding" / f"{cfg.name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return 0 if tot["identical"] == a.prompts else 1


if __name__ == "__main__":
    sys.exit(main())
