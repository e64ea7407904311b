"""Typed configuration: the one source of truth for model, MoE, MTP, data, training and
parallel layout.

YAML files in ``configs/`` fill these dataclasses (a file may name a ``base:`` file it
extends), ``key.sub=value`` overrides are applied on top, and :meth:`Config.validate`
refuses every impossible combination with a :class:`ConfigError` that names the field,
the bad value and what is allowed -- before any tensor is allocated.

Everything downstream (model, DeepSpeed JSON, ladders, accounting) reads these objects;
nothing is kept twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration is impossible. The message names the field, the value and what is allowed."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Transformer backbone. Attention is GQA/MHA with RoPE (``attention: mha``) or
    DeepSeek-V2/V3 multi-head latent attention (``attention: mla``, fields named as
    DeepSeek's config: low-rank query (``q_lora_rank``; None or 0 = a full query
    projection) and key-value (``kv_lora_rank``) compression, per-head no-RoPE and RoPE
    query/key parts (``qk_nope_head_dim``, ``qk_rope_head_dim``; the RoPE key is one head
    shared by all), ``v_head_dim``)."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (MHA); fewer: GQA
    head_dim: Optional[int] = None  # None: d_model // n_heads
    ffn_dim: int = 1024  # SwiGLU hidden size of the dense FFN layers
    first_k_dense: int = 1  # the first k layers use the dense FFN (DeepSeek-V3: 3)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: Literal["mha", "mla"] = "mha"
    q_lora_rank: Optional[int] = None  # mla: None / 0 = no query compression
    kv_lora_rank: Optional[int] = None  # mla: the key-value latent (DeepSeek-V3: 512)
    qk_nope_head_dim: Optional[int] = None  # mla: per-head query/key part without RoPE
    qk_rope_head_dim: Optional[int] = None  # mla: RoPE part (the key's is shared by heads)
    v_head_dim: Optional[int] = None  # mla: per-head value size

    @property
    def is_mla(self) -> bool:
        return self.attention == "mla"

    @property
    def q_rank(self) -> int:
        """The query latent's size (0: no query compression)."""
        return self.q_lora_rank or 0

    @property
    def qk_head_dim(self) -> int:
        """Per-head size of queries and keys (the attention dot product)."""
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) if self.is_mla else self.hdim

    @property
    def v_dim(self) -> int:
        """Per-head size of values (the attention output per head)."""
        return self.v_head_dim if self.is_mla else self.hdim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def hdim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


