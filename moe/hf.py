"""Hugging Face interop: export a run as transformers' DeepseekV3, import one back.

    moe-testbed export-hf RUN_DIR --out HF_DIR     # config.json + model.safetensors + tokenizer
    moe-testbed import-hf HF_DIR --out RUN_DIR     # config.yaml + model.pt (train.init_from)

An imported run loads like a trained one: ``moe.load_model(RUN_DIR)`` (moe/runs/load.py).

Export writes ``config.json`` (model_type deepseek_v3, built by transformers'
DeepseekV3Config so every field it needs is there), ``model.safetensors`` in DeepSeek's
release layout (one tensor per expert: ``mlp.experts.{j}.gate_proj.weight``; transformers
fuses them on load) and, when the run used a BPE tokenizer, ``tokenizer.json`` with a
``tokenizer_config.json`` for AutoTokenizer. MTP modules are written as DeepSeek's release
does: extra layers past ``num_hidden_layers`` (enorm, hnorm, eh_proj, the block,
shared_head.norm, and copies of the shared embedding and head), which transformers ignores.

Name map (ours -> transformers, per layer ``model.layers.{i}.``): attn_norm ->
input_layernorm, ffn_norm -> post_attention_layernorm; attn.wq / wq_a / q_norm / wq_b /
wkv_a / kv_norm / wkv_b / wo -> self_attn.q_proj / q_a_proj / q_a_layernorm / q_b_proj /
kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj / o_proj; a dense FFN's w1 / w3 / w2 ->
mlp.gate_proj / up_proj / down_proj; MoE router -> mlp.gate.weight, expert_bias ->
mlp.gate.e_score_correction_bias, w13_ED2F[e] = [gate | up]^T, w2_EFD[e] = down^T, the
shared experts (one SwiGLU of n_shared x expert_ffn_dim) -> mlp.shared_experts.
Our MLA applies RoPE to interleaved pairs as DeepSeek's weights expect
(``rope_interleave: true``), so no weight is permuted.

What transformers' DeepseekV3 cannot represent is refused before anything is written, with
one line naming the field: MHA attention, softmax scoring, groups of one expert, an
unequal key-value head count.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from .config import Config, ConfigError, config_from_dict
from .runs.checkpoint import save_file as save_torch_file
from .runs.load import LoadError, load_model, run_config

__all__ = ["HFError", "hf_config_dict", "to_hf_state_dict", "from_hf", "export_hf",
           "import_hf", "export_main", "import_main"]


class HFError(ValueError):
    """A run or a Hugging Face directory cannot be converted; the message says why."""


# ------------------------------------------------------------------------------ config


def check_exportable(cfg: Config) -> None:
    m, e = cfg.model, cfg.moe
    if not m.is_mla:
        raise HFError("model.attention: mha cannot be exported: transformers' DeepseekV3 "
                      "needs mla (multi-head latent attention)")
    if cfg.is_moe and e.score_fn != "sigmoid":
        raise HFError(f"moe.score_fn: {e.score_fn} cannot be exported: DeepseekV3's router "
                      "scores with sigmoid")
    if cfg.is_moe and e.n_groups > 1 and e.n_routed // e.n_groups < 2:
        raise HFError(f"moe.n_groups: {e.n_groups} cannot be exported: DeepseekV3 scores a "
                      "group by its top-2 experts, so each group needs >= 2")


def hf_config_dict(cfg: Config) -> dict:
    """DeepseekV3Config keyword arguments for a run's config (raises HFError if none fits)."""
    check_exportable(cfg)
    m, e = cfg.model, cfg.moe
    moe = cfg.is_moe
    return dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
        moe_intermediate_size=e.expert_ffn_dim if moe else m.ffn_dim,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_heads,
        n_shared_experts=e.n_shared if moe else 0,
        n_routed_experts=e.n_routed if moe else 1,
        routed_scaling_factor=float(e.route_scale) if moe else 1.0,
        kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_rank or None,
        qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
        qk_nope_head_dim=m.qk_nope_head_dim,
        n_group=e.n_groups if moe else 1, topk_group=e.topk_groups if moe else 1,
        num_experts_per_tok=e.top_k if moe else 1,
        first_k_dense_replace=m.first_k_dense if moe else m.n_layers,
        # ours normalises the top-k gates when k > 1 (docs/model.md, "Gating"); at k = 1 the
        # gate is the score
        norm_topk_prob=bool(moe and e.top_k > 1),
        hidden_act="silu", max_position_embeddings=max(cfg.train.seq_len, 2048),
        initializer_range=m.init_std, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, rope_interleave=True, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
        num_nextn_predict_layers=cfg.mtp.depth,
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")


