"""The model a plan row trains: config families (the fits' ladder, or a preset scaled at its
aspect ratio), the member nearest a planned size, and the memory layout on given GPUs."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from moe.accounting import GIB, bytes_per_param, count_params
from moe.config import Config, ConfigError, apply_overrides, config_from_dict, read_yaml
from moe.scaling.planner.limits import REPO_CONFIGS, PlanError


@dataclass
class Family:
    """How a model of a given width is built: from a ladder (its base config, size and
    sparsity rules, LR rule and schedule) or from a preset config scaled at its aspect."""

    name: str
    source: str
    base: dict  # resolved config dict (base chain followed, ladder overrides applied)
    aspect: float  # d_model / n_layers
    head_dim: int
    ffn_ratio: float
    expert_ratio: float  # expert_ffn_dim / d_model (preset families)
    n_shared: int
    first_k_dense: int
    granule: int
    ladder: object = None  # LadderConfig when from a ladder
    min_layers: int = 1
    max_layers: int = 256

    def overrides(self, d_model: int, n_layers: int, experts: int, top_k: int) -> list[str]:
        if self.ladder is not None:
            from moe.scaling.ladder.design import SizeSpec, SparsitySpec, size_overrides

            sp = SparsitySpec("plan", n_routed=experts, top_k=top_k if experts else 1,
                              n_shared=self.n_shared if experts else 0)
            size = SizeSpec("plan", d_model, n_layers, _heads(d_model, self.head_dim))
            return size_overrides(size, sp, self.ffn_ratio)
        n_heads = _heads(d_model, self.head_dim)
        ov = [f"model.d_model={d_model}", f"model.n_layers={n_layers}",
              f"model.n_heads={n_heads}", "model.head_dim=null", "model.n_kv_heads=null",
              f"model.ffn_dim={int(round(self.ffn_ratio * d_model))}"]
        if experts == 0:
            return ov + ["moe.n_routed=0", f"model.first_k_dense={n_layers}"]
        ex = max(2, int(round(self.expert_ratio * d_model / 2)) * 2)
        return ov + [f"moe.n_routed={experts}", f"moe.top_k={top_k}",
                     f"moe.n_shared={self.n_shared}", f"moe.expert_ffn_dim={ex}",
                     "moe.n_groups=1", "moe.topk_groups=1",
                     f"model.first_k_dense={min(self.first_k_dense, n_layers - 1)}"]

    def config(self, d_model: int, n_layers: int, experts: int, top_k: int,
               extra: Sequence[str] = ()) -> Config:
        data = apply_overrides(copy.deepcopy(self.base),
                               self.overrides(d_model, n_layers, experts, top_k) + list(extra))
        return config_from_dict(data)


def rel(path) -> str:
    """A path as the user would type it: relative to the working directory when under it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _resolved_dict(path: Path, overrides: Sequence[str] = ()) -> dict:
    return apply_overrides(read_yaml(Path(path)), list(overrides))


