"""Generation with a KV cache, and multi-token-prediction speculative decoding.

    moe-testbed generate RUN_DIR --prompt "def main(" --max-new-tokens 64 [--speculative mtp] [--json]

Plain decoding: the prompt fills every layer's KV cache in one pass, then one token per
step (greedy, or sampled at ``temperature`` from a seeded generator).

``--speculative mtp`` (DeepSeek-V3 section 5.4.3: the MTP module as a draft model): after
the main model has produced token t_{n} from position n-1, the first MTP module combines
the main model's hidden state at n-1 with t_{n}'s embedding (exactly its training input)
and drafts t_{n+1}. The main model then runs positions n and n+1 in ONE pass: its
prediction at n verifies the draft; when they agree, the prediction at n+1 is a second
token for free (two tokens per main pass), else the draft is dropped (its cache entry is
truncated) and the main model's own token is kept. The MTP module has its own KV cache,
fed with every accepted position. Greedy speculative output is the main model's greedy
output token for token; with sampling, the draft is accepted with probability
min(1, p/q) and a rejection resamples from max(0, p - q) (Leviathan et al. 2023), so
tokens follow the main model's distribution.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .layers import KVCache

__all__ = ["GenerationResult", "generate", "generate_main"]


class GenerateError(ValueError):
    """Bad input for generation; the message names it."""


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens
    drafted: Optional[int] = None
    accepted: Optional[int] = None
    seconds: float = 0.0
    main_passes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> Optional[float]:
        return None if not self.drafted else self.accepted / self.drafted

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


def _probs(logits_V: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits_V.float() / temperature, dim=-1)


def _pick(logits_V: torch.Tensor, temperature: float, gen: Optional[torch.Generator]):
    """(token, probabilities or None) from one position's logits."""
    if temperature <= 0:
        return int(torch.argmax(logits_V)), None
    p = _probs(logits_V, temperature)
    return int(torch.multinomial(p, 1, generator=gen)), p


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, speculative: Optional[str] = None,
             max_len: Optional[int] = None) -> GenerationResult:
    """New tokens after ``prompt`` (see the module doc). ``max_len``: stop when the whole
    sequence reaches it (the model's context)."""
    _check_request(model, prompt, speculative, max_len)
    model.eval()
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed) if temperature > 0 else None
    limit = max_new_tokens if max_len is None else min(max_new_tokens, max_len - len(prompt))
    caches = [KVCache() for _ in model.layers]
    t0 = time.perf_counter()
    x = torch.tensor([prompt], device=dev)
    h = model.hidden(x, caches)  # prefill
    logits = model.head(model.norm(h[:, -1]))[0]
    tok, _ = _pick(logits, temperature, gen)
    out = [tok]
    if speculative is None:
        passes = 1 + _decode_plain(model, out, limit, caches, temperature, gen, dev)
        return GenerationResult(out[:limit], seconds=time.perf_counter() - t0,
                                main_passes=passes)
    passes, drafted, accepted = _decode_mtp(model, prompt, h, out, limit, caches, temperature,
                                            gen, dev)
    return GenerationResult(out[:limit], drafted=drafted, accepted=accepted,
                            seconds=time.perf_counter() - t0, main_passes=1 + passes)


def _check_request(model, prompt: list[int], speculative: Optional[str],
                   max_len: Optional[int]) -> None:
    if not prompt:
        raise GenerateError("the prompt is empty: give at least one token")
    if max_len is not None and len(prompt) > max_len:
        raise GenerateError(f"the prompt has {len(prompt)} tokens, longer than the model's "
                            f"context of {max_len}")
    if speculative not in (None, "mtp"):
        raise GenerateError(f"--speculative {speculative!r}: allowed mtp")
    if speculative == "mtp" and len(model.mtp) == 0:
        raise GenerateError("--speculative mtp needs a model with an MTP module (mtp.depth "
                            "= 0 in this run's config)")


def _decode_plain(model, out: list[int], limit: int, caches: list, temperature: float,
                  gen: Optional[torch.Generator], dev: torch.device) -> int:
    """One main pass per new token, appended to ``out`` until it holds ``limit``; returns
    the passes."""
    passes = 0
    while len(out) < limit:
        h = model.hidden(torch.tensor([[out[-1]]], device=dev), caches)
        passes += 1
        tok, _ = _pick(model.head(model.norm(h[:, -1]))[0], temperature, gen)
        out.append(tok)
    return passes


