"""Generation with a KV cache and MTP speculative decoding (moe/generate.py)."""
from __future__ import annotations

import json

import pytest
import torch

from moe.cli import main as cli_main
from moe.config import load_config
from moe.generate import GenerateError, generate
from moe.model import build_model

BASE = ["model.vocab_size=300", "data.tokenizer=bytes", "model.d_model=32", "model.n_layers=3",
        "model.n_heads=4", "model.ffn_dim=48", "moe.n_routed=8", "moe.n_shared=1",
        "moe.expert_ffn_dim=8", "moe.top_k=2", "mtp.depth=1", "moe.kernels=torch",
        "train.seq_len=64"]
MLA = ["model.attention=mla", "model.q_lora_rank=12", "model.kv_lora_rank=16",
       "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=6"]


def _model(ov=(), seed=0):
    cfg = load_config(None, BASE + list(ov))
    torch.manual_seed(seed)
    return build_model(cfg).eval(), cfg


def _greedy_no_cache(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model.logits(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_kv_cache_greedy_equals_full_recompute(attn):
    model, _ = _model(MLA if attn == "mla" else ["model.n_kv_heads=2"])
    prompt = [5, 17, 250, 3, 99, 42]
    res = generate(model, prompt, 20)
    assert res.tokens == _greedy_no_cache(model, prompt, 20)
    assert res.drafted is None and res.main_passes == 20


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_mtp_speculative_greedy_is_plain_greedy(attn):
    model, _ = _model(MLA if attn == "mla" else [])
    for seed in range(3):
        prompt = torch.randint(0, 300, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
        plain = generate(model, prompt, 40)
        spec = generate(model, prompt, 40, speculative="mtp")  # the untrained draft
        assert spec.tokens == plain.tokens
        assert spec.drafted >= 1 and 0 <= spec.accepted <= spec.drafted
        # every main pass yields 1 or 2 tokens: passes = 1 prefill + drafted
        assert spec.main_passes == 1 + spec.drafted


def test_speculative_accept_and_reject_paths_keep_greedy(monkeypatch):
    """An oracle draft (right two times in three, then wrong) drives both paths; the output
    stays the plain greedy one and the acceptance count is what the oracle allows."""
    model, _ = _model(MLA)
    prompt = [7, 8, 9, 10, 11]
    plain = generate(model, prompt, 30).tokens
    fed, calls = [0], [0]
    real_hidden = model.mtp_hidden

    def hidden(k, nxt, prev, cache=None):
        fed[0] += nxt.shape[1]  # MTP positions fed = main positions final = len(seq) - 1
        return real_hidden(k, nxt, prev, cache)

    def logits(k, h):
        calls[0] += 1
        i = fed[0] + 1 - len(prompt)  # index in the output of the token being drafted
        right = plain[i] if i < len(plain) else 0
        tok = right if calls[0] % 3 else (right + 1) % 300
        return torch.nn.functional.one_hot(torch.tensor([tok]), 300).float() * 10

    monkeypatch.setattr(model, "mtp_hidden", hidden)
    monkeypatch.setattr(model, "mtp_logits", logits)
    spec = generate(model, prompt, 30, speculative="mtp")
    assert spec.tokens == plain
    assert spec.accepted >= 8 and spec.drafted - spec.accepted >= 4
    assert spec.main_passes == 1 + spec.drafted < len(plain)  # fewer main passes than tokens


def test_speculative_sampling_is_seeded_and_runs():
    model, _ = _model()
    a = generate(model, [1, 2, 3], 30, temperature=0.8, seed=7, speculative="mtp")
    b = generate(model, [1, 2, 3], 30, temperature=0.8, seed=7, speculative="mtp")
    c = generate(model, [1, 2, 3], 30, temperature=0.8, seed=7)
    assert a.tokens == b.tokens and len(a.tokens) == len(c.tokens) == 30


def test_generate_errors():
    model, _ = _model(["mtp.depth=0"])
    with pytest.raises(GenerateError, match="needs a model with an MTP module"):
        generate(model, [1, 2], 5, speculative="mtp")
    with pytest.raises(GenerateError, match="longer than the model's context of 4"):
        generate(model, [1, 2, 3, 4, 5], 5, max_len=4)
    with pytest.raises(GenerateError, match="prompt is empty"):
        generate(model, [], 5)


def test_generate_cli_on_a_trained_run(tmp_path, capsys):
    from moe.train import train

    cfg = load_config(None, BASE + ["train.max_steps=2", "train.micro_batch_size=2",
                                    "train.eval_every=2", "train.eval_batches=1",
                                    "train.warmup_steps=1", "train.precision=fp32",
                                    f"data.cache_dir={tmp_path / 'cache'}"])
    run = tmp_path / "run"
    assert train(cfg, run, progress=False).exit_code == 0
    capsys.readouterr()
    assert cli_main(["generate", str(run), "--prompt", "def f(x):", "--max-new-tokens", "12",
                     "--speculative", "mtp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 12 and isinstance(out["text"], str)
    assert out["drafted"] >= 1 and out["acceptance_rate"] == out["accepted"] / out["drafted"]
    assert cli_main(["generate", str(run), "--prompt", "x" * 100]) == 2
    assert "longer than the model's context of 64" in capsys.readouterr().err
    assert cli_main(["generate", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