def family_from_ladder(path) -> Family:
    from moe.scaling.ladder.design import load_ladder

    lcfg, base = load_ladder(path)
    data = _resolved_dict(base, lcfg.overrides)
    big = max(lcfg.sizes, key=lambda s: s.d_model * s.n_layers)
    shared = [s.n_shared for s in lcfg.sparsities if s.n_routed]
    layers = sorted({s.n_layers for s in lcfg.sizes})
    return Family(name=f"ladder {lcfg.name}", source=rel(path), base=data,
                  aspect=big.d_model / big.n_layers, head_dim=big.d_model // big.n_heads,
                  ffn_ratio=lcfg.ffn_ratio, expert_ratio=0.0,
                  n_shared=shared[0] if shared else 0, first_k_dense=0,
                  granule=max(4, big.d_model // big.n_heads), ladder=lcfg,
                  min_layers=layers[0])


def family_from_config(path) -> Family:
    data = _resolved_dict(Path(path))
    cfg = config_from_dict(copy.deepcopy(data))
    m, e = cfg.model, cfg.moe
    hd = m.hdim
    return Family(name=f"preset {cfg.name}", source=rel(path), base=data,
                  aspect=m.d_model / m.n_layers, head_dim=hd, ffn_ratio=m.ffn_dim / m.d_model,
                  expert_ratio=(e.expert_ffn_dim / m.d_model) if e.enabled else
                  m.ffn_dim / m.d_model / 4,
                  n_shared=e.n_shared if e.enabled else 1,
                  first_k_dense=m.first_k_dense if e.enabled else 1,
                  granule=max(2, hd), min_layers=2 if e.enabled else 1)


def ladder_for_fits(fits: dict, fits_path: Path) -> Optional[Path]:
    """configs/ladder/<name>.yaml when fits.json came from `moe-testbed ladder` (its source is
    runs/ladder-<name>/results.csv, or a results.csv beside it names it)."""
    src = str(fits.get("source") or "")
    names = []
    for part in Path(src).parts + (fits_path.parent.name,):
        if part.startswith("ladder-"):
            names.append(part[len("ladder-"):])
        elif part.startswith("ladder_"):
            names.append(part[len("ladder_"):].replace("_", "-"))
    for n in names:
        p = REPO_CONFIGS / "ladder" / f"{n}.yaml"
        if p.is_file():
            return p
    return None


def preset_families() -> list[Family]:
    out = []
    for p in sorted(REPO_CONFIGS.glob("*.yaml")):
        try:
            out.append(family_from_config(p))
        except (ConfigError, OSError, KeyError, ValueError):
            continue
    return out


def _heads(d_model: int, head_dim: int) -> int:
    """Head count for a width: the divisor of d_model with an even head size nearest
    d_model / head_dim (RoPE needs an even head dimension)."""
    want = max(1.0, d_model / head_dim)
    opts = [h for h in range(1, d_model // 2 + 1) if d_model % h == 0 and (d_model // h) % 2 == 0]
    return min(opts, key=lambda h: (abs(math.log(h / want)), h)) if opts else 1


def fit_geometry(fam: Family, target: float, experts: int,
                 top_k: int) -> tuple[Config, int, int, float]:
    """(config, d_model, n_layers, relative error) of the family member whose active
    parameters are nearest `target`: widths in steps of 2, depths around the family's
    aspect ratio (d_model / n_layers); among members within 2% of the target the one
    nearest that aspect, else the nearest count."""
    cands = []
    per = (top_k + fam.n_shared) if experts else 1
    d = max(4, fam.granule) - 2
    hd = fam.head_dim
    while d < 200_000:
        # small widths in steps of 2; from 8 heads up, whole heads of the family's size
        # (d_model = n_heads x head_dim, as presets are), depth then gives the fine steps
        d = d + 2 if d + 2 < 8 * hd or hd % 2 else (d // hd + 1) * hd
        if experts and fam.ladder is not None and int(round(fam.ffn_ratio * d)) % per:
            continue
        L0 = max(fam.min_layers, min(fam.max_layers, int(round(d / fam.aspect))))
        over = True
        steps = (-1, 0, 1) if d < 8 * hd else (-3, -2, -1, 0, 1, 2, 3)
        for L in sorted({max(fam.min_layers, L0 + k) for k in steps}):
            try:
                cfg = fam.config(d, L, experts, top_k)
            except ConfigError:
                continue
            a = count_params(cfg).active
            over = over and a > 1.5 * target
            shape = (abs(math.log(d / L / fam.aspect))
                     + abs(math.log(cfg.model.hdim / fam.head_dim)))
            cands.append((abs(math.log(a / target)), shape, cfg, d, L, a / target - 1.0))
        if over and cands:
            break
    if not cands:
        raise PlanError(f"{fam.name}: no geometry for {target:.3g} active params")
    near = [c for c in cands if c[0] <= 0.02]
    best = min(near, key=lambda c: (c[1], c[0])) if near else min(cands, key=lambda c: c[0])
    return best[2], best[3], best[4], best[5]


def nearest_family(families: list[Family], target: float, experts: int,
                   top_k: int) -> Family:
    """The preset whose own active size (at this expert count) is nearest the target among
    those whose embeddings leave room for it (< half the target)."""
    best = None
    for fam in families:
        own_cfg = config_from_dict(copy.deepcopy(fam.base))
        try:
            own = fam.config(own_cfg.model.d_model, own_cfg.model.n_layers, experts, top_k)
        except ConfigError:
            continue
        c = count_params(own)
        if c.embedding > 0.5 * target:
            continue
        d = abs(math.log(c.active / target))
        if best is None or d < best[0]:
            best = (d, fam)
    if best is None:
        raise PlanError(f"no preset in {REPO_CONFIGS} can be scaled to {target:.3g} active "
                        "params (embeddings alone exceed half of it); pass --base CONFIG")
    return best[1]


def choose_layout(cfg: Config, gpus: int, mem_gib: float, headroom: float = 0.25,
                  precision: Optional[str] = None) -> tuple[Optional[dict], float]:
    """The first (zero, ep) layout whose model states fit; (None, least GiB needed) if none."""
    c = count_params(cfg)
    prec = precision or ("fp32" if cfg.train.precision == "fp32" else "bf16")
    w, g, o = bytes_per_param(prec)
    expert_per_layer = c.routed_experts / c.n_moe_layers if c.n_moe_layers else 0.0
    mtp_routed = (cfg.mtp.depth * expert_per_layer
                  if cfg.is_moe and cfg.model.n_layers > cfg.model.first_k_dense else 0.0)
    routed = c.routed_experts + mtp_routed
    dense = c.total_with_mtp - routed
    budget = mem_gib * GIB * (1.0 - headroom)
    E = cfg.moe.n_routed if cfg.is_moe else 0
    eps = [ep for ep in range(1, gpus + 1) if gpus % ep == 0 and (E == 0 and ep == 1 or
                                                                  E and E % ep == 0)]
    least = float("inf")
    for zero in (0, 1, 2):
        for ep in eps:
            dp, edp = gpus, gpus // ep

            def per(n, ranks):
                return n * (w + (g / ranks if zero >= 2 else g) + (o / ranks if zero >= 1 else o))

            need = per(dense, dp) + per(routed / ep, edp)
            least = min(least, need)
            if need <= budget:
                return {"tp": 1, "ep": ep, "dp": gpus, "zero": zero, "precision": prec,
                        "states_gib_per_gpu": need / GIB, "gpus": gpus,
                        "gpu_mem_gib": mem_gib, "headroom": headroom}, need / GIB
    return None, least / GIB
