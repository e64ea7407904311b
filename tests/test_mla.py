"""Multi-head latent attention: config, parameter/FLOP accounting, the DeepSeek-V3 count."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe.accounting import count_params
from moe.config import ConfigError, load_config
from moe.model import build_model

ROOT = Path(__file__).resolve().parents[1]
MLA = ["model.attention=mla", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
       "model.qk_rope_head_dim=8", "model.v_head_dim=12"]


@pytest.mark.parametrize("q_rank", [None, 24])
def test_mla_accounting_equals_module_numel(q_rank):
    ov = MLA + ([f"model.q_lora_rank={q_rank}"] if q_rank else [])
    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", ov)
    model = build_model(cfg)
    c = count_params(cfg)
    assert c.total_with_mtp == sum(p.numel() for p in model.parameters())
    attn = model.layers[0].attn
    assert c.total - c.embedding - sum(p.numel() for n, p in model.named_parameters()
                                       if not n.startswith(("mtp", "embed", "head"))) == 0
    assert hasattr(attn, "wq_b") == bool(q_rank) and hasattr(attn, "wq") != bool(q_rank)


def test_deepseek_v3_preset_counts_and_flops():
    cfg = load_config(ROOT / "configs" / "deepseek-v3.yaml")
    c = count_params(cfg)
    assert c.total == 671_026_404_352  # transformers' DeepseekV3ForCausalLM (test below)
    assert cfg.model.is_mla and cfg.model.qk_head_dim == 192 and cfg.model.v_dim == 128
    # meta-device build: the module's numel, MTP included
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == c.total_with_mtp
    # forward FLOPs: 2 x matmul params (latent norms excluded) + head + attention context
    m, S = cfg.model, cfg.train.seq_len
    norms = 2 * m.d_model + m.q_lora_rank + m.kv_lora_rank
    body = c.active - c.embedding - m.d_model - m.n_layers * norms
    ctx = 2 * m.n_heads * (192 + 128) * (S + 1) / 2
    assert c.flops_per_token_fwd == 2 * (body + m.vocab_size * m.d_model) + m.n_layers * ctx


def test_deepseek_v3_count_equals_transformers():
    tf = pytest.importorskip("transformers")
    hf = tf.DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512,
        q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
        topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
        tie_word_embeddings=False)  # DeepSeek-V3's published config.json
    with torch.device("meta"):
        ref = tf.DeepseekV3ForCausalLM(hf)
    n = sum(p.numel() for p in ref.parameters())
    assert n == 671_026_404_352
    assert count_params(load_config(ROOT / "configs" / "deepseek-v3.yaml")).total == n


@pytest.mark.parametrize("ov, field", [
    (["model.attention=mla"], "model.kv_lora_rank"),
    (MLA[:-1], "model.v_head_dim"),
    (MLA + ["model.qk_rope_head_dim=7"], "model.qk_rope_head_dim"),
    (MLA + ["model.n_kv_heads=2"], "model.n_kv_heads"),
    (MLA + ["model.head_dim=32"], "model.head_dim"),
    (MLA + ["model.q_lora_rank=-1"], "model.q_lora_rank"),
    (["model.kv_lora_rank=32"], "model.kv_lora_rank"),  # an MLA field on an MHA model
])
def test_bad_mla_config_names_the_field(ov, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs" / "tiny-moe.yaml", ov)


def test_mla_trains_a_step_and_q_lora_zero_means_none():
    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", MLA + ["model.q_lora_rank=0"])
    assert cfg.model.q_rank == 0
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(torch.randint(0, cfg.model.vocab_size, (2, 18)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for n, p in model.named_parameters() if "attn" in n)