@dataclass
class MoEConfig:
    """Routed + shared experts (DeepSeek-V3 style). ``n_routed = 0`` makes a dense model."""

    n_routed: int = 8
    n_shared: int = 1
    expert_ffn_dim: int = 256
    top_k: int = 2
    score_fn: Literal["sigmoid", "softmax"] = "sigmoid"
    n_groups: int = 1
    topk_groups: int = 1
    route_scale: float = 1.0
    balancing: Literal["none", "aux_loss", "aux_free", "aux_free+seq_aux"] = "aux_free"
    # expert-bias update speed (sign update): docs/model.md, "Expert-bias balancing"
    gamma: float = 1e-3
    alpha: float = 1e-4  # sequence-wise balance loss coefficient
    aux_loss_coef: float = 1e-2  # classic Switch/GShard aux loss coefficient (balancing=aux_loss)
    z_loss_coef: float = 0.0  # router z-loss coefficient (any balancing)
    kernels: Literal["auto", "triton", "torch"] = "auto"
    # torch backend expert path: torch._grouped_mm over contiguous segments, or a per-expert
    # loop (the reference).
    dispatch: Literal["grouped_mm", "loop"] = "grouped_mm"
    # Debug/benchmark switch: ignore the router's choice and send tokens round-robin to
    # experts (torchtitan _debug_force_load_balance). Gates stay the router's.
    force_uniform: bool = False

    @property
    def enabled(self) -> bool:
        return self.n_routed > 0


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3 section 2.2). depth = 0 disables it."""

    depth: int = 0
    weight: float = 0.3  # lambda
    weight_schedule: Literal["constant", "step"] = "constant"
    weight_late: float = 0.1  # lambda after switch_at (step schedule)
    switch_at: float = 0.7  # fraction of training after which weight_late applies

    def weight_at(self, progress: float) -> float:
        """lambda at a training progress in [0, 1]."""
        if self.weight_schedule == "step" and progress >= self.switch_at:
            return self.weight_late
        return self.weight


@dataclass
class DataConfig:
    # "stdlib" (embedded), a folder (text files and/or .jsonl/.jsonl.gz/.jsonl.zst/.parquet
    # shards), one such file, a glob or a list of files, a Hugging Face dataset folder
    # (save_to_disk output or a local Hub dataset repository; needs `datasets`), or a
    # Megatron .bin/.idx prefix
    corpus: Union[str, list[str]] = "stdlib"
    tokenizer: Literal["bpe", "bytes"] = "bpe"
    val_fraction: float = 0.02
    cache_dir: Optional[str] = None  # None: $MOE_TESTBED_CACHE or ~/.cache/moe-testbed
    text_field: str = "text"  # JSON field / parquet column holding a row's text
    # invalid JSON line, missing text, corrupt gzip/zstd/parquet: fail naming the file and
    # line/row ("error"), or skip and count it in the cache's meta.json ("skip")
    on_bad_record: Literal["error", "skip"] = "error"
    # BPE is trained on a uniform sample of about this many characters of the train split
    tokenizer_sample_bytes: int = 500_000_000
    # processes that tokenise the corpus' files; 1: this process, whose tokenizer library
    # already encodes on every core (faster on small machines); null: the CPU count. The
    # prepared data is the same token for token whatever the number.
    workers: Optional[int] = 1

    def options(self) -> dict:
        """``prepare_data``'s keyword options (text field, bad records, BPE sample,
        workers)."""
        return {"text_field": self.text_field, "on_bad_record": self.on_bad_record,
                "tokenizer_sample_bytes": self.tokenizer_sample_bytes,
                "workers": self.workers}


@dataclass
class TrainConfig:
    seq_len: int = 256
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: Optional[int] = 200
    token_budget: Optional[int] = None  # stop once this many training tokens are seen
    flop_budget: Optional[float] = None  # stop once this many training FLOPs are spent
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    zero_stage: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: GPU bf16; CPU bf16 if a probe finds it faster
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    # evaluate the untrained model at step 0 (the start of the eval curve); ladders that
    # only read the final loss turn it off (a full-split eval is ~3% of a small run)
    eval_at_start: bool = True
    ckpt_every: int = 100
    peak_flops: Optional[float] = None  # FLOP/s for MFU; None: measured matmul peak
    tensorboard: bool = False
    # CPU runs: keep freed memory in the process (glibc malloc tuning, moe/cpu_malloc.py);
    # large activations are otherwise page-faulted in again every step (~14% of tiny-moe)
    cpu_keep_freed_memory: bool = True
    # initial weights: a model state dict (model.pt, e.g. from `moe-testbed import-hf`), a
    # checkpoint directory or a run directory; the optimizer starts fresh. Ignored on resume.
    init_from: Optional[str] = None


@dataclass
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    timeout_s: int = 120  # collective timeout: a dead rank fails the job instead of hanging


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    name: str = "run"

    # ---------------------------------------------------------------- validation
    def validate(self) -> "Config":
        """Raise :class:`ConfigError` for the first impossible setting; return self.

        The sections are checked in this order: model, moe, mtp, data, train, parallel."""
        self._validate_model()
        self._validate_moe()
        self._validate_mtp()
        self._validate_data()
        self._validate_train()
        self._validate_parallel()
        return self

    def _validate_model(self) -> None:
        m = self.model
        _positive("model", m, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                  "head_dim", "ffn_dim", "norm_eps", "rope_theta", "init_std")
        _non_negative("model", m, "first_k_dense")
        if not m.is_mla and m.head_dim is None and m.d_model % m.n_heads:
            _fail("model.n_heads", m.n_heads,
                  f"a divisor of model.d_model={m.d_model} (or set model.head_dim)")
        if m.kv_heads > m.n_heads or m.n_heads % m.kv_heads:
            _fail("model.n_kv_heads", m.n_kv_heads,
                  f"a divisor of model.n_heads={m.n_heads} (GQA groups)")
        if m.is_mla:
            self._validate_mla()
        else:
            for n in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                      "v_head_dim"):
                if getattr(m, n) not in (None, 0):
                    _fail(f"model.{n}", getattr(m, n), "null with model.attention=mha (it "
                          "configures multi-head latent attention: set model.attention=mla)")
        if not m.is_mla and m.hdim % 2:
            _fail("model.head_dim", m.hdim, "an even head dimension (RoPE rotates pairs)")
        if m.first_k_dense > m.n_layers:
            _fail("model.first_k_dense", m.first_k_dense, f"<= model.n_layers={m.n_layers}")

    def _validate_mla(self) -> None:
        """Multi-head latent attention's fields (model.attention=mla)."""
        m = self.model
        _non_negative("model", m, "q_lora_rank", "qk_nope_head_dim")
        for n in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(m, n) is None or getattr(m, n) <= 0:
                _fail(f"model.{n}", getattr(m, n), "a value > 0 with model.attention=mla")
        if m.qk_nope_head_dim is None:
            _fail("model.qk_nope_head_dim", None, "a value >= 0 with model.attention=mla")
        if m.qk_rope_head_dim % 2:
            _fail("model.qk_rope_head_dim", m.qk_rope_head_dim,
                  "an even size (RoPE rotates pairs)")
        if m.n_kv_heads is not None and m.n_kv_heads != m.n_heads:
            _fail("model.n_kv_heads", m.n_kv_heads, "null (or = model.n_heads) with "
                  "model.attention=mla: keys and values come per head from the latent")
        if m.head_dim is not None:
            _fail("model.head_dim", m.head_dim, "null with model.attention=mla (set "
                  "model.qk_nope_head_dim, qk_rope_head_dim and v_head_dim)")

    def _validate_moe(self) -> None:
        m, e = self.model, self.moe
        _non_negative("moe", e, "n_routed", "n_shared", "route_scale", "gamma", "alpha",
                      "aux_loss_coef", "z_loss_coef")
        if not e.enabled:
            return
        _positive("moe", e, "expert_ffn_dim", "top_k", "n_groups", "topk_groups", "route_scale")
        if e.top_k > e.n_routed:
            _fail("moe.top_k", e.top_k, f"<= moe.n_routed={e.n_routed}")
        if e.n_routed % e.n_groups:
            _fail("moe.n_groups", e.n_groups, f"a divisor of moe.n_routed={e.n_routed}")
        if e.topk_groups > e.n_groups:
            _fail("moe.topk_groups", e.topk_groups, f"<= moe.n_groups={e.n_groups}")
        per_group = e.n_routed // e.n_groups
        if e.top_k > e.topk_groups * per_group:
            _fail("moe.top_k", e.top_k,
                  f"<= moe.topk_groups * experts per group = {e.topk_groups}*{per_group}")
        if m.first_k_dense == m.n_layers and self.mtp.depth == 0:
            _fail("model.first_k_dense", m.first_k_dense,
                  f"< model.n_layers={m.n_layers} when moe.n_routed > 0 "
                  "(set moe.n_routed=0 for a dense model)")

    def _validate_mtp(self) -> None:
        _non_negative("mtp", self.mtp, "depth", "weight", "weight_late")
        if not 0.0 <= self.mtp.switch_at <= 1.0:
            _fail("mtp.switch_at", self.mtp.switch_at, "a fraction in [0, 1]")

    def _validate_data(self) -> None:
        m, d = self.model, self.data
        _positive("data", d, "tokenizer_sample_bytes", "workers")
        if not d.text_field:
            _fail("data.text_field", d.text_field, "a non-empty field/column name")
        if not 0.0 < d.val_fraction < 1.0:
            _fail("data.val_fraction", d.val_fraction, "a fraction in (0, 1)")
        if d.tokenizer == "bytes" and m.vocab_size < 257:
            _fail("model.vocab_size", m.vocab_size, ">= 257 with data.tokenizer=bytes")
        if d.tokenizer == "bpe" and m.vocab_size < 300:
            _fail("model.vocab_size", m.vocab_size, ">= 300 with data.tokenizer=bpe "
                  "(256 byte symbols + merges + special tokens)")

    def _validate_train(self) -> None:
        t = self.train
        _positive("train", t, "seq_len", "micro_batch_size", "grad_accum", "max_steps",
                  "token_budget", "flop_budget", "lr", "log_every", "eval_every",
                  "eval_batches", "ckpt_every", "peak_flops", "eps")
        _non_negative("train", t, "warmup_steps", "weight_decay", "grad_clip", "seed")
        if t.max_steps is None and t.token_budget is None and t.flop_budget is None:
            _fail("train.max_steps", None, "a stopping rule: set train.max_steps, "
                  "train.token_budget or train.flop_budget")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            _fail("train.min_lr_ratio", t.min_lr_ratio, "a fraction in [0, 1]")
        for i, b in enumerate(t.betas):
            if not 0.0 <= b < 1.0:
                _fail(f"train.betas[{i}]", b, "a value in [0, 1)")
        if t.zero_stage not in (0, 1, 2):
            _fail("train.zero_stage", t.zero_stage, "one of 0, 1, 2")

    def _validate_parallel(self) -> None:
        m, e, p = self.model, self.moe, self.parallel
        _positive("parallel", p, "tp", "ep", "timeout_s")
        if p.tp > 1:
            if m.n_heads % p.tp or m.kv_heads % p.tp:
                _fail("parallel.tp", p.tp, f"a divisor of model.n_heads={m.n_heads} "
                      f"and model.n_kv_heads={m.kv_heads}")
            if m.ffn_dim % p.tp:
                _fail("parallel.tp", p.tp, f"a divisor of model.ffn_dim={m.ffn_dim}")
            if e.enabled and e.n_shared and (e.n_shared * e.expert_ffn_dim) % p.tp:
                _fail("parallel.tp", p.tp, f"a divisor of the shared experts' width moe.n_shared x "
                      f"moe.expert_ffn_dim = {e.n_shared * e.expert_ffn_dim}")
        if p.ep > 1:
            if not e.enabled:
                _fail("parallel.ep", p.ep, "1 for a dense model (moe.n_routed=0)")
            if e.n_routed % p.ep:
                _fail("parallel.ep", p.ep, f"a divisor of moe.n_routed={e.n_routed}")

    # ---------------------------------------------------------------- io
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        d = self.to_dict()
        d["train"]["betas"] = list(d["train"]["betas"])
        return yaml.safe_dump(d, sort_keys=False)

    @property
    def is_moe(self) -> bool:
        return self.moe.enabled


