"""Config loading, overrides and every ConfigError case (each names the field)."""

import glob

import pytest

from moe import Config, ConfigError, load_config
from moe.config import config_from_dict

PRESETS = sorted(glob.glob("configs/*.yaml"))


def test_presets_load_and_validate():
    names = {load_config(p).name for p in PRESETS}
    assert {"tiny-moe", "tiny-dense", "deepseek-v3", "qwen3-30b-a3b", "olmoe-1b-7b",
            "mixtral-8x7b"} <= names


def test_base_inheritance_and_overrides():
    cfg = load_config("configs/tiny-dense.yaml", ["train.lr=1e-3", "model.n_layers=6",
                                                   "train.betas=[0.8, 0.9]"])
    assert cfg.moe.n_routed == 0 and not cfg.is_moe  # from tiny-dense
    assert cfg.model.d_model == 128  # inherited from tiny-moe
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layers == 6
    assert cfg.train.betas == (0.8, 0.9)


def test_yaml_roundtrip(tmp_path):
    cfg = load_config("configs/deepseek-v3.yaml")
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_scientific_notation_strings_become_floats():
    # PyYAML (YAML 1.1) reads "1e-3" as a string; the loader must still give a float.
    cfg = load_config(None, ["moe.gamma=1e-3", "train.token_budget=1e6"])
    assert cfg.moe.gamma == 1e-3
    assert cfg.train.token_budget == 1_000_000 and isinstance(cfg.train.token_budget, int)


# (overrides, words that must appear in the one-line message)
BAD = [
    (["moe.top_k=9", "moe.n_routed=8"], "moe.top_k=9"),
    (["moe.n_routed=10", "moe.n_groups=4"], "moe.n_groups=4"),
    (["moe.n_groups=2", "moe.topk_groups=3"], "moe.topk_groups=3"),
    (["moe.n_routed=16", "moe.n_groups=4", "moe.topk_groups=1", "moe.top_k=6"], "moe.top_k=6"),
    (["model.d_model=130", "model.n_heads=4"], "model.n_heads=4"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_kv_heads=3"),
    (["model.d_model=0"], "model.d_model=0"),
    (["model.n_layers=-1"], "model.n_layers=-1"),
    (["moe.expert_ffn_dim=0"], "moe.expert_ffn_dim=0"),
    (["moe.n_shared=-1"], "moe.n_shared=-1"),
    (["mtp.depth=-1"], "mtp.depth=-1"),
    (["model.first_k_dense=5", "model.n_layers=4"], "model.first_k_dense=5"),
    (["model.first_k_dense=4", "model.n_layers=4"], "model.first_k_dense=4"),  # MoE with no MoE layer
    (["model.head_dim=7"], "model.head_dim=7"),
    (["moe.score_fn=relu"], "moe.score_fn='relu'"),
    (["moe.balancing=auxfree"], "moe.balancing='auxfree'"),
    (["moe.kernels=cuda"], "moe.kernels='cuda'"),
    (["model.n_layers=four"], "model.n_layers='four'"),
    (["model.n_layers=2.5"], "model.n_layers=2.5"),
    (["model.tie_embeddings=1"], "model.tie_embeddings=1"),
    (["train.lr=fast"], "train.lr='fast'"),
    (["train.lr=.inf"], "train.lr=inf"),
    (["model.dmodel=64"], "did you mean model.d_model"),
    (["modle.d_model=64"], "modle is not a known field"),
    (["data.val_fraction=0"], "data.val_fraction=0"),
    (["data.tokenizer=bytes", "model.vocab_size=200"], "model.vocab_size=200"),
    (["train.max_steps=null"], "train.max_steps"),
    (["train.betas=[0.9, 1.0]"], "train.betas[1]"),
    (["train.betas=[0.9]"], "train.betas"),
    (["train.zero_stage=3"], "train.zero_stage=3"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio=2"),
    (["parallel.ep=3"], "parallel.ep=3"),
    (["parallel.tp=3"], "parallel.tp=3"),
    (["parallel.ep=2", "moe.n_routed=0"], "parallel.ep=2"),
    # the shared experts are one SwiGLU of width n_shared * expert_ffn_dim, sharded by TP
    (["parallel.tp=2", "moe.n_shared=1", "moe.expert_ffn_dim=33"], "moe.n_shared x moe.expert_ffn_dim"),
    (["mtp.switch_at=1.5"], "mtp.switch_at=1.5"),
    (["moe=3"], "moe=3"),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_config_errors_name_the_field(overrides, words):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    msg = str(exc.value)
    assert words in msg
    assert "\n" not in msg  # one clear line


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["moe.top_k"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(None, ["moe..top_k=2"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(a)


def test_dense_model_ignores_moe_routing_fields():
    # With n_routed=0 the routing constraints do not apply (no routed experts exist).
    cfg = config_from_dict({"moe": {"n_routed": 0, "top_k": 8}})
    assert not cfg.is_moe


def test_default_config_is_valid():
    Config().validate()