def _decode_mtp(model, prompt: list[int], h: torch.Tensor, out: list[int], limit: int,
                caches: list, temperature: float, gen: Optional[torch.Generator],
                dev: torch.device) -> tuple[int, int, int]:
    """MTP speculative decoding (depth-1 draft) after the prefill (``h``: its hidden states;
    ``out``: its one token), appending to ``out`` until it holds ``limit``; returns (main
    passes, drafted, accepted)."""
    mcache = KVCache()
    seq = list(prompt) + [out[-1]]  # accepted tokens; main cache holds positions < len(seq) - 1
    # MTP inputs for positions 0..n-1: (t_{i+1}, h_i); its output at n-1 drafts t_{n+1}
    hk = model.mtp_hidden(0, torch.tensor([seq[1:]], device=dev), h, mcache)
    passes = drafted = accepted = 0
    while len(out) < limit:
        d_logits = model.mtp_logits(0, hk[:, -1])[0]
        draft, q = _pick(d_logits, temperature, gen)
        drafted += 1
        n = len(seq) - 1  # position of the last accepted token (not yet in the main cache)
        hv = model.hidden(torch.tensor([[seq[-1], draft]], device=dev), caches)
        passes += 1
        lv = model.head(model.norm(hv))[0]  # (2, V): predictions for n+1 and n+2
        ok, nxt = _verify(lv, draft, q, temperature, gen)
        if ok:
            accepted += 1
            new, hidden = [draft, nxt], hv  # positions n, n+1 are now final
        else:
            for c in caches:
                c.truncate(n + 1)  # drop the draft's position n+1
            new, hidden = [nxt], hv[:, :1]
        seq.extend(new)
        out.extend(new)
        # MTP positions n.. : inputs (t_{i+1}, h_i) for the newly final main positions
        hk = model.mtp_hidden(0, torch.tensor([seq[n + 1:n + 1 + hidden.shape[1]]],
                                              device=dev), hidden, mcache)
    return passes, drafted, accepted


def _verify(lv: torch.Tensor, draft: int, q, temperature: float,
            gen: Optional[torch.Generator]) -> tuple[bool, int]:
    """Accept or reject ``draft`` (drawn from ``q``) against the main model's predictions
    ``lv`` for the draft's position and the one after; returns (accepted, the next token:
    the one after the draft when accepted, else the draft's replacement)."""
    if temperature <= 0:
        top = int(torch.argmax(lv[0]))
        ok = top == draft
    else:
        p = _probs(lv[0], temperature)
        ok = bool(torch.rand(1, generator=gen) < torch.clamp(p[draft] / q[draft], max=1.0))
    if ok:
        nxt, _ = _pick(lv[1], temperature, gen)
        return True, nxt
    if temperature <= 0:
        return False, top
    resid = torch.clamp(p - q, min=0.0)
    resid = resid / resid.sum() if resid.sum() > 0 else p
    return False, int(torch.multinomial(resid, 1, generator=gen))


# ------------------------------------------------------------------------------ CLI


def run_tokenizer(cfg):
    """The run's tokenizer (bytes, or the cached BPE; prepared if missing)."""
    from .data import config_data, load_tokenizer

    if cfg.data.tokenizer == "bytes":
        return load_tokenizer("bytes")
    return config_data(cfg).tokenizer


def generate_main(argv=None) -> int:
    from pathlib import Path

    from .runs.load import LoadError, load_model

    ap = argparse.ArgumentParser(prog="moe-testbed generate",
                                 description="Generate text from a run (KV cache; optional MTP "
                                             "speculative decoding).")
    ap.add_argument("run_dir")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speculative", choices=["mtp"], default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    try:
        if a.max_new_tokens < 1:
            raise GenerateError(f"--max-new-tokens {a.max_new_tokens}: allowed >= 1")
        if not Path(a.run_dir).exists():
            raise GenerateError(f"run directory {a.run_dir} does not exist")
        model, cfg = load_model(a.run_dir)
        if a.speculative and cfg.mtp.depth == 0:
            raise GenerateError(f"--speculative mtp: the run {a.run_dir} has no MTP module "
                                "(mtp.depth = 0)")
        tok = run_tokenizer(cfg)
        ids = tok.encode(a.prompt)
        res = generate(model, ids, a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                       speculative=a.speculative, max_len=cfg.train.seq_len)
    except (GenerateError, LoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = tok.decode(res.tokens)
    if a.json:
        print(json.dumps({"tokens": res.tokens, "text": text, "drafted": res.drafted,
                          "accepted": res.accepted, "acceptance_rate": res.acceptance_rate,
                          "tokens_per_s": res.tokens_per_s}))
    else:
        print(a.prompt + text)
        stats = f"{len(res.tokens)} tokens, {res.tokens_per_s:.1f} tokens/s"
        if res.drafted:
            stats += f", MTP drafts accepted {res.accepted}/{res.drafted}"
        print(f"[{stats}]", file=sys.stderr)
    return 0
