"""The DeepSeek-V3-style MoE transformer with multi-token prediction, for ONE device.

Parallelism (tensor, expert, data) is applied from outside (moe/parallel), never here.

Shape legend: B batch, S sequence (positions predicted), L = S + 1 + depth tokens fed,
D d_model, V vocab.

Input convention: ``forward(tokens_BL)`` takes sequences of S + 1 + mtp_depth tokens.
The main model reads tokens[:, :S] and predicts tokens[:, 1:S+1]. MTP module k
(1 <= k <= depth) at position i combines RMSNorm(Emb(t_{i+k})) and RMSNorm(h^{k-1}_i)
-- embedding FIRST, as in the released weights, megatron-core and torchtitan -- and
predicts t_{i+k+1}. So every depth has S valid positions and each depth's loss is the mean
over its own B*S targets. h^0 is the main model's last hidden state BEFORE its final norm
(torchtitan's choice; the module normalises it itself). Embedding and output head are
shared with the main model; each MTP module has its own projection, block and final norm.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .layers import SwiGLU, make_attention
from .moe_layer.layer import MoEFeedForward


class Block(nn.Module):
    """Pre-norm transformer block; the FFN is dense SwiGLU or MoE."""

    def __init__(self, cfg: Config, moe: bool):
        super().__init__()
        m = cfg.model
        self.attn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.attn = make_attention(m)
        self.ffn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.is_moe = moe
        self.ffn = MoEFeedForward(m.d_model, cfg.moe) if moe else SwiGLU(m.d_model, m.ffn_dim)

    def forward(self, x_BSD: torch.Tensor, cache=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        h = x_BSD + self.attn(self.attn_norm(x_BSD), cache)
        if self.is_moe:
            f, bal = self.ffn(self.ffn_norm(h))
            return h + f, bal
        return h + self.ffn(self.ffn_norm(h)), None


class MTPModule(nn.Module):
    def __init__(self, cfg: Config, moe: bool):
        super().__init__()
        d = cfg.model.d_model
        self.emb_norm = nn.RMSNorm(d, eps=cfg.model.norm_eps)
        self.hidden_norm = nn.RMSNorm(d, eps=cfg.model.norm_eps)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, moe)
        self.out_norm = nn.RMSNorm(d, eps=cfg.model.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.layers = nn.ModuleList(
            Block(cfg, moe=cfg.is_moe and i >= m.first_k_dense) for i in range(m.n_layers))
        self.norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight
        # MTP blocks use the FFN kind of the main model's last layer (MoE in V3).
        last_moe = cfg.is_moe and m.n_layers > m.first_k_dense
        self.mtp = nn.ModuleList(MTPModule(cfg, last_moe) for _ in range(cfg.mtp.depth))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; output projections scaled by 1/sqrt(2 n_layers)
        (GPT-2) so the residual stream does not grow with depth; norms at 1."""
        std = self.cfg.model.init_std
        out_std = std / math.sqrt(2 * self.cfg.model.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", "w2_EFD")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------------ helpers
    def moe_layers(self) -> list[MoEFeedForward]:
        return [mod for mod in self.modules() if isinstance(mod, MoEFeedForward)]

    def update_expert_bias(self, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """Apply the aux-loss-free bias update in every MoE layer; call once per optimizer step.

        All layers' counts go through ONE all-reduce (concatenated) to keep collectives few.
        """
        layers = self.moe_layers()
        if not layers:
            return
        if all_reduce is not None:
            stacked = torch.cat([l.tokens_acc_E for l in layers])
            stacked = all_reduce(stacked)
            sizes = [l.n_experts for l in layers]
            for l, c in zip(layers, torch.split(stacked, sizes)):
                l.tokens_acc_E.copy_(c)
        for l in layers:
            l.update_expert_bias()

    def moe_stats(self) -> dict:
        """Per-MoE-layer MaxVio and token-count histograms of the latest forward."""
        out = {"maxvio": [], "counts": [], "losses": []}
        for l in self.moe_layers():
            out["maxvio"].append(l.max_violation())
            out["counts"].append(l.last_counts_E.tolist() if l.last_counts_E is not None else [])
            out["losses"].append(dict(l.last_losses))
        return out

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def logits(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Main-head logits (B, S, V) for every position of ``tokens_BS`` (no loss, no MTP):
        for evaluation in a notebook (``moe.load_model``)."""
        if tokens_BS.dim() != 2 or tokens_BS.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor (batch, length), got "
                             f"{tuple(tokens_BS.shape)} {tokens_BS.dtype}")
        return self.head(self.norm(self.hidden(tokens_BS.long())))

    def hidden(self, tokens_BS: torch.Tensor, caches=None) -> torch.Tensor:
        """The last block's output (before the final norm) for every position; with
        ``caches`` (one moe.layers.KVCache per layer) the tokens continue the cached ones."""
        h = self.embed(tokens_BS)
        for i, layer in enumerate(self.layers):
            h, _ = layer(h, None if caches is None else caches[i])
        return h

    def mtp_hidden(self, k: int, next_tokens_BS: torch.Tensor, prev_BSD: torch.Tensor,
                   cache=None) -> torch.Tensor:
        """MTP module k (0-based): its hidden state at each position from the embeddings of
        the tokens one step ahead and the previous depth's hidden states (see forward)."""
        mod = self.mtp[k]
        hk = mod.proj(torch.cat([mod.emb_norm(self.embed(next_tokens_BS)),
                                 mod.hidden_norm(prev_BSD)], dim=-1))
        hk, _ = mod.block(hk, cache)
        return hk

    def mtp_logits(self, k: int, hk_BSD: torch.Tensor) -> torch.Tensor:
        return self.head(self.mtp[k].out_norm(hk_BSD))

    def forward(self, tokens_BL: torch.Tensor, *, mtp: bool = True,
                mtp_weight: Optional[float] = None) -> dict:
        """Returns a dict: loss (to backpropagate), lm_loss, mtp_losses (list, one per
        depth), balance_loss (sum over MoE layers), logits (main head)."""
        if tokens_BL.dim() != 2 or tokens_BL.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor (batch, length), got "
                             f"{tuple(tokens_BL.shape)} {tokens_BL.dtype}")
        depth = len(self.mtp) if mtp else 0
        S = tokens_BL.shape[1] - 1 - depth
        if S < 1:
            raise ValueError(f"sequence of {tokens_BL.shape[1]} tokens is too short: needs at "
                             f"least {2 + depth} (1 input + 1 target + {depth} MTP look-ahead)")
        tokens_BL = tokens_BL.long()
        h = self.embed(tokens_BL[:, :S])
        balance = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, bal = layer(h)
            if bal is not None:
                balance = balance + bal
        logits = self.head(self.norm(h))
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), tokens_BL[:, 1:S + 1].flatten())

        mtp_losses = []
        prev = h
        for k, mod in enumerate(self.mtp[:depth], start=1):
            emb = self.embed(tokens_BL[:, k:k + S])
            hk = mod.proj(torch.cat([mod.emb_norm(emb), mod.hidden_norm(prev)], dim=-1))
            hk, bal = mod.block(hk)
            if bal is not None:
                balance = balance + bal
            lk = self.head(mod.out_norm(hk))
            mtp_losses.append(F.cross_entropy(lk.float().flatten(0, 1),
                                              tokens_BL[:, k + 1:k + 1 + S].flatten()))
            prev = hk

        loss = lm_loss + balance
        if mtp_losses:
            lam = self.cfg.mtp.weight if mtp_weight is None else mtp_weight
            loss = loss + (lam / len(mtp_losses)) * torch.stack(mtp_losses).sum()
        return {"loss": loss, "lm_loss": lm_loss, "mtp_losses": mtp_losses,
                "balance_loss": balance, "logits": logits}


def build_model(cfg: Config, device: torch.device | str | None = None) -> Transformer:
    """Build the single-device model (``device='meta'`` for shape-only instances)."""
    cfg.validate()
    if device is None:
        return Transformer(cfg)
    with torch.device(device):
        return Transformer(cfg)