def config_from_hf(hf: dict, base: Optional[dict] = None) -> Config:
    """Our Config for a DeepseekV3 config.json dict (training fields from ``base``)."""
    if hf.get("model_type") not in ("deepseek_v3", None):
        raise HFError(f"config.json model_type {hf.get('model_type')!r}: only deepseek_v3 "
                      "can be imported")
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise HFError("config.json num_key_value_heads differs from num_attention_heads: MLA "
                      "derives keys and values per head")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise HFError(f"config.json rope {rope.get('rope_type', rope.get('type'))!r}: rope "
                      "scaling (YaRN) is not modelled by moe-testbed")
    if hf.get("rope_interleave", True) is False:
        raise HFError("config.json rope_interleave: false is not supported (our MLA uses "
                      "DeepSeek's interleaved RoPE layout)")
    L, k_dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 0)
    n_routed = hf.get("n_routed_experts") or 0
    moe = k_dense < L and n_routed > 0
    top_k = hf.get("num_experts_per_tok", 1)
    if moe and top_k > 1 and not hf.get("norm_topk_prob", True):
        raise HFError("config.json norm_topk_prob: false with top-k > 1 is not supported "
                      "(moe-testbed normalises the top-k gates)")
    if moe and top_k == 1 and hf.get("norm_topk_prob", False):
        raise HFError("config.json norm_topk_prob: true with top-k 1 is not supported")
    d = dict(base or {})
    d["model"] = dict(d.get("model") or {}, vocab_size=hf["vocab_size"],
                      d_model=hf["hidden_size"], n_layers=L,
                      n_heads=hf["num_attention_heads"], n_kv_heads=None, head_dim=None,
                      ffn_dim=hf["intermediate_size"], first_k_dense=k_dense if moe else L,
                      norm_eps=hf.get("rms_norm_eps", 1e-6),
                      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      init_std=hf.get("initializer_range", 0.02), attention="mla",
                      q_lora_rank=hf.get("q_lora_rank") or None,
                      kv_lora_rank=hf["kv_lora_rank"],
                      qk_nope_head_dim=hf["qk_nope_head_dim"],
                      qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])
    d["moe"] = dict(d.get("moe") or {}, n_routed=n_routed if moe else 0,
                    n_shared=hf.get("n_shared_experts", 0) or 0,
                    expert_ffn_dim=hf.get("moe_intermediate_size", 1), top_k=top_k,
                    score_fn="sigmoid", n_groups=hf.get("n_group", 1) or 1,
                    topk_groups=hf.get("topk_group", 1) or 1,
                    route_scale=float(hf.get("routed_scaling_factor", 1.0)))
    d["mtp"] = dict(d.get("mtp") or {}, depth=int(hf.get("num_nextn_predict_layers", 0) or 0))
    try:
        return config_from_dict(d)
    except ConfigError as exc:
        raise HFError(f"config.json does not give a valid moe-testbed config: {exc}") from None


# ------------------------------------------------------------------------------ weights

_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj",
         "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _norm_attn_names(ours: str, theirs: str) -> list[tuple[str, str]]:
    """(our key, transformers' key) of a block's norms and attention projections, for
    block prefixes ``ours`` and ``theirs`` (used in both directions)."""
    return ([(f"{ours}attn_norm.weight", f"{theirs}input_layernorm.weight"),
             (f"{ours}ffn_norm.weight", f"{theirs}post_attention_layernorm.weight")]
            + [(f"{ours}attn.{a}.weight", f"{theirs}self_attn.{b}.weight")
               for a, b in _ATTN.items()])


def _block_to_hf(sd: dict, src: str, dst: str, out: dict) -> None:
    """One of our blocks (prefix ``src``) into transformers' names (prefix ``dst``)."""
    for k_ours, k_hf in _norm_attn_names(src, dst):
        if k_ours in sd:
            out[k_hf] = sd[k_ours]
    if f"{src}ffn.router.weight" in sd:  # MoE
        out[f"{dst}mlp.gate.weight"] = sd[f"{src}ffn.router.weight"].float()
        out[f"{dst}mlp.gate.e_score_correction_bias"] = sd[f"{src}ffn.expert_bias"].float()
        w13, w2 = sd[f"{src}ffn.w13_ED2F"], sd[f"{src}ffn.w2_EFD"]
        F = w2.shape[1]
        for j in range(w13.shape[0]):
            out[f"{dst}mlp.experts.{j}.gate_proj.weight"] = w13[j, :, :F].t()
            out[f"{dst}mlp.experts.{j}.up_proj.weight"] = w13[j, :, F:].t()
            out[f"{dst}mlp.experts.{j}.down_proj.weight"] = w2[j].t()
        for ours, theirs in _MLP.items():
            k = f"{src}ffn.shared.{ours}.weight"
            if k in sd:
                out[f"{dst}mlp.shared_experts.{theirs}.weight"] = sd[k]
    else:
        for ours, theirs in _MLP.items():
            out[f"{dst}mlp.{theirs}.weight"] = sd[f"{src}ffn.{ours}.weight"]


