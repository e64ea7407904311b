"""Ladder planning, the resumable runner (with a stub trainer), and bad ladder configs."""

import collections
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moe import ConfigError, count_params, load_config
from moe.scaling.ladder.command import run_ladder
from moe.scaling.ladder.design import load_ladder, plan
from moe.scaling.ladder.dry_run import format_plan

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
    """configs/ladder/cpu.yaml under the design rules of issue 25: one head width, at least
    500 steps per run, equal compute across the levels at a size, three seeds at the two
    largest sizes of every level, the balancing comparison at its own seeds."""
    cfg, base = load_ladder(ROOT / "configs/ladder/cpu.yaml")
    runs = plan(cfg, base)
    grid = [r for r in runs if r.group == "grid"]
    assert len(grid) >= 18
    for r in runs:
        c = count_params(load_config(base, r.overrides))  # the exact config the run trains
        assert r.counts == c.as_dict()
        assert r.flops == r.tokens * c.flops_per_token_train
        m = load_config(base, r.overrides).model
        assert m.d_model // m.n_heads == cfg.head_dim == 8
        assert r.steps >= 500
    by = {r.name: r for r in grid}
    sizes = [s.name for s in cfg.sizes]
    assert len(sizes) >= 6
    for spec in cfg.sizes:
        size = spec.name
        d, m8, m32 = by[f"{size}-dense"], by[f"{size}-moe8"], by[f"{size}-moe32"]
        # equal ACTIVE params up to the router (d_model x experts per MoE layer)
        for m, e in ((m8, 8), (m32, 32)):
            assert m.counts["active"] - d.counts["active"] == spec.n_layers * spec.d_model * e
        assert d.counts["total"] < m8.counts["total"] < m32.counts["total"]
        # 20 tokens per active non-embedding parameter for dense; its FLOPs for every level
        assert 20 <= d.tokens / d.counts["active_nonembed"] < 20.2
        assert max(abs(m.flops / d.flops - 1) for m in (m8, m32)) < 2e-3
    act = [by[f"{s}-dense"].counts["active_nonembed"] for s in (sizes[0], sizes[-1])]
    assert act[1] / act[0] >= 8  # >= 8x in non-embedding active params
    seeds = {}
    for r in runs:
        if r.group == "seed":
            seeds.setdefault(r.repeat_of, []).append(r.seed)
    assert {k: len(v) for k, v in seeds.items()} == {
        f"{s}-{p.name}": 2 for s in sizes[-2:] for p in cfg.sparsities}
    cmp_runs = [r for r in runs if r.group == "compare"]
    assert len({r.repeat_of for r in cmp_runs}) == 2 and len(cmp_runs) >= 6
    assert not {r.seed for r in cmp_runs} & {r.seed for r in runs if r.group != "compare"}
    # the top size is held out at every level, dense included
    assert [r.name for r in grid if r.held_out] == [f"{sizes[-1]}-dense", f"{sizes[-1]}-moe8",
                                                    f"{sizes[-1]}-moe32"]
    text = format_plan(cfg, runs)
    assert "estimated training time" in text and "held out" in text


def test_runner_kill_and_rerun_loses_and_repeats_nothing(tmp_path):
    path = _ladder(tmp_path, SMALL)
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from moe.scaling.ladder.command import run_ladder
        from moe.scaling.ladder.design import load_ladder, plan
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


