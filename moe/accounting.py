"""Parameter and FLOP accounting from the config alone (no module is built).

Conventions (docs/anchors.md, "Scaling-law conventions"):
  * ``*_nonembed`` (Kaplan): excludes the vocabulary matrices -- the input embedding and
    the output head (which is the same matrix when tied). Norm gains are included.
  * ``*`` plain totals (Chinchilla): every parameter, embeddings included.
  * ``active``: parameters touched per token -- all dense parts plus the router, the
    shared experts and top_k of the routed experts in each MoE layer.
  * MTP modules are counted separately (``mtp``, ``mtp_active``); ``total`` and
    ``active`` describe the main model, ``total_with_mtp`` equals sum(p.numel()) of the
    built module (tied weights counted once).

FLOPs per token are exact matmul FLOPs (2 per multiply-add) of the main model:
  * every weight matmul of the active path, the router and the output head included;
  * attention scores and values over the causal context: position i attends to i + 1
    keys, so a sequence of S positions does sum_i (i+1) = S(S+1)/2 key visits; per token
    that is (S+1)/2 keys x 2 matmuls (QK^T, AV) x 2 FLOPs x n_heads x head_dim;
  * training = 3 x forward (backward = 2 x forward for every matmul);
  * MTP modules are added to the training FLOPs when ``include_mtp``.
Element-wise work (norms, activations, softmax) is not counted: it is not matmul work
and contributes < 1% at the widths where MFU is quoted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import Config


@dataclass
class ParamCounts:
    total: int
    active: int
    embedding: int  # vocabulary matrices (input embedding + untied head)
    total_nonembed: int
    active_nonembed: int
    mtp: int
    mtp_active: int
    total_with_mtp: int
    routed_experts: int  # parameters in routed experts (main model)
    n_moe_layers: int
    flops_per_token_fwd: float  # main model forward at the given seq_len
    flops_per_token_train: float  # 3 x forward (+ MTP when included)
    seq_len: int

    def as_dict(self) -> dict:
        return asdict(self)


def _attn_params(cfg: Config) -> int:
    """Attention parameters of one block, latent norms (MLA) included."""
    m = cfg.model
    if not m.is_mla:
        return m.d_model * m.n_heads * m.hdim * 2 + m.d_model * m.kv_heads * m.hdim * 2
    d, H, r_q, r_kv = m.d_model, m.n_heads, m.q_rank, m.kv_lora_rank
    q = (d * r_q + r_q + r_q * H * m.qk_head_dim) if r_q else d * H * m.qk_head_dim
    kv = d * (r_kv + m.qk_rope_head_dim) + r_kv + r_kv * H * (m.qk_nope_head_dim + m.v_dim)
    return q + kv + H * m.v_dim * d


def _attn_norm_params(cfg: Config) -> int:
    """Norm gains inside attention (MLA's latent RMSNorms): parameters, not matmul FLOPs."""
    m = cfg.model
    return (m.q_rank + m.kv_lora_rank) if m.is_mla else 0


def _dense_ffn(cfg: Config) -> int:
    return 3 * cfg.model.d_model * cfg.model.ffn_dim


def _moe_parts(cfg: Config) -> tuple[int, int, int]:
    """(total, active, routed) parameters of one MoE FFN."""
    d, e = cfg.model.d_model, cfg.moe
    expert = 3 * d * e.expert_ffn_dim
    router = d * e.n_routed
    shared = e.n_shared * expert
    return router + shared + e.n_routed * expert, router + shared + e.top_k * expert, e.n_routed * expert


def _attn_flops_per_token(cfg: Config, seq_len: int) -> float:
    m = cfg.model
    # QK^T over qk_head_dim and AV over v_dim per head, (S + 1) / 2 keys per token
    return 2 * m.n_heads * (m.qk_head_dim + m.v_dim) * (seq_len + 1) / 2


def count_params(cfg: Config, seq_len: int | None = None, include_mtp: bool = True) -> ParamCounts:
    """Exact parameter counts and matmul FLOPs per token for ``cfg`` (see module doc)."""
    m = cfg.model
    S = seq_len if seq_len is not None else cfg.train.seq_len
    d = m.d_model
    norm_block = 2 * d
    n_moe = m.n_layers - m.first_k_dense if cfg.is_moe else 0
    n_dense = m.n_layers - n_moe
    moe_total, moe_active, moe_routed = _moe_parts(cfg) if cfg.is_moe else (0, 0, 0)

    attn = _attn_params(cfg)
    dense_block = attn + _dense_ffn(cfg) + norm_block
    body_total = n_dense * dense_block + n_moe * (attn + norm_block + moe_total)
    body_active = n_dense * dense_block + n_moe * (attn + norm_block + moe_active)
    emb = m.vocab_size * d
    embedding = emb if m.tie_embeddings else 2 * emb
    final_norm = d
    total = embedding + body_total + final_norm
    active = embedding + body_active + final_norm

    last_moe = cfg.is_moe and m.n_layers > m.first_k_dense
    mtp_block_total = attn + norm_block + (moe_total if last_moe else _dense_ffn(cfg))
    mtp_block_active = attn + norm_block + (moe_active if last_moe else _dense_ffn(cfg))
    mtp_extra = 2 * d * d + 3 * d  # projection + emb/hidden/out norms
    D = cfg.mtp.depth
    mtp = D * (mtp_block_total + mtp_extra)
    mtp_active = D * (mtp_block_active + mtp_extra)

    # Forward matmul FLOPs per token: 2 x every active weight used in a matmul (the
    # embedding lookup is a gather, norms are not matmuls) + attention over the context.
    attn_ctx = _attn_flops_per_token(cfg, S)
    head = m.vocab_size * d
    attn_norms = _attn_norm_params(cfg)
    body_matmul = body_active - m.n_layers * (norm_block + attn_norms)
    fwd = 2 * (body_matmul + head) + m.n_layers * attn_ctx
    mtp_fwd = D * (2 * (mtp_block_active - norm_block - attn_norms + 2 * d * d + head)
                   + attn_ctx)
    train = 3 * (fwd + (mtp_fwd if include_mtp else 0))
    return ParamCounts(
        total=total, active=active, embedding=embedding,
        total_nonembed=total - embedding, active_nonembed=active - embedding,
        mtp=mtp, mtp_active=mtp_active, total_with_mtp=total + mtp,
        routed_experts=n_moe * moe_routed, n_moe_layers=n_moe,
        flops_per_token_fwd=float(fwd), flops_per_token_train=float(train), seq_len=S,
    )


GIB = 2 ** 30


def bytes_per_param(precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) bytes per parameter in training with AdamW."""
    if precision == "fp32":
        return 4, 4, 8
    return 2, 2, 12  # bf16 mixed precision: bf16 weights/grads, fp32 master + Adam m, v


#: bytes per parameter that training holds at least once across all ranks, whatever the
#: precision (16 for both: fp32 4 + 4 + 8, bf16 2 + 2 + 12); ZeRO only shards them
TRAIN_BYTES_PER_PARAM = min(sum(bytes_per_param(p)) for p in ("fp32", "bf16"))


def train_memory_lower_bound(cfg: Config, world: int = 1, tp: int = 1) -> dict:
    """A lower bound on one rank's training memory, from the config's own accounting.

    Optimistic on purpose (a guard that refuses only what cannot fit): the parameter state
    (``TRAIN_BYTES_PER_PARAM`` x every parameter, MTP included) is taken as perfectly
    sharded over ``world`` ranks, and activations as one 2-byte residual stream per layer
    per token of a micro batch (split over ``tp``), with nothing else saved for backward.
    Returns bytes: ``params``, ``state``, ``activations``, ``total``."""
    c = count_params(cfg)
    n = c.total_with_mtp
    state = n * TRAIN_BYTES_PER_PARAM / max(1, world)
    tokens = cfg.train.micro_batch_size * (cfg.train.seq_len + cfg.mtp.depth)
    acts = tokens * (cfg.model.n_layers + cfg.mtp.depth) * cfg.model.d_model * 2 / max(1, tp)
    return {"params": n, "state": state, "activations": acts, "total": state + acts}
