"""What a plan may not do, and the constants it plans with: budgets beyond the fitted
runs (extrapolation), passes over the corpus beyond max_epochs (the package docstring has
the rules)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from moe.config import Config
from moe.scaling.planner.laws import level_of

MAX_FLOPS = 1e28  # a budget above this is a typo, not a plan


#: Default limit on a budget's compute over the largest fitted run's: `plan` refuses a
#: budget beyond it unless --extrapolate is passed (then those rows are flagged).
#: --max-extrapolation changes it.
MAX_EXTRAPOLATION = 100.0

DEFAULT_MFU = 0.35

DEFAULT_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16 tensor-core peak (NVIDIA datasheet)

CONFIG_RTOL = 0.05

REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"


class PlanError(ValueError):
    """The fits, the budget or the machine cannot give a plan; the message says why."""


def largest_fitted_flops(fits: dict) -> float:
    """The compute of the largest fitted (not held-out) run."""
    return max(r["flops"] for r in fits.get("runs", []) if not r.get("held_out"))


def check_extrapolation(fits: dict, flops: Sequence[float], limit: float = MAX_EXTRAPOLATION,
                        extrapolate: bool = False) -> None:
    """PlanError (one line, naming the largest budget and its factor) when a budget is more
    than `limit` x the compute of the largest fitted run and `extrapolate` is False. Reads
    only the runs: it runs before any law is chosen, so it holds when no law is usable."""
    if not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit >= 1):
        raise PlanError(f"--max-extrapolation {limit!r} is invalid: allowed a number >= 1")
    cmax = largest_fitted_flops(fits)
    worst = max(flops)
    if worst / cmax > limit and not extrapolate:
        default = "the default limit" if limit == MAX_EXTRAPOLATION else "--max-extrapolation"
        raise PlanError(f"--flops {worst:.3g} is {worst / cmax:.3g}x the compute of the largest "
                        f"fitted run ({cmax:.3g} FLOPs); {default} is {limit:g}x: pass "
                        "--extrapolate to plan anyway (every row beyond it is then flagged)")


def corpus_size(cfg: Config):
    """The training split of `cfg`'s corpus in tokens, without building anything:
    moe.data.train_token_count(build=False) reads a prepared cache's meta.json (or a
    Megatron index), else estimates from the bytes on disk (`exact` False), else gives
    train_tokens None with the reason."""
    from moe.data import train_token_count

    dc = cfg.data
    return train_token_count(dc.corpus, dc.tokenizer, cfg.model.vocab_size, dc.cache_dir,
                             dc.val_fraction, build=False, **dc.options())


def passes_check(cfg: Config, tokens: float, max_epochs: float, src: str, cache: dict) -> dict:
    """A row's passes over its config's corpus: tokens / the corpus' training tokens when
    the count is exact (a prepared cache); otherwise passes None with the reason and the
    on-disk estimate, and the row is not checked. Refused when exact passes > max_epochs."""
    dc = cfg.data
    key = (str(dc.corpus), dc.tokenizer, cfg.model.vocab_size, str(dc.cache_dir),
           dc.val_fraction, tuple(dc.options().items()))
    if key not in cache:
        cache[key] = corpus_size(cfg)
    cs = cache[key]
    out = {"corpus": cs.corpus, "train_tokens": cs.train_tokens if cs.exact else None,
           "passes": None, "passes_estimate": None, "passes_note": cs.note,
           "max_epochs": max_epochs, "refused": None}
    if not cs.train_tokens:
        out["passes_note"] = f"passes unknown: {cs.note}"
        return out
    p = tokens / cs.train_tokens
    if not cs.exact:
        out["passes_estimate"] = p
        out["passes_note"] = (f"passes unknown, ~{p:.3g} estimated ({cs.note}); not checked "
                              f"against max_epochs {max_epochs:g}")
        return out
    out["passes"] = p
    if p > max_epochs:
        out["refused"] = (f"would train {p:.3g} passes over data.corpus {cs.corpus!r} "
                          f"({tokens:.3g} tokens over {cs.train_tokens:,} training tokens) > "
                          f"max_epochs {max_epochs:g} ({src}); use a larger corpus or pass "
                          "--max-epochs")
    return out


def n_extrapolation(fits: dict, experts: int, n: float) -> tuple[float, str]:
    """N_opt / the largest fitted (not held-out) run's params_active: over the runs of this
    expert count's level when it has fitted runs, else over all fitted runs; and which."""
    runs = [r for r in fits.get("runs", []) if not r.get("held_out")]
    level = level_of(fits, experts)
    own = [r for r in runs if level is not None and r.get("level") == level]
    if own:
        return n / max(r["params_active"] for r in own), f"largest fitted {level} run"
    return n / max(r["params_active"] for r in runs), "largest fitted run (any level)"