def test_changed_run_config_is_retrained_never_reused(tmp_path, monkeypatch, capsys):
    """Edit a size between two invocations: its runs are retrained (the old directories
    set aside), the others are skipped, and results.csv pairs the new params with the new
    losses; a third invocation with the same ladder trains nothing."""
    monkeypatch.setenv("STUB_DELAY", "0")
    out = tmp_path / "out"
    cfg, base = load_ladder(_ladder(tmp_path, SMALL))
    runs = plan(cfg, base)
    run_ladder(cfg, base, out, runs, train_cmd=STUB, progress=False)
    old_fp = {r.name: r.fingerprint for r in runs}
    rec = json.loads((out / "runs/s-dense/fingerprint.json").read_text())
    assert rec["fingerprint"] == old_fp["s-dense"] and rec["fields"]["model.d_model"] == 32
    capsys.readouterr()

    cfg, base = load_ladder(_ladder(tmp_path, SMALL.replace("d_model: 32", "d_model: 48")))
    runs = plan(cfg, base)
    new_fp = {r.name: r.fingerprint for r in runs}
    assert new_fp["xs-dense"] == old_fp["xs-dense"] and new_fp["s-dense"] != old_fp["s-dense"]
    rows = run_ladder(cfg, base, out, runs, train_cmd=STUB, progress=False)
    err = capsys.readouterr().err
    calls = (out / "calls.log").read_text().splitlines()
    starts = collections.Counter(l.split()[1] for l in calls if l.startswith("start"))
    assert starts == {"xs-dense": 1, "xs-moe4": 1, "s-dense": 2, "s-moe4": 2}
    assert "start s-dense resume=False" in calls[4:]  # retrained, not resumed
    for name in ("s-dense", "s-moe4"):
        line = next(l for l in err.splitlines() if f"run {name} changed" in l)
        assert "model.d_model: 32 -> 48" in line and ".stale-" in line
        (aside,) = (out / "runs").glob(f"{name}.stale-*")
        assert json.loads((aside / "summary.json").read_text())["d_model"] == 32  # kept
        assert json.loads((out / "runs" / name / "summary.json").read_text())["d_model"] == 48
    with open(out / "results.csv") as fh:
        table = {r["name"]: r for r in csv.DictReader(fh)}
    by = {r.name: r for r in runs}
    for name, row in table.items():
        assert row["status"] == "done" and row["config_fingerprint"] == new_fp[name]
        assert int(row["params_total"]) == by[name].counts["total"]
        d = 48 if name.startswith("s-") else 16
        size = {"xs": 1e4, "s": 1e5}[name.split("-")[0]]
        assert float(row["final_eval_loss"]) == pytest.approx(2.0 + 10 * size ** -0.3 + d * 1e-4)
    assert count_params(load_config(base, by["s-dense"].overrides)).total == \
        int(table["s-dense"]["params_total"])
    assert {r["name"]: r["status"] for r in rows} == {n: "done" for n in new_fp}
    # unchanged config: nothing is retrained
    run_ladder(cfg, base, out, runs, train_cmd=STUB, progress=False)
    assert (out / "calls.log").read_text().splitlines() == calls


def test_results_never_pair_new_params_with_an_old_loss(tmp_path, monkeypatch):
    """A stale run directory not yet retrained shows as "stale" in results.csv, with no
    loss, rather than the old config's loss next to the new config's params."""
    from moe.scaling.ladder.results import write_results

    monkeypatch.setenv("STUB_DELAY", "0")
    out = tmp_path / "out"
    cfg, base = load_ladder(_ladder(tmp_path, SMALL))
    run_ladder(cfg, base, out, plan(cfg, base), train_cmd=STUB, progress=False)
    cfg, base = load_ladder(_ladder(tmp_path, SMALL.replace("d_model: 32", "d_model: 48")))
    rows = {r["name"]: r for r in write_results(out, plan(cfg, base))}
    assert rows["s-dense"]["status"] == "stale" and rows["s-dense"]["final_eval_loss"] is None
    assert rows["xs-dense"]["status"] == "done"


@pytest.mark.parametrize("body,words", [
    (SMALL + "bogus: 1\n", "bogus is not a known field"),
    (SMALL.replace("top_k: 2", "top_k: 5"), "top_k=5"),
    (SMALL.replace("holdout: [s-moe4]", "holdout: [nope]"), "holdout"),
    (SMALL + "compare: {size: huge, sparsity: dense}\n", "compare.size='huge'"),
    (SMALL.replace("value: 4096", "value: -1"), "tokens.value=-1"),
    (SMALL.replace("d_model: 32", "d_model: 30"), "ladder run s-dense"),  # head dim 15: odd, error names the run
    (SMALL.replace("mode: fixed", "mode: lots"), "tokens.mode='lots'"),
    (SMALL.replace("n_heads: 2}", "n_heads: 3}"), "model.n_heads=3"),
    (SMALL + "head_dim: 5\n", r"sizes[0].d_model=16 is invalid with head_dim=5"),
    (SMALL + "head_dim: 4\n", r"sizes[0].n_heads=2 is invalid with head_dim=4: allowed 4"),
    (SMALL.replace(", n_heads: 2}", "}"), r"sizes[0].n_heads=0 is invalid"),
    (SMALL + "schedule: {min_steps: -1}\n", "schedule.min_steps=-1"),
    (SMALL + "compare: {size: s, sparsity: dense, seeds: [1, 1]}\n", "compare.seeds=[1, 1]"),
])
def test_bad_ladder_configs(tmp_path, body, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("?", r"\?")):
        cfg, base = load_ladder(_ladder(tmp_path, body))
        plan(cfg, base)


