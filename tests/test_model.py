"""Whole-model behaviour: MTP shifting and losses, accounting == real modules, training."""

import glob

import pytest
import torch
import torch.nn.functional as F

from moe import build_model, count_params, load_config

PRESETS = sorted(glob.glob("configs/*.yaml"))
SMALL = ["model.vocab_size=97", "model.d_model=32", "model.n_heads=4", "model.ffn_dim=48",
         "moe.n_routed=6", "moe.expert_ffn_dim=8", "moe.top_k=2", "moe.kernels=torch",
         "data.tokenizer=bytes", "model.vocab_size=300"]


def _small(*extra):
    torch.manual_seed(0)
    return build_model(load_config(None, SMALL + list(extra)))


@pytest.mark.parametrize("path", PRESETS)
def test_accounting_equals_module_for_every_preset(path):
    cfg = load_config(path)
    model = build_model(cfg, "meta")  # shapes only: DeepSeek-V3 does not fit in memory
    counts = count_params(cfg)
    assert counts.total_with_mtp == sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    assert counts.mtp == mtp
    assert counts.total == counts.total_with_mtp - mtp


@pytest.mark.parametrize("extra", [
    ["model.tie_embeddings=true"],
    ["model.n_kv_heads=2", "model.head_dim=6"],
    ["mtp.depth=2", "moe.n_shared=2"],
    ["moe.n_routed=0"],                    # dense
    ["model.first_k_dense=0", "mtp.depth=1"],
])
def test_accounting_variants(extra):
    cfg = load_config(None, SMALL + extra)
    model = build_model(cfg)
    c = count_params(cfg)
    assert c.total_with_mtp == sum(p.numel() for p in model.parameters())
    emb = model.embed.weight.numel() * (1 if cfg.model.tie_embeddings else 2)
    assert c.embedding == emb and c.total_nonembed == c.total - emb
    # active: count the parameters a single token touches by hooking the routed experts
    if cfg.is_moe:
        k, E = cfg.moe.top_k, cfg.moe.n_routed
        routed_per_layer = sum(p.numel() for p in (model.moe_layers()[0].w13_ED2F,
                                                  model.moe_layers()[0].w2_EFD))
        assert c.total - c.active == c.n_moe_layers * routed_per_layer * (E - k) // E
    else:
        assert c.active == c.total


def test_flops_match_a_hand_count():
    cfg = load_config(None, SMALL + ["train.seq_len=16"])
    c = count_params(cfg, include_mtp=False)
    m = cfg.model
    d, hd, H = m.d_model, m.hdim, m.n_heads
    attn_w = 4 * d * H * hd
    dense = attn_w + 3 * d * m.ffn_dim
    moe = attn_w + d * cfg.moe.n_routed + (cfg.moe.n_shared + cfg.moe.top_k) * 3 * d * cfg.moe.expert_ffn_dim
    per_layer_ctx = 4 * H * hd * (16 + 1) / 2
    fwd = 2 * (dense + 3 * moe + m.vocab_size * d) + 4 * per_layer_ctx
    assert c.flops_per_token_fwd == fwd
    assert c.flops_per_token_train == 3 * fwd


def test_mtp_losses_use_the_right_shifts():
    model = _small("mtp.depth=2")
    model.eval()
    B, S, D = 2, 9, 2
    tok = torch.randint(0, 300, (B, S + 1 + D))
    out = model(tok)
    assert len(out["mtp_losses"]) == 2 and out["logits"].shape == (B, S, 300)
    # recompute each depth by hand with the documented shifts
    h = model.embed(tok[:, :S])
    for layer in model.layers:
        h, _ = layer(h)
    torch.testing.assert_close(
        out["lm_loss"], F.cross_entropy(model.head(model.norm(h)).flatten(0, 1), tok[:, 1:S + 1].flatten()))
    prev = h
    for k, mod in enumerate(model.mtp, start=1):
        x = mod.proj(torch.cat([mod.emb_norm(model.embed(tok[:, k:k + S])), mod.hidden_norm(prev)], -1))
        x, _ = mod.block(x)
        ref = F.cross_entropy(model.head(mod.out_norm(x)).flatten(0, 1), tok[:, k + 1:k + 1 + S].flatten())
        torch.testing.assert_close(out["mtp_losses"][k - 1], ref)
        prev = x
    lam = model.cfg.mtp.weight
    total = out["lm_loss"] + out["balance_loss"] + lam / 2 * sum(out["mtp_losses"])
    torch.testing.assert_close(out["loss"], total)


