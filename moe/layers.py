"""Dense building blocks: RMSNorm, rotary embeddings, causal GQA attention, SwiGLU FFN.

Shape legend: B batch, S sequence, D d_model, H query heads, G kv heads, Hd head dim,
F FFN hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Rotary(nn.Module):
    """RoPE (rotate-half convention); cos/sin tables cached per (length, device)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict = {}

    def tables(self, S: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (S, str(device))
        if key not in self._cache:
            inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device,
                                                     dtype=torch.float32) / self.head_dim))
            ang_SHd2 = torch.outer(torch.arange(S, device=device, dtype=torch.float32), inv)
            ang_SHd = torch.cat([ang_SHd2, ang_SHd2], dim=-1)
            self._cache = {key: (ang_SHd.cos(), ang_SHd.sin())}  # keep one entry: lengths repeat
        return self._cache[key]

    # Named ``rotate``, not ``apply``: a method called ``apply`` would shadow
    # nn.Module.apply(fn), which DeepSpeed (and model.apply(init_fn) users) call.
    @staticmethod
    def rotate(x_BHSHd: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
        half = x_BHSHd.shape[-1] // 2
        x1, x2 = x_BHSHd[..., :half], x_BHSHd[..., half:]
        rot = torch.cat([-x2, x1], dim=-1)
        return (x_BHSHd.float() * cos_SHd + rot.float() * sin_SHd).to(x_BHSHd.dtype)


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

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        # Local head counts come from the projection widths, so a tensor-parallel wrapper
        # that shards wq/wk/wv by heads needs no change here.
        q = self.wq(x_BSD).view(B, S, -1, self.hd).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, -1, self.hd).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, -1, self.hd).transpose(1, 2)
        cos, sin = self.rotary.tables(S, x_BSD.device)
        q, k = Rotary.rotate(q, cos, sin), Rotary.rotate(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x). Separate w1/w3 so tensor parallelism can split each by columns."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
