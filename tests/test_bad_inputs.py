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
        from moe.parallel import release_groups

        release_groups()  # with the groups megatron and DeepSpeed cached


def _config(p: Path, text: str | bytes = "name: bad\n", name: str = "c.yaml") -> Path:
    f = p / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


def _train(p: Path, cfg: Path, out: Path, *overrides: str) -> list[str]:
    return ["train", str(cfg), "train.max_steps=2", *overrides, "--out", str(out),
            "--no-progress"]


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


def out_under_proc(p):
    return _train(p, _config(p), Path("/proc/moe-testbed-out")), \
        "run directory /proc/moe-testbed-out is under /proc, a kernel file system"


def override_unbalanced_quote(p):
    argv = _train(p, _config(p), p / "out", 'name="half')
    return argv, """override 'name="half' has unbalanced quotes"""


def train_cannot_fit(p):
    # ~74 G parameters: 16 bytes each for weights, gradients and AdamW state exceeds any
    # machine this runs on; refused from count_params before data or model exist
    argv = _train(p, _config(p), p / "out", "model.d_model=16384", "model.n_layers=64",
                  "model.n_heads=64")
    return argv, "cannot fit this machine: it needs at least"


def ladder_est_flops_zero(p):
    return _ladder(p, LADDER + "est_flops_per_s: 0\n", "--dry-run"), \
        "est_flops_per_s=0.0 is invalid: allowed a finite value > 0"


def ladder_launcher_unbalanced(p):
    return _ladder(p, LADDER + "launcher: \"torchrun --nproc_per_node '8\"\n", "--dry-run"), \
        "launcher=\"torchrun --nproc_per_node '8\" is invalid: No closing quotation"


def ladder_launcher_missing(p):
    return _ladder(p, LADDER + "launcher: no-such-launcher-7f3 --nproc_per_node 1\n",
                   "--out", str(p / "lad"), "--no-progress"), \
        "'no-such-launcher-7f3' is not an executable found on PATH"


def ladder_size_cannot_fit(p):
    body = LADDER.replace("sizes:\n", "sizes:\n  - {name: huge, d_model: 16384, n_layers: 64, "
                                       "n_heads: 64}\n")
    return _ladder(p, body, "--out", str(p / "lad"), "--no-progress"), \
        "ladder run huge-dense: model"


def _metrics(p, lines):
    run = p / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(l + "\n" for l in lines))
    return run


def plot_run_no_usable_rows(p):
    run = _metrics(p, ["not json", "[1, 2]", '{"kind": "train", "lm_loss": 3.0}'])
    return ["plot-run", str(run)], "has no usable rows (3 malformed)"


def _ckpt(p, meta: str):
    d = p / "run" / "checkpoints" / "step_00000002"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(meta)
    return d


def consolidate_meta_not_json(p):
    d = _ckpt(p, '{"step": 2, "files": [')
    return ["consolidate", str(d), "--out", str(p / "full.pt")], \
        "cannot consolidate " + str(d) + ": meta.json is unreadable or not JSON"


def consolidate_meta_not_mapping(p):
    d = _ckpt(p, "[1, 2]")
    return ["consolidate", str(d), "--out", str(p / "full.pt")], "meta.json lists no files"


def consolidate_missing_step(p):
    root = p / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text("step_00000005\n")
    return ["consolidate", str(p / "run"), "--out", str(p / "full.pt")], \
        "names step_00000005, which is missing"


GADRE = REPO / "moe" / "scaling" / "data" / "gadre2024_rpj.csv"


def fit_out_is_file(p):
    (p / "rep").write_text("x\n")
    return ["fit", str(GADRE), "--out", str(p / "rep"), "--n-boot", "2"], \
        f"output directory {p / 'rep'} exists and is not a directory"


def fit_out_under_proc(p):
    return ["fit", str(GADRE), "--out", "/proc/self/rep", "--n-boot", "2"], \
        "output directory /proc/self/rep is under /proc"


CASES = [out_is_file,
         pytest.param(out_not_writable, marks=pytest.mark.skipif(
             os.geteuid() == 0, reason="root writes into a mode 555 directory")),
         ladder_out_is_file, yaml_not_utf8, yaml_not_mapping, yaml_duplicate_key,
         yaml_duplicate_section, ladder_duplicate_key, base_not_string, base_not_utf8,
         ladder_size_path, ladder_variant_path, ladder_sparsity_hidden, ladder_n_boot_zero,
         config_inside_out, out_under_proc, override_unbalanced_quote, train_cannot_fit,
         ladder_est_flops_zero, ladder_launcher_unbalanced, ladder_launcher_missing,
         ladder_size_cannot_fit, plot_run_no_usable_rows, consolidate_meta_not_json,
         consolidate_meta_not_mapping, consolidate_missing_step, fit_out_is_file,
         fit_out_under_proc]


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


def test_disk_full_while_checkpointing_keeps_the_last_good_one(tmp_path, capsys, monkeypatch):
    """ENOSPC writing a checkpoint: one error line naming the kept checkpoint, exit 2; the
    partial directory is gone, `latest` still names the previous complete checkpoint, and
    --resume (space freed) continues from it."""
    import errno

    from moe.cli import main
    from moe.runs import checkpoint as ckpt

    real = ckpt.save_file

    def full_disk(obj, path):
        if "step_00000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    run = tmp_path / "run"
    argv = ["train", str(REPO / "configs" / "tiny-moe.yaml"), "model.vocab_size=512",
            "mtp.depth=0", "train.seq_len=32", "train.max_steps=6", "train.ckpt_every=2",
            "train.eval_every=100"]
    assert main(argv + ["--out", str(run), "--no-progress"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    kept = run / "checkpoints" / "step_00000002"
    assert len(err) == 1, err
    assert err[0].startswith(f"error: cannot write checkpoint step_00000004 in "
                             f"{run / 'checkpoints'}: No space left on device ("), err
    assert err[0].endswith(f"; the last good checkpoint {kept} is kept; free space and rerun "
                           "with --resume"), err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert ckpt.check_checkpoint(kept) is None
    monkeypatch.setattr(ckpt, "save_file", real)  # space freed
    assert main(argv + ["--out", str(run), "--no-progress", "--resume"]) == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_plot_run_skips_and_counts_malformed_rows(tmp_path, capsys):
    from moe.cli import main

    good = [{"kind": "train", "step": s, "lm_loss": 5.0 - s, "maxvio": [0.1, 0.2]}
            for s in (1, 2, 3)] + [{"kind": "eval", "step": 3, "lm_loss": 2.5,
                                    "maxvio_global": [0.1]}]
    import json

    lines = [json.dumps(r) for r in good] + [
        "{torn", '"a string"', '{"kind": "train", "step": "x", "lm_loss": 1}',
        '{"kind": "train", "step": 4, "lm_loss": 1, "maxvio": 0.5}']
    run = _metrics(tmp_path, lines)
    assert main(["plot-run", str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipped 4 malformed row(s) of {run / 'metrics.jsonl'}"]
    assert (run / "training.png").stat().st_size > 0


def test_fit_write_error_names_the_output_path(tmp_path, capsys, monkeypatch):
    """A failure while writing the report (here: disk full) names the file under --out,
    never the input table."""
    import errno

    from moe.cli import main
    from moe.scaling import report

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "rep" / "fits.json"))

    monkeypatch.setattr(report, "write_fits", full)
    assert main(["fit", str(GADRE), "--out", str(tmp_path / "rep"), "--n-boot", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write {tmp_path / 'rep' / 'fits.json'}: No space left on "
                   "device"]
