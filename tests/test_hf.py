"""Hugging Face interop (moe/hf.py): our model and transformers' DeepseekV3 with the same
weights compute the same function, both ways, and the CLI round trip works."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moe.cli import main as cli_main  # noqa: E402
from moe.config import load_config  # noqa: E402
from moe.hf import config_from_hf, from_hf, hf_config_dict, import_hf, to_hf_state_dict  # noqa: E402
from moe.model import build_model  # noqa: E402
from moe.runs.load import LoadError, load_model  # noqa: E402

BASE = ["model.vocab_size=300", "data.tokenizer=bytes", "model.d_model=32", "model.n_layers=3",
        "model.n_heads=4", "model.ffn_dim=48", "model.attention=mla", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=6",
        "moe.n_routed=8", "moe.n_shared=1", "moe.expert_ffn_dim=8", "moe.top_k=2",
        "moe.route_scale=2.5", "model.first_k_dense=1", "mtp.depth=1", "moe.kernels=torch"]
CASES = {
    "no-q-lora": [],
    "q-lora+groups": ["model.q_lora_rank=12", "moe.n_groups=4", "moe.topk_groups=2"],
    "two-shared,all-moe": ["moe.n_shared=2", "model.first_k_dense=0", "mtp.depth=0"],
    "top1,tied": ["moe.top_k=1", "model.tie_embeddings=true", "model.q_lora_rank=12"],
}


def _ours(ov, seed=0):
    cfg = load_config(None, BASE + ov)
    torch.manual_seed(seed)
    m = build_model(cfg).eval()
    with torch.no_grad():  # nonzero expert bias and norm gains: every map is exercised
        for layer in m.moe_layers():
            layer.expert_bias.copy_(torch.randn_like(layer.expert_bias) * 0.1)
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return cfg, m


def _hf_counts(hf_model):
    """Per MoE layer expert counts of the latest forward, from the routers' indices."""
    counts = []

    def hook(mod, args, out):
        counts.append(torch.bincount(out[2].reshape(-1), minlength=mod.num_experts))
    hs = [mod.register_forward_hook(hook) for mod in hf_model.modules()
          if type(mod).__name__ == "DeepseekV3TopkRouter"]
    return counts, hs


@pytest.mark.parametrize("case", list(CASES))
def test_export_gives_the_same_logits_and_routing(tmp_path, case):
    from safetensors.torch import save_file

    cfg, ours = _ours(CASES[case])
    out = tmp_path / "hf"
    tf.DeepseekV3Config(**hf_config_dict(cfg)).save_pretrained(out)
    save_file(to_hf_state_dict(ours.state_dict(), cfg), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    tok = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    counts, hooks = _hf_counts(hf)
    with torch.no_grad():
        a = ours.logits(tok)
        b = hf(tok).logits
    for h in hooks:
        h.remove()
    assert (a - b).abs().max().item() <= 1e-4
    ours_counts = [layer.last_counts_E.long() for layer in ours.moe_layers()
                   if layer.last_counts_E is not None][:len(counts)]
    assert len(counts) == len(ours_counts) > 0
    for c_ours, c_hf in zip(ours_counts, counts):
        assert torch.equal(c_ours, c_hf)  # the same experts for every token


def test_import_of_a_random_transformers_model(tmp_path):
    cfg, _ = _ours(CASES["q-lora+groups"])
    hf_cfg = tf.DeepseekV3Config(**hf_config_dict(cfg))
    torch.manual_seed(3)
    hf = tf.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():  # transformers inits norms at 1, bias at 0
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for mod in hf.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(torch.randn(mod.num_experts) * 0.1)
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    # the MTP layer is not part of transformers' model: import without it
    cfg_json = json.loads((d / "config.json").read_text())
    cfg_json["num_nextn_predict_layers"] = 0
    (d / "config.json").write_text(json.dumps(cfg_json))
    assert cli_main(["import-hf", str(d), "--out", str(tmp_path / "run")]) == 0
    ours, ocfg = load_model(tmp_path / "run")
    assert ocfg.train.init_from == str((tmp_path / "run" / "model.pt").resolve())
    tok = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours.logits(tok) - hf(tok).logits).abs().max().item() <= 1e-4
    # training starts from the imported weights (train.init_from; a fresh optimizer)
    from moe.config import load_config as _load
    from moe.train import train

    tcfg = _load(tmp_path / "run" / "config.yaml",
                 ["train.max_steps=1", "train.micro_batch_size=2", "train.seq_len=16",
                  "train.eval_every=1", "train.eval_batches=1", "train.warmup_steps=0",
                  "train.precision=fp32", "data.tokenizer=bytes",
                  f"data.cache_dir={tmp_path / 'cache'}", "train.lr=1e-12"])
    res = train(tcfg, tmp_path / "tuned", progress=False)
    assert res.exit_code == 0
    tuned, _ = load_model(tmp_path / "tuned")
    with torch.no_grad():  # lr ~0: the trained model is still the imported one
        assert (tuned.logits(tok) - hf(tok).logits).abs().max().item() <= 1e-4


def test_state_dict_round_trip_is_exact():
    cfg, ours = _ours(CASES["q-lora+groups"])
    back = from_hf(to_hf_state_dict(ours.state_dict(), cfg), cfg)
    sd = ours.state_dict()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert config_from_hf(hf_config_dict(cfg)).model == cfg.model


@pytest.mark.parametrize("ov, says", [
    (["model.attention=mha", "model.kv_lora_rank=null", "model.qk_nope_head_dim=null",
      "model.qk_rope_head_dim=null", "model.v_head_dim=null"], "model.attention: mha"),
    (["moe.score_fn=softmax"], "moe.score_fn: softmax"),
    (["moe.n_groups=8", "moe.topk_groups=2"], "moe.n_groups: 8"),
])
def test_export_refuses_what_deepseek_v3_cannot_represent(tmp_path, capsys, ov, says):
    cfg = load_config(None, BASE + ov)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    out = tmp_path / "hf"
    assert cli_main(["export-hf", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and "\n" not in err
    assert not out.exists()  # refused before writing


def test_train_export_load_with_tokenizer(tmp_path):
    """A real run (BPE on a small corpus, DeepSpeed, 2 steps) -> export-hf -> transformers'
    AutoModelForCausalLM and AutoTokenizer load it with no custom code; load_model agrees."""
    from moe.train import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"d{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 40)
    cfg = load_config(None, BASE + ["data.tokenizer=bpe", f"data.corpus={corpus}",
                                    f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2",
                                    "train.seq_len=16", "train.micro_batch_size=2",
                                    "train.eval_every=2", "train.eval_batches=1",
                                    "train.warmup_steps=1", "train.precision=fp32"])
    run = tmp_path / "run"
    assert train(cfg, run, progress=False).exit_code == 0
    hf_dir = tmp_path / "hf"
    assert cli_main(["export-hf", str(run), "--out", str(hf_dir)]) == 0
    hf = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokz = tf.AutoTokenizer.from_pretrained(hf_dir)
    ids = tokz("def f3(x):\n    return x", return_tensors="pt")["input_ids"]
    ours, _ = load_model(run)
    with torch.no_grad():
        assert (ours.logits(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    assert ours.logits(ids).shape == (1, ids.shape[1], 300)


def test_bad_hf_inputs(tmp_path, capsys):
    assert cli_main(["import-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli_main(["export-hf", str(tmp_path), "--out", str(tmp_path / "h")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "missing")