def test_one_precision_for_every_run(tmp_path, monkeypatch):
    """`auto` is pinned once for the whole ladder (fp32 on a CPU machine, bf16 where runs
    get GPUs), never decided per run; a compare variant that changes the precision is
    refused naming the runs."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, base = load_ladder(_ladder(tmp_path, SMALL))
    assert load_config(base, list(cfg.overrides)).train.precision == "auto"
    assert {r.precision for r in plan(cfg, base)} == {"fp32"}
    cfg, base = load_ladder(_ladder(tmp_path, SMALL + "gpus: 1\n"))
    assert {r.precision for r in plan(cfg, base)} == {"bf16"}
    body = SMALL + ("compare: {size: s, sparsity: moe4, variants: "
                    "[{name: half, overrides: [train.precision=bf16]}]}\n")
    cfg, base = load_ladder(_ladder(tmp_path, body))
    with pytest.raises(ConfigError, match=r"train.precision differs between runs .*cmp-half"):
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

    from moe.scaling.ladder.command import ladder_main

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
                train.precision=fp32, train.seq_len=32, train.micro_batch_size=8, train.warmup_steps=2,
                train.eval_batches=4, train.ckpt_every=10, train.eval_every=1000]
    sizes:
      - {{name: a, d_model: 16, n_layers: 2, n_heads: 2}}
      - {{name: b, d_model: 24, n_layers: 2, n_heads: 2}}
      - {{name: c, d_model: 32, n_layers: 2, n_heads: 2}}
    sparsities:
      - {{name: dense}}
      - {{name: moe4, n_routed: 4, top_k: 2}}
    tokens: {{mode: fixed, value: 5120}}
    seeds: {{runs: [b-dense], seeds: [1]}}
    holdout: [c-moe4]
    n_boot: 20
    """
    path = _ladder(tmp_path, body)
    out = tmp_path / "out"
    assert ladder_main([str(path), "--out", str(out), "--no-progress"]) == 0
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7 and all(r["status"] == "done" for r in rows)  # 6 grid + 1 seed repeat
    seed = next(r for r in rows if r["group"] == "seed")
    assert (seed["name"], seed["repeat_of"], seed["seed"]) == ("b-dense-seed1", "b-dense", "1")
    # precision pinned: `auto` resolves per machine (bf16 where this CPU runs it faster)
    assert all(float(r["lr"]) > 0 and int(r["warmup_steps"]) >= 1 and r["precision"] == "fp32"
               for r in rows)
    report = (out / "report" / "report.md").read_text()
    assert "c-moe4" in report and "Extrapolation" in report
    assert "tokens: fixed 5120 tokens per run" in report  # the design rules are stated
    assert (out / "report" / "loss_vs_active_params.png").stat().st_size > 1000
    fits = json.loads((out / "report" / "fits.json").read_text())
    assert fits["seed_noise"]["runs"][0]["run"] == "b-dense"
    base_loss = next(float(r["final_eval_loss"]) for r in rows if r["name"] == "b-dense")
    assert fits["seed_noise"]["runs"][0]["losses"] == [base_loss, float(seed["final_eval_loss"])]
    # a second invocation trains nothing and still succeeds
    before = {p: p.stat().st_mtime for p in out.glob("runs/*/summary.json")}
    assert ladder_main([str(path), "--out", str(out), "--no-progress", "--no-report"]) == 0
    assert before == {p: p.stat().st_mtime for p in out.glob("runs/*/summary.json")}