def _fail(field_name: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{field_name}={value!r} is invalid: allowed {allowed}")


def _positive(section: str, obj: Any, *names: str) -> None:
    """Fail on the first of ``names`` (in order) set to a value <= 0 (None passes)."""
    for n in names:
        v = getattr(obj, n)
        if v is not None and v <= 0:
            _fail(f"{section}.{n}", v, "a value > 0")


def _non_negative(section: str, obj: Any, *names: str) -> None:
    """Fail on the first of ``names`` (in order) set to a value < 0 (None passes)."""
    for n in names:
        v = getattr(obj, n)
        if v is not None and v < 0:
            _fail(f"{section}.{n}", v, "a value >= 0")


# --------------------------------------------------------------------------------------
# Fingerprint: what decides a run's result
# --------------------------------------------------------------------------------------

# The sections whose fields decide what a run computes; within them, the fields that only
# change what is logged or saved, where, or how fast, are left out.
FINGERPRINT_SECTIONS = ("model", "moe", "mtp", "data", "train")
FINGERPRINT_IGNORES = frozenset({
    "train.log_every", "train.eval_every", "train.eval_at_start", "train.ckpt_every",
    "train.tensorboard", "train.peak_flops", "train.cpu_keep_freed_memory", "data.cache_dir",
    "data.workers",  # the prepared data is the same whatever the number of workers
    # a bad record stops an "error" run before training, so a finished run's data is the
    # same under either setting
    "data.on_bad_record"})
# Fields added after fingerprints were first recorded count only when set away from their
# default, so the records of runs trained before they existed stay valid.
FINGERPRINT_NEW_DEFAULTS = {"data.text_field": DataConfig.text_field,
                            "data.tokenizer_sample_bytes": DataConfig.tokenizer_sample_bytes}


def fingerprint_fields(cfg: "Config | dict") -> dict:
    """The flat ``section.field -> value`` map a run's result depends on (JSON types), from
    a :class:`Config` or its ``to_dict()`` / saved ``config.yaml`` form."""
    import json

    d = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    flat = flatten({sec: d[sec] for sec in FINGERPRINT_SECTIONS if isinstance(d.get(sec), dict)})
    out = {k: v for k, v in flat.items() if k not in FINGERPRINT_IGNORES
           and not (k in FINGERPRINT_NEW_DEFAULTS and v == FINGERPRINT_NEW_DEFAULTS[k])}
    return json.loads(json.dumps(out))  # tuples -> lists: the same value as read back


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (nested mappings, in order)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_fields(old: dict, new: dict, limit: int,
                   ignore: frozenset = frozenset()) -> tuple[list[str], str]:
    """The flat keys whose values differ (sorted, ``ignore`` left out) and a message
    naming the first ``limit`` of them: ``"k: old -> new, ... (+N more)"``."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in ignore)
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit])
    return keys, shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def fingerprint_of_fields(fields: dict) -> str:
    import hashlib
    import json

    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def config_fingerprint(cfg: "Config | dict") -> str:
    """sha256 of the canonical JSON of :func:`fingerprint_fields`: equal for two configs
    exactly when they train the same thing (output paths and logging do not count)."""
    return fingerprint_of_fields(fingerprint_fields(cfg))


# --------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (tuple, list):
        return f"a list of {', '.join(_type_name(a) for a in typing.get_args(tp) if a is not ...)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(path, value, tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            _fail(path, value, _type_name(tp))
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(path, value, f"a list of {len(args)} numbers")
        return tuple(_coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            _fail(path, value, f"a list of {_type_name(item)}")
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{path}[{i}].") for i, v in enumerate(value)]
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, value, "true or false")
        return value
    if tp is int:
        return _coerce_int(path, value)
    if tp is float:
        return _coerce_float(path, value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, value, "a string")
        return value
    raise TypeError(f"unsupported annotation {tp} at {path}")  # programming error


def _coerce_union(path: str, value: Any, tp: Any) -> Any:
    """The first of the union's types that ``value`` passes (null where it allows None)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(path, value, a)
        except ConfigError:
            continue
    _fail(path, value, _type_name(tp))


def _coerce_int(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # 1e6 in YAML is a string/float; accept integral floats written in e-notation
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        _fail(path, value, "an integer")
    return value


def _coerce_float(path: str, value: Any) -> float:
    if isinstance(value, bool):
        _fail(path, value, "a number")
    if isinstance(value, (int, float)):
        if not math.isfinite(float(value)):
            _fail(path, value, "a finite number")
        return float(value)
    if isinstance(value, str):  # PyYAML reads "1e-3" as a string (YAML 1.1)
        try:
            f = float(value)
        except ValueError:
            _fail(path, value, "a number")
        if not math.isfinite(f):
            _fail(path, value, "a finite number")
        return f
    _fail(path, value, "a number")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        _fail(prefix.rstrip("."), data, "a mapping of fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{prefix}{key} is not a known field{hint}; "
                              f"allowed: {', '.join(names)}")
        tp = hints[key]
        if typing.get_origin(tp) in (Union, types.UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            if value is None:
                kwargs[key] = None
                continue
            if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
                tp = inner[0]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


def build_dataclass(cls: type, data: dict, prefix: str = ""):
    """Build any config dataclass from plain data with the same type checks and
    field-naming errors as :class:`Config` (used by ladder configs)."""
    return _build(cls, data, prefix)


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from nested plain data."""
    return _build(Config, data, "").validate()


# --------------------------------------------------------------------------------------
# YAML loading and overrides
# --------------------------------------------------------------------------------------


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first, again):
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first.line + 1} "
                         f"and {again.line + 1})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one
    silently). Keys merged in with ``<<`` may still be overridden, as YAML intends."""


def _construct_unique_mapping(loader, node, deep=False):
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], key_node.start_mark)
            except TypeError:  # unhashable: SafeConstructor reports it
                continue
            seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_unique_mapping)


def load_yaml_text(text: str):
    """``yaml.safe_load`` that raises on duplicate mapping keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path)!r}: 'base' chain loops back to itself")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte "
                          f"0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        data = load_yaml_text(text)
    except _DuplicateKey as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}; remove one") from None
    except yaml.YAMLError as exc:
        msg = " ".join(str(exc).split())  # one line
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, "
                          f"not a {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise ConfigError(f"config file {str(path)!r}: base={base!r} is invalid: allowed the "
                          "path (a string) of the config file it extends")
    if base is not None:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        data = _deep_merge(read_yaml(base_path, seen + (path.resolve(),)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"moe.top_k=4"`` -> (["moe", "top_k"], 4). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        if raw.strip()[:1] in ("'", '"'):  # a quoted value that YAML cannot close
            raise ConfigError(f"override {text!r} has unbalanced quotes") from None
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for ov in overrides:
        keys, value = parse_override(ov)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: {k} is not a section")
            node[k] = dict(nxt)
            node = node[k]
        node[keys[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (following ``base:``), apply ``key.sub=value`` overrides, validate."""
    data = read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(data)
