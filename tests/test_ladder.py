"""Ladder planning, the resumable runner (with a stub trainer), and bad ladder configs."""

import collections
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moe import ConfigError, count_params, load_config
from moe.scaling.ladder import format_plan, load_ladder, plan, run_ladder

ROOT = Path(__file__).resolve().parent.parent
STUB = [sys.executable, str(Path(__file__).with_name("stub_trainer.py"))]


def _ladder(tmp_path, body: str) -> Path:
    p = tmp_path / "ladder.yaml"
    p.write_text(f"train_config: {ROOT / 'configs' / 'tiny-moe.yaml'}\n" + textwrap.dedent(body))
    return p


SMALL = """
name: t
overrides: [model.vocab_size=512, mtp.depth=0, train.seq_len=32, train.micro_batch_size=4]
sizes:
  - {name: xs, d_model: 16, n_layers: 2, n_heads: 2}
  - {name: s, d_model: 32, n_layers: 2, n_heads: 2}
sparsities:
  - {name: dense}
  - {name: moe4, n_routed: 4, top_k: 2}
tokens: {mode: fixed, value: 4096}
holdout: [s-moe4]
"""


def test_cpu_ladder_plan_uses_model_accounting():
    cfg, base = load_ladder(ROOT / "configs/ladder/cpu.yaml")
    runs = plan(cfg, base)
    grid = [r for r in runs if r.group == "grid"]
    assert len(grid) >= 9
    for r in runs:
        c = count_params(load_config(base, r.overrides))  # the exact config the run trains
        assert r.counts == c.as_dict()
        assert r.flops == r.tokens * c.flops_per_token_train
    # sparsity keeps ACTIVE params (up to the router) and grows TOTAL params within a size
    by = {r.name: r for r in grid}
    for size in ("xs", "s", "m", "l"):
        d, m8, m32 = by[f"{size}-dense"], by[f"{size}-moe8"], by[f"{size}-moe32"]
        assert abs(m32.counts["active"] - d.counts["active"]) / d.counts["active"] < 0.02
        assert d.counts["total"] < m8.counts["total"] < m32.counts["total"]
    act = [by[f"{s}-dense"].counts["active_nonembed"] for s in ("xs", "l")]
    assert act[1] / act[0] >= 10  # about a decade or more of non-embedding active params
    text = format_plan(cfg, runs)
    assert "estimated training time" in text and "held out" in text