def test_last_token_only_reaches_the_deepest_mtp_loss():
    model = _small("mtp.depth=2")
    model.eval()
    tok = torch.randint(0, 300, (1, 12))
    a = model(tok)
    tok2 = tok.clone()
    tok2[0, -1] = (tok[0, -1] + 1) % 300
    b = model(tok2)
    assert torch.equal(a["lm_loss"], b["lm_loss"])
    assert torch.equal(a["mtp_losses"][0], b["mtp_losses"][0])
    assert not torch.equal(a["mtp_losses"][1], b["mtp_losses"][1])


def test_mtp_off_and_bad_inputs():
    model = _small("mtp.depth=1")
    tok = torch.randint(0, 300, (2, 10))
    assert model(tok, mtp=False)["mtp_losses"] == []
    with pytest.raises(ValueError, match="too short"):
        model(tok[:, :2])
    with pytest.raises(ValueError, match="integer tensor"):
        model(tok.float())


@pytest.mark.parametrize("extra", [["moe.balancing=aux_free", "mtp.depth=1"],
                                   ["moe.balancing=aux_loss", "moe.z_loss_coef=1e-3"],
                                   ["moe.balancing=aux_free+seq_aux", "moe.n_groups=3",
                                    "moe.topk_groups=2"],
                                   ["moe.n_routed=0"]])
def test_model_trains_a_few_steps_on_random_tokens(extra):
    model = _small(*extra)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 300, (4, 34), generator=gen)  # one fixed batch: must be memorised
    losses = []
    for _ in range(30):
        out = model(tok)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_expert_bias()
        losses.append(out["lm_loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0
    stats = model.moe_stats()
    assert len(stats["maxvio"]) == len(model.moe_layers())


def test_update_expert_bias_all_reduces_once():
    model = _small("mtp.depth=1")
    model.train()
    model(torch.randint(0, 300, (2, 12)))
    calls = []

    def fake_all_reduce(t):
        calls.append(t.clone())
        return t

    model.update_expert_bias(all_reduce=fake_all_reduce)
    assert len(calls) == 1  # one collective for all layers (including the MTP block)
    assert calls[0].numel() == len(model.moe_layers()) * 6
    assert calls[0].dtype == torch.int64


def test_rotary_tables_grow_geometrically_and_slices_equal_fresh_tables():
    from moe.layers import Rotary

    rot, dev = Rotary(16, 10000.0), torch.device("cpu")
    builds = 0
    last = None
    for S in range(1, 130):  # incremental decoding: one more position per token
        cos, sin = rot.tables(S, dev)
        full = rot._cache[str(dev)][0]
        builds += full is not last
        last = full
        fresh = Rotary(16, 10000.0).tables(S, dev)
        assert cos.shape == (S, 16)
        assert torch.equal(cos, fresh[0]) and torch.equal(sin, fresh[1])  # bitwise
    assert builds == 9  # lengths 1, 2, 4, ..., 256: not one build per token


def test_bf16_attention_on_cpu_runs_in_fp32():
    """bf16 on CPU attends in fp32 (torch's bf16 CPU flash-attention backward measured 5x
    slower than fp32's): the output is the fp32 attention of the same inputs, rounded once."""
    import torch.nn.functional as F

    from moe.layers import _attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    out = _attend(q, k, v, 0)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