@pytest.mark.parametrize("name", ["cpu", "cpu-isoflop", "h100", "multinode"])
def test_shipped_ladders_plan_and_dry_run(name, capsys):
    from moe.scaling.ladder.command import ladder_main
    from moe.scaling.ladder.executor import default_train_cmd

    assert ladder_main([str(ROOT / f"configs/ladder/{name}.yaml"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "estimated training time" in text
    cfg, _ = load_ladder(ROOT / f"configs/ladder/{name}.yaml")
    if cfg.gpus:
        assert "GPU-hours" in text
    cmd = default_train_cmd(cfg)
    assert cmd[-3:] == ["-m", "moe.cli", "train"]


RULES = """
name: r
overrides: [model.vocab_size=512, mtp.depth=0, train.seq_len=32, train.micro_batch_size=4]
sizes:
  - {name: xs, d_model: 16, n_layers: 2, n_heads: 2}
  - {name: s, d_model: 32, n_layers: 2, n_heads: 2}
sparsities:
  - {name: dense}
  - {name: moe4, n_routed: 4, top_k: 2}
tokens: {mode: per_active_param, value: 20}
lr: {base: 4.0e-3, base_width: 32, exponent: 1.0, moe_multiplier: 0.5}
schedule: {warmup_fraction: 0.1, min_warmup: 3}
seeds: {runs: [s-dense], seeds: [1, 2]}
holdout: [s-moe4]
"""


def test_token_lr_and_schedule_rules_per_run(tmp_path):
    from moe.scaling.ladder.design import design_notes

    cfg, base = load_ladder(_ladder(tmp_path, RULES))
    runs = plan(cfg, base)
    by = {r.name: r for r in runs}
    assert sorted(by) == ["s-dense", "s-dense-seed1", "s-dense-seed2", "s-moe4", "xs-dense",
                          "xs-moe4"]
    for r in runs:
        c = count_params(load_config(base, r.overrides))
        # 20 tokens per active NON-embedding parameter, rounded up to whole 4 x 32 steps
        want = 20 * c.active_nonembed
        assert want <= r.tokens < want + 128 and r.tokens % 128 == 0
        assert r.steps == r.tokens // 128
        # lr = 4e-3 * (32 / d)^1, halved for MoE; warm-up 10% of the run's steps (>= 3)
        d = {"xs": 16, "s": 32}[r.size]
        assert r.lr == pytest.approx(4e-3 * 32 / d * (0.5 if r.n_experts else 1.0))
        assert r.warmup_steps == max(3, round(0.1 * r.steps))
        cfg_run = load_config(base, r.overrides)  # the trainer gets exactly these
        assert cfg_run.train.token_budget == r.tokens and cfg_run.train.max_steps is None
        assert cfg_run.train.lr == pytest.approx(r.lr)
        assert cfg_run.train.warmup_steps == r.warmup_steps
        assert cfg_run.train.seed == r.seed
    assert by["xs-dense"].lr == pytest.approx(8e-3) and by["s-moe4"].lr == pytest.approx(2e-3)
    # each run's schedule ends at its own budget: the small run is not given the big one's
    assert by["xs-dense"].steps < by["s-dense"].steps
    seeds = [by["s-dense-seed1"], by["s-dense-seed2"]]
    assert [(r.group, r.repeat_of, r.seed) for r in seeds] == [("seed", "s-dense", 1),
                                                               ("seed", "s-dense", 2)]
    assert by["s-dense"].seed == 0 and seeds[0].tokens == by["s-dense"].tokens
    notes = "\n".join(design_notes(cfg, runs))
    assert "20 tokens per active non-embedding parameter" in notes
    assert "lr = 0.004 x (32 / d_model)^1, x 0.5 for MoE" in notes
    assert "s-dense (seed 1), s-dense (seed 2)" in notes


def test_isoflop_token_rule(tmp_path):
    body = RULES.replace("tokens: {mode: per_active_param, value: 20}",
                         "tokens: {mode: isoflop, budgets: [2.0e+10, 8.0e+10], min_ratio: 5, "
                         "max_ratio: 150}").replace("seeds: {runs: [s-dense], seeds: [1, 2]}\n",
                                                   "").replace("holdout: [s-moe4]", "")
    cfg, base = load_ladder(_ladder(tmp_path, body))
    runs = plan(cfg, base)
    assert runs, "no run falls inside the ratio window"
    for r in runs:
        c = count_params(load_config(base, r.overrides))
        k = int(r.name.rsplit("-c", 1)[1])
        assert r.flop_budget == [2e10, 8e10][k]
        # tokens from the budget (within one step's rounding), ratio inside the window
        assert abs(r.tokens * c.flops_per_token_train - r.flop_budget) <= 128 * c.flops_per_token_train
        assert 5 <= (r.flop_budget / c.flops_per_token_train) / c.active_nonembed <= 150
    # both budgets hold runs, and the same size sits at several budgets
    assert {r.flop_budget for r in runs} == {2e10, 8e10}
    assert len({r.name.rsplit("-c", 1)[0] for r in runs}) < len(runs)
    with pytest.raises(ConfigError, match="tokens.budgets"):
        load_ladder(_ladder(tmp_path, body.replace("budgets: [2.0e+10, 8.0e+10]", "budgets: []")))


DESIGN = """
name: d
overrides: [model.vocab_size=512, mtp.depth=0, train.seq_len=32, train.micro_batch_size=16]
head_dim: 8
sizes:
  - {name: xs, d_model: 16, n_layers: 2}
  - {name: s, d_model: 32, n_layers: 2}
sparsities:
  - {name: dense}
  - {name: moe4, n_routed: 4, top_k: 2}
  - {name: moe16, n_routed: 16, top_k: 2}
tokens: {mode: per_active_param, value: 20, equal_compute: true}
schedule: {warmup_fraction: 0.1, min_steps: 400}
compare:
  size: xs
  sparsity: moe4
  seeds: [11, 12]
  variants:
    - {name: aux, overrides: [moe.balancing=aux_loss]}
    - {name: free, overrides: [moe.balancing=aux_free]}
"""


def test_head_width_steps_and_equal_compute_rules(tmp_path):
    """head_dim gives every size one head width; min_steps shrinks the micro-batch of a run
    that would take fewer steps (the same batch for every level at a size, the config's
    where it already gives enough); equal_compute gives every level at a size the dense
    level's training FLOPs (its own tokens), up to whole-step rounding."""
    from moe.scaling.ladder.design import design_notes

    cfg, base = load_ladder(_ladder(tmp_path, DESIGN))
    runs = plan(cfg, base)
    grid = [r for r in runs if r.group == "grid"]
    for r in runs:
        run_cfg = load_config(base, r.overrides)
        assert run_cfg.model.d_model // run_cfg.model.n_heads == 8
        assert run_cfg.train.micro_batch_size == r.micro_batch
        assert r.steps >= 400 and r.steps == r.tokens // (r.micro_batch * 32)
        c = count_params(run_cfg)
        assert r.flops == r.tokens * c.flops_per_token_train
    for size in ("xs", "s"):
        cell = [r for r in grid if r.size == size]
        dense = next(r for r in cell if r.n_experts == 0)
        assert len({r.micro_batch for r in cell}) == 1
        mb = dense.micro_batch
        # the largest micro-batch <= 16 that still gives 400 steps at 20 tokens / param
        want = 20 * dense.counts["active_nonembed"]
        assert want / (mb * 32) >= 400 and (mb == 16 or want / ((mb + 1) * 32) < 400)
        for r in cell:  # equal FLOPs: within one step of the run's own tokens
            step_flops = r.micro_batch * 32 * r.flops / r.tokens
            assert abs(r.flops - dense.flops) <= step_flops
            if r.n_experts:  # MoE pays more FLOPs per token (router): fewer tokens
                assert r.tokens < dense.tokens
    assert {r.micro_batch for r in grid} != {16}  # xs needed a smaller batch
    cmp_runs = [r for r in runs if r.group == "compare"]
    assert [(r.name, r.repeat_of, r.seed) for r in cmp_runs] == [
        ("cmp-aux-seed11", "cmp-aux", 11), ("cmp-aux-seed12", "cmp-aux", 12),
        ("cmp-free-seed11", "cmp-free", 11), ("cmp-free-seed12", "cmp-free", 12)]
    notes = "\n".join(design_notes(cfg, runs))
    assert "head width 8 at every size" in notes and "at least 400 steps per run" in notes
    assert "differ in training FLOPs by at most" in notes and "equal_compute" in notes
    # without equal_compute each level trains on its own 20 tokens / param: more FLOPs
    cfg, base = load_ladder(_ladder(tmp_path, DESIGN.replace(", equal_compute: true", "")))
    by = {r.name: r for r in plan(cfg, base)}
    assert by["s-moe16"].flops > by["s-dense"].flops * 1.005


def test_equal_steps_rule(tmp_path):
    """schedule.steps sizes every run's micro-batch to its tokens (nearest integer, above
    the config's where needed), so every run takes about that many steps; the LR follows
    the batch by the square-root rule."""
    body = DESIGN.replace("schedule: {warmup_fraction: 0.1, min_steps: 400}",
                          "schedule: {warmup_fraction: 0.1, min_steps: 100, steps: 150}\n"
                          "lr: {base: 1.0e-2, base_width: 16, exponent: 1.0, base_batch: 16}")
    cfg, base = load_ladder(_ladder(tmp_path, body))
    grid = [r for r in plan(cfg, base) if r.group == "grid"]
    for r in grid:
        dense = next(x for x in grid if x.size == r.size and x.n_experts == 0)
        assert r.micro_batch == dense.micro_batch  # shared at a size
    for r in (x for x in grid if x.n_experts == 0):
        # before whole-step rounding; the level with the fewest tokens (moe16: its router
        # costs FLOPs, so equal compute gives it < 2% fewer) sets the size's batch
        ideal = 20 * r.counts["active_nonembed"] / (150 * 32)
        assert ideal * 0.98 - 0.5 <= r.micro_batch <= ideal + 0.5
        d = {"xs": 16, "s": 32}[r.size]
        assert r.lr == pytest.approx(1e-2 * (16 / d) * (r.micro_batch / 16) ** 0.5, rel=1e-5)
    assert max(r.micro_batch for r in grid) > 16  # s: above the config's 16
    assert all(abs(r.steps / 150 - 1) < 0.25 for r in grid)


def test_isoflop_levels_share_their_budgets(tmp_path):
    """At a size every level trains at the same budgets (the reference level's ratio window
    decides), so no budget compares a size's dense run with nothing."""
    body = DESIGN.replace("tokens: {mode: per_active_param, value: 20, equal_compute: true}",
                          "tokens: {mode: isoflop, budgets: [1.0e+10, 3.0e+10, 1.0e+11], "
                          "min_ratio: 5, max_ratio: 60}")
    cfg, base = load_ladder(_ladder(tmp_path, body))
    cells: dict = {}
    for r in plan(cfg, base):
        if r.group == "grid":
            cells.setdefault(r.size, {}).setdefault(r.sparsity, set()).add(r.flop_budget)
    for size, levels in cells.items():
        assert len({frozenset(b) for b in levels.values()}) == 1, (size, levels)


def test_compare_variants_are_paired_by_seed():
    """Variants over seeds: mean ± SE per variant, and the paired difference to the first
    variant in loss and MaxVio (runs with the same seed paired)."""
    from moe.scaling.analysis.runs import compare_variants

    rows = []
    for seed, (la, lf, ma, mf) in {11: (3.00, 3.01, 0.30, 0.10), 12: (3.10, 3.12, 0.32, 0.11),
                                   13: (2.95, 2.95, 0.28, 0.12)}.items():
        rows += [{"name": f"cmp-aux-seed{seed}", "repeat_of": "cmp-aux", "seed": seed,
                  "final_eval_loss": la, "maxvio": ma, "flops": 1e12},
                 {"name": f"cmp-free-seed{seed}", "repeat_of": "cmp-free", "seed": seed,
                  "final_eval_loss": lf, "maxvio": mf, "flops": 1e12}]
    v = compare_variants(rows)
    assert [x["variant"] for x in v] == ["cmp-aux", "cmp-free"] and v[0]["vs"] is None
    assert v[0]["loss"]["mean"] == pytest.approx((3.00 + 3.10 + 2.95) / 3)
    assert v[1]["maxvio"]["mean"] == pytest.approx(0.11)
    assert v[1]["maxvio"]["se"] == pytest.approx(0.01 / 3 ** 0.5)
    pm = v[1]["paired_maxvio"]
    assert pm["diffs"] == pytest.approx([-0.20, -0.21, -0.16]) and pm["p"] < 0.01
    pl = v[1]["paired_loss"]
    assert pl["diffs"] == pytest.approx([0.01, 0.02, 0.0]) and pl["lo"] < 0 < pl["hi"]
    # one run per variant: nothing to average, no summary
    assert compare_variants([r for r in rows if r["seed"] == 11]) is None
    # the report prints mean ± SE and the paired differences
    from moe.scaling.analysis.runs import compare_runs
    from moe.scaling.report import _compare

    md = "\n".join(_compare({"compare": compare_runs(rows), "compare_variants": v,
                              "settings": {"level": 0.95}}))
    assert "| cmp-free | 3 | 3.0267 ± 0.0498 | 0.110 ± 0.006 |" in md
    assert f"p = {pm['p']:.2g} (n 3)" in md


def test_seed_runs_must_be_grid_runs(tmp_path):
    cfg, base = load_ladder(_ladder(tmp_path, RULES.replace("runs: [s-dense]", "runs: [m-dense]")))
    with pytest.raises(ConfigError, match=r"seeds.runs=\['m-dense'\]"):
        plan(cfg, base)


# ---------------------------------------------------------------- epoch accounting (issue 17)


def _tiny_corpus(root: Path, n_docs: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"d{i:02d}.txt").write_text(f"document {i}: " + "alpha beta gamma delta\n" * 40)
    return root


EPOCHS = """
name: ep
overrides: [data.corpus={corpus}, data.tokenizer=bytes, model.vocab_size=300, mtp.depth=0,
            train.seq_len=32, train.micro_batch_size=4]
sizes:
  - {{name: xs, d_model: 16, n_layers: 2, n_heads: 2}}
sparsities:
  - {{name: dense}}
  - {{name: moe4, n_routed: 4, top_k: 2}}
tokens: {{mode: fixed, value: {tokens}}}
"""


def test_ladder_refuses_runs_over_max_epochs_before_training(tmp_path, monkeypatch, capsys):
    from moe.data import prepare_data
    from moe.scaling.ladder.command import ladder_main

    monkeypatch.setenv("MOE_TESTBED_CACHE", str(tmp_path / "cache"))
    corpus = _tiny_corpus(tmp_path / "corpus")
    path = _ladder(tmp_path, EPOCHS.format(corpus=corpus, tokens=40000))
    out = tmp_path / "out"
    # the corpus is not prepared yet: --dry-run estimates (bytes on disk) and only warns
    assert ladder_main([str(path), "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "ESTIMATED" in cap.out and "~" in cap.out and cap.err.startswith("warning: ")
    assert not (tmp_path / "cache" / "data").exists()  # a dry run prepares nothing
    # a real ladder prepares the corpus once, then refuses with one line naming the run
    assert ladder_main([str(path), "--out", str(out), "--no-progress"]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    train_tokens = len(prepare_data(str(corpus), "bytes", 300, val_fraction=0.02,
                                    progress=False).train)
    assert len(err) == 1 and err[0].startswith("error: ladder ep: run xs-"), err
    assert f"{40000 / train_tokens:.2f} epochs" in err[0] and f"{train_tokens:,} training" in err[0]
    assert "max_epochs=1" in err[0]
    assert not (out / "runs").exists()  # nothing trained
    # --dry-run now reads the prepared cache: exact epochs, the same refusal (exit 2)
    assert ladder_main([str(path), "--dry-run"]) == 2
    cap = capsys.readouterr()
    assert f"{train_tokens:,} training tokens; prepared cache" in cap.out
    assert f"{40000 / train_tokens:.3g}" in cap.out and cap.err.startswith("error: ")
    # raising max_epochs lets it plan; the epochs are in the table and the plan
    path.write_text(path.read_text() + "max_epochs: 100\n")
    assert ladder_main([str(path), "--dry-run"]) == 0
    assert "every run within it" in capsys.readouterr().out


def test_dry_run_without_the_corpus_reports_unknown_epochs(tmp_path, capsys):
    from moe.scaling.ladder.command import ladder_main

    path = _ladder(tmp_path, EPOCHS.format(corpus=tmp_path / "nope", tokens=4096))
    assert ladder_main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "epochs unknown" in out and "does not exist" in out and str(tmp_path / "nope") in out
    # a real ladder stops on it before anything trains: one error line, exit 2
    assert ladder_main([str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ladder ep:") and "does not exist" in err[0]


@pytest.mark.parametrize("name", ["h100", "multinode"])
def test_gpu_ladders_ask_for_a_user_corpus(name, capsys):
    from moe.scaling.ladder.command import ladder_main

    assert ladder_main([str(ROOT / f"configs/ladder/{name}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "data.corpus '/path/to/your/corpus': epochs unknown" in out
    cfg, _ = load_ladder(ROOT / f"configs/ladder/{name}.yaml")
    assert cfg.max_epochs == 1.0


def test_results_csv_has_epochs_and_report_flags_repeats(tmp_path):
    from moe.scaling.analysis.analyse import analyse

    cfg, base = load_ladder(_ladder(tmp_path, SMALL))
    runs = plan(cfg, base)
    for r in runs:  # as attach_epochs sets them, from a corpus of 8192 training tokens
        r.train_tokens, r.epochs, r.epochs_exact = 8192, r.tokens / 8192, True
    rows = run_ladder(cfg, base, tmp_path / "out", runs, train_cmd=STUB, progress=False)
    with open(tmp_path / "out" / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [float(r["epochs"]) for r in table] == [0.5] * 4  # 4096 tokens each
    for r in rows:
        r["epochs"] = 2.5 if r["name"] == "s-dense" else 0.5
    a = analyse(rows, n_boot=0)
    assert any("s-dense (2.5)" in n and "more than 1 epoch" in n for n in a["notes"])
    assert {r["name"]: r["epochs"] for r in a["runs"]}["s-dense"] == 2.5


def test_fingerprint_reads_back_from_saved_config_and_ignores_logging(tmp_path):
    """The trainer's saved config.yaml gives the plan's fingerprint (so ladders made
    before fingerprint.json existed are checked too); logging/output fields do not count."""
    import yaml

    from moe.config import config_fingerprint, fingerprint_fields
    from moe.scaling.ladder.staleness import recorded_fingerprint

    cfg, base = load_ladder(_ladder(tmp_path, SMALL))
    r = plan(cfg, base)[0]
    exact = load_config(base, r.overrides)
    assert config_fingerprint(yaml.safe_load(exact.to_yaml())) == r.fingerprint
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(exact.to_yaml())
    fp, fields = recorded_fingerprint(tmp_path / "run")
    assert fp == r.fingerprint and fields == fingerprint_fields(exact)
    same = load_config(base, r.overrides + ["train.log_every=3", "data.cache_dir=/x",
                                            "train.ckpt_every=7", "parallel.timeout_s=5"])
    assert config_fingerprint(same) == r.fingerprint
    for ov in ("train.lr=0.123", "train.eval_batches=3", "data.corpus=elsewhere", "mtp.depth=1"):
        assert config_fingerprint(load_config(base, r.overrides + [ov])) != r.fingerprint, ov


def test_new_data_fields_at_their_defaults_keep_recorded_fingerprints(tmp_path):
    """Issue 17 added data.text_field / on_bad_record / tokenizer_sample_bytes: a run whose
    saved config predates them is not stale when they are at their defaults."""
    import yaml

    from moe.config import config_fingerprint

    cfg, base = load_ladder(_ladder(tmp_path, SMALL))
    r = plan(cfg, base)[0]
    old = yaml.safe_load(load_config(base, r.overrides).to_yaml())
    for k in ("text_field", "on_bad_record", "tokenizer_sample_bytes"):
        old["data"].pop(k)
    assert config_fingerprint(old) == r.fingerprint
    for ov in ("data.text_field=body", "data.tokenizer_sample_bytes=1000"):
        assert config_fingerprint(load_config(base, r.overrides + [ov])) != r.fingerprint, ov
    assert config_fingerprint(load_config(base, r.overrides + ["data.on_bad_record=skip"])) \
        == r.fingerprint