def test_runner_kill_and_rerun_loses_and_repeats_nothing(tmp_path):
    path = _ladder(tmp_path, SMALL)
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from moe.scaling.ladder import load_ladder, plan, run_ladder
        cfg, base = load_ladder({str(path)!r})
        run_ladder(cfg, base, Path({str(out)!r}), plan(cfg, base), train_cmd={STUB!r}, progress=False)
    """))
    env = {**os.environ, "STUB_DELAY": "0.15"}
    proc = subprocess.Popen([sys.executable, str(driver)], env=env, start_new_session=True)
    log = out / "calls.log"
    deadline = time.time() + 60
    # kill the whole ladder (driver + current trainer) once 2 runs finished and the 3rd is
    # past its checkpoint
    while time.time() < deadline:
        text = log.read_text() if log.exists() else ""
        third = out / "runs" / "s-dense" / "steps.log"
        if text.count("finish") >= 2 and third.exists() and len(third.read_text().split()) >= 6:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = log.read_text()
    assert before.count("finish") == 2
    # re-run the same command to completion
    subprocess.run([sys.executable, str(driver)], env={**env, "STUB_DELAY": "0.01"}, check=True)
    calls = log.read_text().splitlines()
    starts = collections.Counter(l.split()[1] for l in calls if l.startswith("start"))
    finishes = collections.Counter(l.split()[1] for l in calls if l.startswith("finish"))
    assert set(finishes) == {"xs-dense", "xs-moe4", "s-dense", "s-moe4"}
    assert all(v == 1 for v in finishes.values())  # nothing finished twice
    assert starts["xs-dense"] == 1 and starts["xs-moe4"] == 1  # finished runs not redone
    assert "start s-dense resume=True" in calls  # the interrupted run resumed from its checkpoint
    steps = [int(s) for s in (out / "runs/s-dense/steps.log").read_text().split()]
    assert set(steps) == set(range(10)) and steps.count(0) == 1  # restart from step 5, not 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and all(",done" in r for r in rows[1:])
    # a third invocation has nothing to do
    subprocess.run([sys.executable, str(driver)], env=env, check=True)
    assert log.read_text() == "\n".join(calls) + "\n"


def test_failed_run_is_recorded_and_ladder_continues(tmp_path, monkeypatch):
    cfg, base = load_ladder(_ladder(tmp_path, SMALL))
    monkeypatch.setenv("STUB_FAIL", "xs-moe4")
    monkeypatch.setenv("STUB_DELAY", "0")
    rows = run_ladder(cfg, base, tmp_path / "out", plan(cfg, base), train_cmd=STUB, progress=False)
    status = {r["name"]: r["status"] for r in rows}
    assert status == {"xs-dense": "done", "xs-moe4": "pending", "s-dense": "done", "s-moe4": "done"}
    fail = (tmp_path / "out" / "failures.jsonl").read_text()
    assert "xs-moe4" in fail and "nan at step 3" in fail
    held = {r["name"]: r["held_out"] for r in rows}
    assert held["s-moe4"] and not held["s-dense"]


@pytest.mark.parametrize("body,words", [
    (SMALL + "bogus: 1\n", "bogus is not a known field"),
    (SMALL.replace("top_k: 2", "top_k: 5"), "top_k=5"),
    (SMALL.replace("holdout: [s-moe4]", "holdout: [nope]"), "holdout"),
    (SMALL + "compare: {size: huge, sparsity: dense}\n", "compare.size='huge'"),
    (SMALL.replace("value: 4096", "value: -1"), "tokens.value=-1"),
    (SMALL.replace("d_model: 32", "d_model: 30"), "ladder run s-dense"),  # head dim 15: odd, error names the run
    (SMALL.replace("mode: fixed", "mode: lots"), "tokens.mode='lots'"),
    (SMALL.replace("n_heads: 2}", "n_heads: 3}"), "model.n_heads=3"),
])
def test_bad_ladder_configs(tmp_path, body, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("?", r"\?")):
        cfg, base = load_ladder(_ladder(tmp_path, body))
        plan(cfg, base)


def test_missing_train_config(tmp_path):
    p = tmp_path / "l.yaml"
    p.write_text("name: x\ntrain_config: nope.yaml\nsizes: []\nsparsities: []\n")
    with pytest.raises(ConfigError, match="train_config='nope.yaml'"):
        load_ladder(p)


@pytest.mark.slow
def test_real_tiny_ladder_end_to_end(tmp_path, monkeypatch):
    """The real trainer, a tiny corpus and ladder: runs, results table, fits and report."""
    import shutil
    import sysconfig

    from moe.scaling.ladder import ladder_main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "dataclasses.py", "textwrap.py", "string.py", "fnmatch.py",
                 "difflib.py", "pprint.py", "shlex.py", "glob.py", "heapq.py"):
        shutil.copy(stdlib / name, corpus / name)
    monkeypatch.setenv("MOE_TESTBED_CACHE", str(tmp_path / "cache"))
    body = f"""
    name: e2e
    overrides: [data.corpus={corpus}, data.tokenizer=bytes, model.vocab_size=300, mtp.depth=0,
                train.seq_len=32, train.micro_batch_size=8, train.warmup_steps=2,
                train.eval_batches=4, train.ckpt_every=10, train.eval_every=1000]
    sizes:
      - {{name: a, d_model: 16, n_layers: 2, n_heads: 2}}
      - {{name: b, d_model: 24, n_layers: 2, n_heads: 2}}
      - {{name: c, d_model: 32, n_layers: 2, n_heads: 2}}
    sparsities:
      - {{name: dense}}
      - {{name: moe4, n_routed: 4, top_k: 2}}
    tokens: {{mode: fixed, value: 5120}}
    holdout: [c-moe4]
    n_boot: 20
    """
    path = _ladder(tmp_path, body)
    out = tmp_path / "out"
    assert ladder_main([str(path), "--out", str(out), "--no-progress"]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 7 and all(",done" in r for r in rows[1:])
    report = (out / "report" / "report.md").read_text()
    assert "c-moe4" in report and "Extrapolation" in report
    assert (out / "report" / "loss_vs_active_params.png").stat().st_size > 1000
    # a second invocation trains nothing and still succeeds
    before = {p: p.stat().st_mtime for p in out.glob("runs/*/summary.json")}
    assert ladder_main([str(path), "--out", str(out), "--no-progress", "--no-report"]) == 0
    assert before == {p: p.stat().st_mtime for p in out.glob("runs/*/summary.json")}


@pytest.mark.parametrize("name", ["cpu", "h100", "multinode"])
def test_shipped_ladders_plan_and_dry_run(name, capsys):
    from moe.scaling.ladder import default_train_cmd, ladder_main

    assert ladder_main([str(ROOT / f"configs/ladder/{name}.yaml"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "estimated training time" in text
    cfg, _ = load_ladder(ROOT / f"configs/ladder/{name}.yaml")
    if cfg.gpus:
        assert "GPU-hours" in text
    cmd = default_train_cmd(cfg)
    assert cmd[-3:] == ["-m", "moe.cli", "train"]