def to_hf_state_dict(sd: dict, cfg: Config) -> dict:
    """Our single-device state dict -> DeepSeek-release-layout tensors (contiguous copies)."""
    out: dict = {"model.embed_tokens.weight": sd["embed.weight"],
                 "model.norm.weight": sd["norm.weight"]}
    if not cfg.model.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(cfg.model.n_layers):
        _block_to_hf(sd, f"layers.{i}.", f"model.layers.{i}.", out)
    for k in range(cfg.mtp.depth):
        dst = f"model.layers.{cfg.model.n_layers + k}."
        src = f"mtp.{k}."
        _block_to_hf(sd, f"{src}block.", dst, out)
        out[f"{dst}enorm.weight"] = sd[f"{src}emb_norm.weight"]
        out[f"{dst}hnorm.weight"] = sd[f"{src}hidden_norm.weight"]
        out[f"{dst}eh_proj.weight"] = sd[f"{src}proj.weight"]
        out[f"{dst}shared_head.norm.weight"] = sd[f"{src}out_norm.weight"]
        out[f"{dst}embed_tokens.weight"] = sd["embed.weight"]
        out[f"{dst}shared_head.head.weight"] = sd.get("head.weight", sd["embed.weight"])
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def _block_from_hf(hf: dict, src: str, dst: str, out: dict, cfg: Config, moe: bool) -> None:
    for k_ours, k_hf in _norm_attn_names(dst, src):
        if k_hf in hf:
            out[k_ours] = hf[k_hf]
    if moe:
        out[f"{dst}ffn.router.weight"] = hf[f"{src}mlp.gate.weight"]
        out[f"{dst}ffn.expert_bias"] = hf.get(f"{src}mlp.gate.e_score_correction_bias",
                                              torch.zeros(cfg.moe.n_routed)).float()
        E = cfg.moe.n_routed
        if f"{src}mlp.experts.gate_up_proj" in hf:  # transformers v5's fused layout
            gu, dn = hf[f"{src}mlp.experts.gate_up_proj"], hf[f"{src}mlp.experts.down_proj"]
            out[f"{dst}ffn.w13_ED2F"] = gu.transpose(1, 2).contiguous()
            out[f"{dst}ffn.w2_EFD"] = dn.transpose(1, 2).contiguous()
        else:
            g = [hf[f"{src}mlp.experts.{j}.gate_proj.weight"].t() for j in range(E)]
            u = [hf[f"{src}mlp.experts.{j}.up_proj.weight"].t() for j in range(E)]
            out[f"{dst}ffn.w13_ED2F"] = torch.stack([torch.cat([a, b], 1) for a, b in zip(g, u)])
            out[f"{dst}ffn.w2_EFD"] = torch.stack(
                [hf[f"{src}mlp.experts.{j}.down_proj.weight"].t() for j in range(E)])
        for ours, theirs in _MLP.items():
            k = f"{src}mlp.shared_experts.{theirs}.weight"
            if k in hf and hf[k].numel():
                out[f"{dst}ffn.shared.{ours}.weight"] = hf[k]
    else:
        for ours, theirs in _MLP.items():
            out[f"{dst}ffn.{ours}.weight"] = hf[f"{src}mlp.{theirs}.weight"]


