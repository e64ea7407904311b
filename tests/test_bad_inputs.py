"""Unusable inputs to `train` and `ladder`: each is refused with exit code 2 and ONE
`error:` line naming the file or field, before any compute (nothing is trained, no run
file is written, the user's files are left as they were)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LADDER = f"""train_config: {REPO / 'configs' / 'tiny-moe.yaml'}
name: t
overrides: [model.vocab_size=512, mtp.depth=0, train.seq_len=32]
sizes:
  - {{name: xs, d_model: 16, n_layers: 2, n_heads: 2}}
sparsities:
  - {{name: dense}}
  - {{name: moe4, n_routed: 4, top_k: 2}}
tokens: {{mode: fixed, value: 4096}}
"""


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_TESTBED_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def _private_process_group():
    """`train` cases create a one-rank gloo group in this process; tear it down after the
    module (as tests/test_train.py does)."""
    import torch.distributed as dist

    had = dist.is_available() and dist.is_initialized()
    yield
    if not had and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        try:
            import deepspeed.comm.comm as ds_comm

            ds_comm.cdb = None
        except ImportError:
            pass


def _config(p: Path, text: str | bytes = "name: bad\n", name: str = "c.yaml") -> Path:
    f = p / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


def _train(p: Path, cfg: Path, out: Path) -> list[str]:
    return ["train", str(cfg), "train.max_steps=2", "--out", str(out), "--no-progress"]


def _ladder(p: Path, body: str = LADDER, *extra: str) -> list[str]:
    return ["ladder", str(_config(p, body, "ladder.yaml")), *extra]


def out_is_file(p):
    (p / "out").write_text("my notes\n")
    return _train(p, _config(p), p / "out"), "exists and is not a directory"


def out_not_writable(p):
    (p / "ro").mkdir()
    (p / "ro").chmod(0o555)
    return _train(p, _config(p), p / "ro"), "is not writable"


def ladder_out_is_file(p):
    (p / "lad").write_text("x\n")
    return _ladder(p, LADDER, "--out", str(p / "lad"), "--no-progress"), \
        "exists and is not a directory"


def yaml_not_utf8(p):
    return _train(p, _config(p, b"name: caf\xe9\n"), p / "out"), "is not UTF-8 text (byte 0xe9"


def yaml_not_mapping(p):
    return _train(p, _config(p, "- name\n- bad\n"), p / "out"), "must hold a mapping"


def yaml_duplicate_key(p):
    cfg = _config(p, "name: bad\ntrain:\n  lr: 0.1\n  warmup_steps: 3\n  lr: 0.2\n")
    return _train(p, cfg, p / "out"), "key 'lr' appears twice in one mapping (lines 3 and 5)"


def yaml_duplicate_section(p):
    cfg = _config(p, "name: bad\ntrain: {lr: 0.1}\nmoe: {top_k: 2}\ntrain: {seed: 3}\n")
    return _train(p, cfg, p / "out"), "key 'train' appears twice"


def ladder_duplicate_key(p):
    return _ladder(p, LADDER + "n_boot: 5\nn_boot: 6\n", "--dry-run"), "key 'n_boot' appears twice"


def base_not_string(p):
    return _train(p, _config(p, "base: [tiny-moe.yaml]\nname: bad\n"), p / "out"), \
        "base=['tiny-moe.yaml'] is invalid"


def base_not_utf8(p):
    _config(p, b"name: \xff\n", "base.yaml")
    return _train(p, _config(p, "base: base.yaml\n"), p / "out"), "base.yaml' is not UTF-8"


def ladder_size_path(p):
    return _ladder(p, LADDER.replace("name: xs", "name: ../../x"), "--dry-run"), \
        "sizes[0].name='../../x' is invalid: allowed a plain file name"


def ladder_variant_path(p):
    body = LADDER + "compare:\n  size: xs\n  sparsity: moe4\n  variants:\n" \
                    "    - {name: ok, overrides: []}\n    - {name: a/b, overrides: []}\n"
    return _ladder(p, body, "--dry-run"), "compare.variants[1].name='a/b' is invalid"


def ladder_sparsity_hidden(p):
    return _ladder(p, LADDER.replace("name: dense", "name: .hidden"), "--dry-run"), \
        "sparsities[0].name='.hidden' is invalid"


def ladder_n_boot_zero(p):
    return _ladder(p, LADDER + "n_boot: 0\n", "--dry-run"), "n_boot=0 is invalid"


def config_inside_out(p):
    # `train RUN/config.yaml --out RUN`: the resolved config would overwrite the user's file
    cfg = _config(p / "run", "name: mine\ntrain: {seed: 3}\n", "config.yaml")
    return _train(p, cfg, p / "run"), "would overwrite the config file"


CASES = [out_is_file,
         pytest.param(out_not_writable, marks=pytest.mark.skipif(
             os.geteuid() == 0, reason="root writes into a mode 555 directory")),
         ladder_out_is_file, yaml_not_utf8, yaml_not_mapping, yaml_duplicate_key,
         yaml_duplicate_section, ladder_duplicate_key, base_not_string, base_not_utf8,
         ladder_size_path, ladder_variant_path, ladder_sparsity_hidden, ladder_n_boot_zero,
         config_inside_out]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys, case):
    from moe.cli import main

    argv, words = case(tmp_path)
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert words in err[0], err[0]
    # nothing the user had was changed, nothing was trained
    for f, data in before.items():
        assert f.read_bytes() == data, f"{f} was modified"
    assert not list(tmp_path.rglob("deepspeed.json")) and not list(tmp_path.rglob("plan.json"))


def test_resume_from_a_runs_own_saved_config_is_allowed(tmp_path):
    """The other side of config_inside_out: `train RUN/config.yaml --out RUN` is fine when
    that file already is the resolved config (resuming from a run's own copy)."""
    from moe.config import load_config
    from moe.train.loop import _check_config_source

    run = tmp_path / "run"
    cfg = load_config(_config(run, "name: mine\ntrain: {seed: 3}\n", "config.yaml"))
    (run / "config.yaml").write_text(cfg.to_yaml())
    _check_config_source(load_config(run / "config.yaml"), run, run / "config.yaml")
    _check_config_source(cfg, run, tmp_path / "elsewhere.yaml")  # another file: no check


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    """Only keys written twice are refused: a `<<:` merge overridden by an explicit key
    is ordinary YAML."""
    from moe.config import load_config

    cfg = load_config(_config(tmp_path, textwrap.dedent("""
        name: m
        train:
          <<: {lr: 0.1, seed: 3}
          lr: 0.2
    """)))
    assert cfg.train.lr == 0.2 and cfg.train.seed == 3
