"""Dense building blocks: rotary embeddings, causal GQA attention, multi-head latent
attention (MLA), SwiGLU FFN.

Shape legend: B batch, S sequence, D d_model, H query heads, G kv heads, Hd head dim,
F FFN hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Rotary(nn.Module):
    """RoPE (rotate-half convention). The cos/sin tables are cached per device and grown to
    at least twice their length when a longer one is asked for; a shorter length gets their
    first rows (bitwise the same values: each row depends on its position alone).
    Incremental decoding asks for one more position every token, so it rebuilds the tables
    O(log length) times instead of every token."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict = {}  # device -> (cos, sin) of the longest length so far

    def tables(self, S: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        have = self._cache.get(key)
        if have is None or have[0].shape[0] < S:
            n = S if have is None else max(S, 2 * have[0].shape[0])
            inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device,
                                                     dtype=torch.float32) / self.head_dim))
            ang_SHd2 = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)
            ang_SHd = torch.cat([ang_SHd2, ang_SHd2], dim=-1)
            have = self._cache[key] = (ang_SHd.cos(), ang_SHd.sin())
        return have[0][:S], have[1][:S]

    # Named ``rotate``, not ``apply``: a method called ``apply`` would shadow
    # nn.Module.apply(fn), which DeepSpeed (and model.apply(init_fn) users) call.
    @staticmethod
    def rotate(x_BHSHd: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
        half = x_BHSHd.shape[-1] // 2
        x1, x2 = x_BHSHd[..., :half], x_BHSHd[..., half:]
        rot = torch.cat([-x2, x1], dim=-1)
        return (x_BHSHd.float() * cos_SHd + rot.float() * sin_SHd).to(x_BHSHd.dtype)


class KVCache:
    """One attention layer's keys and values (B, heads, T, dim) for incremental decoding;
    ``truncate(n)`` drops positions >= n (a rejected speculative token)."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def truncate(self, n: int) -> None:
        if self.k is not None:
            self.k, self.v = self.k[:, :, :n], self.v[:, :, :n]


def _positions(rotary: "Rotary", pos: int, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of positions pos .. pos + S - 1."""
    cos, sin = rotary.tables(pos + S, device)
    return cos[pos:], sin[pos:]


def _attend(q, k, v, pos: int, **kw) -> torch.Tensor:
    """Causal SDPA of S new queries at positions pos.. over T = pos + S keys.

    bf16 on CPU attends in fp32 (inputs cast up, the output back down): torch's CPU flash
    attention backward in bf16 took 38.7 ms a step against 7.7 ms in fp32 at the CPU
    ladder's largest size (benchmarks/results/ladder_step_cpu.jsonl, s9-dense), five
    times slower for the same work."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return _attend(q.float(), k.float(), v.float(), pos, **kw).to(q.dtype)
    S, T = q.shape[2], k.shape[2]
    if pos == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    if S == 1:  # one new query sees every cached key
        return F.scaled_dot_product_attention(q, k, v, **kw)
    allowed = torch.arange(T, device=q.device)[None, :] <= (pos + torch.arange(S, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **kw)


class Attention(nn.Module):
    """Causal multi-head / grouped-query attention with RoPE, through SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.hdim
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)
        self.rotary = Rotary(self.hd, cfg.rope_theta)

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        # Local head counts come from the projection widths, so a tensor-parallel wrapper
        # that shards wq/wk/wv by heads needs no change here.
        q = self.wq(x_BSD).view(B, S, -1, self.hd).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, -1, self.hd).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, -1, self.hd).transpose(1, 2)
        pos = cache.length if cache is not None else 0
        cos, sin = _positions(self.rotary, pos, S, x_BSD.device)
        q, k = Rotary.rotate(q, cos, sin), Rotary.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        o = _attend(q, k, v, pos, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


def rotate_interleaved(x: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's released MLA weights
    lay out the rotary dims; the result is written de-interleaved (evens then odds), which
    is the same permutation for queries and keys, so their dot products are those of the
    interleaved rotation (transformers' ``apply_rotary_pos_emb_interleave``)."""
    half = x.shape[-1] // 2
    cos, sin = cos_SHd[..., :half], sin_SHd[..., :half]
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    q = wq(x) or wq_b(RMSNorm(wq_a(x))) split per head into a no-RoPE and a RoPE part;
    [c_kv, k_rope] = wkv_a(x); [k_nope, v] = wkv_b(RMSNorm(c_kv)) per head; the RoPE key
    is one head broadcast to all; softmax scale (qk_nope + qk_rope)^-0.5 (DeepSeek's;
    YaRN's mscale only applies with rope scaling, which this project does not model).
    The latent norms use eps 1e-6 as DeepSeek's reference and transformers do. Local head
    counts come from wkv_b's width, so tensor parallelism shards wq / wq_b / wkv_b by heads
    (column) and wo by its input (row) and replicates the latent projections.
    """

    NORM_EPS = 1e-6

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, d = cfg.n_heads, cfg.d_model
        self.nope, self.rope, self.vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk = self.nope + self.rope
        self.kv_rank = cfg.kv_lora_rank
        if cfg.q_rank:
            self.wq_a = nn.Linear(d, cfg.q_rank, bias=False)
            self.q_norm = nn.RMSNorm(cfg.q_rank, eps=self.NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_rank, H * self.qk, bias=False)
        else:
            self.wq = nn.Linear(d, H * self.qk, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_rank + self.rope, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_rank, eps=self.NORM_EPS)
        self.wkv_b = nn.Linear(self.kv_rank, H * (self.nope + self.vd), bias=False)
        self.wo = nn.Linear(H * self.vd, d, bias=False)
        self.rotary = Rotary(self.rope, cfg.rope_theta)
        self.scale = self.qk ** -0.5
        # Tensor parallelism sets this to megatron's copy-to-TP-region (identity forward,
        # all-reduce backward): the shared RoPE key feeds every head, but each rank holds
        # only its heads, so its gradient must be summed over the ranks.
        self.shared_key_hook = None

    def query(self, x_BSD: torch.Tensor) -> torch.Tensor:
        q = self.wq_b(self.q_norm(self.wq_a(x_BSD))) if hasattr(self, "wq_b") else self.wq(x_BSD)
        B, S, _ = x_BSD.shape
        return q.view(B, S, -1, self.qk).transpose(1, 2)

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.query(x_BSD)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.wkv_a(x_BSD).split([self.kv_rank, self.rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(c_kv)).view(B, S, -1, self.nope + self.vd).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        pos = cache.length if cache is not None else 0
        cos, sin = _positions(self.rotary, pos, S, x_BSD.device)
        q_rope = rotate_interleaved(q_rope, cos, sin)
        if self.shared_key_hook is not None:
            k_rope = self.shared_key_hook(k_rope)
        k_rope = rotate_interleaved(k_rope.unsqueeze(1), cos, sin)  # (B, 1, S, rope)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        if cache is not None:  # expanded keys/values (simple; the latent would be smaller)
            k, v = cache.append(k, v)
        o = _attend(q, k, v, pos, scale=self.scale)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


def make_attention(cfg: ModelConfig) -> nn.Module:
    """The configured attention: GQA/MHA (``model.attention: mha``) or MLA."""
    return MLAttention(cfg) if cfg.is_mla else Attention(cfg)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x). Separate w1/w3 so tensor parallelism can split each by columns."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