def from_hf(hf_sd: dict, cfg: Config) -> dict:
    """A DeepseekV3 state dict (fused or per-expert layout) -> our state dict."""
    m = cfg.model
    out = {"embed.weight": hf_sd["model.embed_tokens.weight"],
           "norm.weight": hf_sd["model.norm.weight"]}
    out["head.weight"] = hf_sd.get("lm_head.weight", hf_sd["model.embed_tokens.weight"])
    for i in range(m.n_layers):
        _block_from_hf(hf_sd, f"model.layers.{i}.", f"layers.{i}.", out, cfg,
                       cfg.is_moe and i >= m.first_k_dense)
    last_moe = cfg.is_moe and m.n_layers > m.first_k_dense
    for k in range(cfg.mtp.depth):
        src = f"model.layers.{m.n_layers + k}."
        if f"{src}eh_proj.weight" not in hf_sd:
            raise HFError(f"the weights have no MTP module {k} ({src}eh_proj.weight) although "
                          f"num_nextn_predict_layers = {cfg.mtp.depth}")
        _block_from_hf(hf_sd, src, f"mtp.{k}.block.", out, cfg, last_moe)
        out[f"mtp.{k}.emb_norm.weight"] = hf_sd[f"{src}enorm.weight"]
        out[f"mtp.{k}.hidden_norm.weight"] = hf_sd[f"{src}hnorm.weight"]
        out[f"mtp.{k}.proj.weight"] = hf_sd[f"{src}eh_proj.weight"]
        out[f"mtp.{k}.out_norm.weight"] = hf_sd[f"{src}shared_head.norm.weight"]
    return out


# ------------------------------------------------------------------------------ export / import


def _tokenizer_file(cfg: Config) -> Optional[Path]:
    """The run's BPE tokenizer.json from the data cache (prepared when missing)."""
    if cfg.data.tokenizer != "bpe":
        return None
    from .data import config_data

    data = config_data(cfg)
    f = data.cache_path / "tokenizer.json" if data.cache_path else None
    return f if f is not None and f.is_file() else None


def export_hf(run_dir, out_dir, *, tokenizer: bool = True) -> Path:
    """Write HF_DIR from a run (see the module doc); returns HF_DIR."""
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out_dir)
    cfg = run_config(run_dir)
    kw = hf_config_dict(cfg)  # refuses before anything is read or written
    try:
        from transformers import DeepseekV3Config
    except ImportError:
        raise HFError("export-hf needs transformers: pip install -e '.[hf]'") from None
    if out.exists() and not out.is_dir():
        raise HFError(f"--out {out} is an existing file")
    model, cfg = load_model(run_dir)
    tensors = to_hf_state_dict(model.state_dict(), cfg)
    out.mkdir(parents=True, exist_ok=True)
    DeepseekV3Config(**kw).save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        tok = _tokenizer_file(cfg)
        if tok is not None:
            (out / "tokenizer.json").write_bytes(tok.read_bytes())
            (out / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast",
                 "model_max_length": cfg.train.seq_len}, indent=1) + "\n")
    return out


def _read_hf_weights(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise HFError(f"{hf_dir} has no *.safetensors weights")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def import_hf(hf_dir, out_dir) -> Path:
    """Write RUN_DIR/config.yaml + RUN_DIR/model.pt from a DeepseekV3 directory; the config
    sets ``train.init_from`` to that model.pt, so ``moe-testbed train RUN_DIR/config.yaml
    --out NEW`` trains on from the imported weights (with a fresh optimizer: an HF
    checkpoint has no optimizer state), and ``load_model(RUN_DIR)`` evaluates it."""
    from .model import build_model

    hf_dir, out = Path(hf_dir), Path(out_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise HFError(f"{hf_dir} has no config.json")
    try:
        hf = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise HFError(f"{cfg_path} is not readable JSON ({exc})") from None
    cfg = config_from_hf(hf)
    sd = from_hf(_read_hf_weights(hf_dir), cfg)
    model = build_model(cfg)
    missing = model.load_state_dict(sd, strict=False).missing_keys
    if missing:
        raise HFError(f"{hf_dir}: weights missing for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    out.mkdir(parents=True, exist_ok=True)
    save_torch_file(model.state_dict(), out / "model.pt")
    cfg.train.init_from = str((out / "model.pt").resolve())
    cfg.name = out.name
    (out / "config.yaml").write_text(cfg.to_yaml())
    if (hf_dir / "tokenizer.json").is_file():
        (out / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    return out


# ------------------------------------------------------------------------------ CLI


def export_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="moe-testbed export-hf",
                                 description="Write a run as a transformers DeepseekV3 directory.")
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-tokenizer", action="store_true")
    a = ap.parse_args(argv)
    try:
        out = export_hf(a.run_dir, a.out, tokenizer=not a.no_tokenizer)
    except (HFError, LoadError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def import_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="moe-testbed import-hf",
                                 description="Import a transformers DeepseekV3 directory as a run.")
    ap.add_argument("hf_dir")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        out = import_hf(a.hf_dir, a.out)
    except (HFError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
