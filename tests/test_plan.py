"""`moe-testbed plan`: compute-optimal plans from fits.json (moe/scaling/planner/)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from moe.accounting import count_params
from moe.cli import main as cli_main
from moe.config import load_config
from moe.scaling.analysis.schema import write_fits
from moe.scaling.laws.chinchilla import chinchilla_frontier, chinchilla_predict
from moe.scaling.laws.joint_moe import joint_moe_predict
from moe.scaling.planner.command import build_plan
from moe.scaling.planner.geometry import choose_layout
from moe.scaling.planner.laws import (LawForm, chinchilla_form, dense_compute_for_loss,
                                      frontier, joint_form)
from moe.scaling.planner.output import write_plan


@pytest.fixture(autouse=True)
def _empty_cache(tmp_path, monkeypatch):
    """Plans here are made against an empty corpus cache: a corpus that another test (or
    the user) prepared would make the planner refuse rows by their passes over it."""
    monkeypatch.setenv("MOE_TESTBED_CACHE", str(tmp_path / "cache"))

ROOT = Path(__file__).resolve().parents[1]
# the CPU ladders as committed at 128aea6 (before issue 25's redesign), kept as fixtures:
# these tests check the planner on their numbers and statuses
ISOFLOP = ROOT / "tests" / "data" / "ladder_cpu_isoflop_128aea6"
LADDER_CPU = ROOT / "tests" / "data" / "ladder_cpu_128aea6"
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
ROW_KEYS = {"name", "experts", "top_k", "law", "law_status", "n_active", "n_total", "tokens",
            "flops", "loss", "el", "intervals", "el_reason", "replicates", "extrapolation",
            "layout", "layout_reason", "gpu_hours", "wall_hours", "config", "geometry",
            "el_basis", "extrapolation_n", "extrapolation_n_basis", "extrapolated",
            "extrapolated_reason", "isoflop_check", "laws_not_used", "corpus", "train_tokens",
            "passes", "passes_estimate", "passes_note", "max_epochs", "refused"}


def _law_entry(point: dict, reps: list[dict] | None = None, status: str = "ok") -> dict:
    e = {"law": "L = E + A / N^alpha + B / D^beta", "status": status, "reason": "",
         "bounded": status == "ok", "n_runs": 12}
    for k, v in point.items():
        e[k] = {"value": v, "lo": None, "hi": None, "median": None}
    e["replicates"] = {k: [r[k] for r in reps] for k in point} if reps else {}
    return e


def _chinchilla_fits(point=HOFFMANN, reps=None) -> dict:
    """A fits.json dict holding a dense Chinchilla law and the runs it was 'fitted' on
    (sizes at several token budgets, flops = 6 N D)."""
    runs = []
    for n in (4e7, 1e8, 4e8, 1e9):
        for tpp in (5, 20, 80):
            d = n * tpp
            runs.append({"name": f"n{n:g}-t{tpp}", "level": "dense", "kind": "dense",
                         "n_experts": 0, "top_k": 0, "params_active": n, "params_total": n,
                         "tokens": d, "flops": 6 * n * d, "held_out": False,
                         "loss": float(chinchilla_predict(point, n, d))})
    return {"schema_version": 1, "source": "synthetic", "settings": {"level": 0.95},
            "runs": runs, "chinchilla": _law_entry(point, reps),
            "joint_laws": {"joint": {"status": "not_fitted", "reason": "no MoE runs in the table"}}}


def _write(tmp_path, fits) -> Path:
    return write_fits(fits, tmp_path / "fits" / "fits.json")


# ---------------------------------------------------------------------------- laws


def test_hoffmann_published_law_gives_published_optimum():
    # ANCHORS.md: E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28 at C = 1e21
    n, d, L = frontier(chinchilla_form(HOFFMANN), 1e21)
    assert n == pytest.approx(1.824e9, rel=5e-3)
    assert d == pytest.approx(9.136e10, rel=5e-3)
    assert L == pytest.approx(2.3289, rel=5e-4)


def test_dense_plan_at_1e21_from_the_published_law(tmp_path):
    plan = build_plan(_write(tmp_path, _chinchilla_fits()), [1e21], experts=[0],
                      base=ROOT / "configs" / "tiny-dense.yaml")
    (row,) = plan["rows"]
    assert row["law"].startswith("Chinchilla approach 3")
    assert row["n_active"] == pytest.approx(1.824e9, rel=5e-3)
    assert row["tokens"] == pytest.approx(9.136e10, rel=5e-3)
    assert row["loss"]["value"] == pytest.approx(2.3289, rel=5e-4)
    assert row["loss"]["lo"] is None and row["intervals"]["n_active"]["lo"] is None  # no replicates
    assert row["el"] == 1.0
    assert abs(row["geometry"]["config_active_rel_err"]) <= 0.05


def test_intervals_are_the_replicates_frontiers(tmp_path):
    rng = np.random.default_rng(0)
    reps = [{"E": 1.69 + rng.normal(0, 0.02), "A": 406.4 * math.exp(rng.normal(0, 0.1)),
             "B": 410.7 * math.exp(rng.normal(0, 0.1)), "alpha": 0.34 + rng.normal(0, 0.01),
             "beta": 0.28 + rng.normal(0, 0.01)} for _ in range(300)]
    plan = build_plan(_write(tmp_path, _chinchilla_fits(reps=reps)), [1e21], experts=[0],
                      base=ROOT / "configs" / "tiny-dense.yaml")
    (row,) = plan["rows"]
    # independent: fits.chinchilla_frontier on each replicate, 2.5/97.5 percentiles
    fr = np.array([chinchilla_frontier(p, 1e21) for p in reps])
    lo, hi = np.percentile(fr, [2.5, 97.5], axis=0)
    assert row["intervals"]["n_active"]["lo"] == pytest.approx(lo[0], rel=1e-9)
    assert row["intervals"]["n_active"]["hi"] == pytest.approx(hi[0], rel=1e-9)
    assert row["intervals"]["tokens"]["lo"] == pytest.approx(lo[1], rel=1e-9)
    assert row["loss"]["lo"] == pytest.approx(lo[2], rel=1e-9)
    assert row["loss"]["hi"] == pytest.approx(hi[2], rel=1e-9)
    assert row["replicates"] == {"used": 300, "total": 300, "no_optimum": 0}
    assert row["loss"]["lo"] < row["loss"]["value"] < row["loss"]["hi"]


def test_joint_law_at_fixed_experts_is_a_chinchilla_form_and_its_optimum_is_the_minimum():
    p = {"a": 30.0, "alpha": -0.30, "gamma": 0.01, "delta": -0.05, "b": 200.0, "beta": -0.3,
         "zeta": -0.004, "omega": 0.02, "c": 1.7}
    N = np.logspace(6, 10, 7)
    D = np.logspace(8, 12, 7)
    for E in (1, 8, 64):
        f = joint_form(p, E)
        np.testing.assert_allclose(f.loss(N, D), joint_moe_predict(p, N, D, E), rtol=1e-12)
        n, d, L = frontier(f, 1e21)
        assert 6 * n * d == pytest.approx(1e21, rel=1e-12)
        ns = np.logspace(math.log10(n) - 1, math.log10(n) + 1, 4001)  # brute force on C = 6ND
        losses = f.loss(ns, 1e21 / (6 * ns))
        assert ns[np.argmin(losses)] == pytest.approx(n, rel=2e-3)
        assert L == pytest.approx(losses.min(), rel=1e-9)


def test_dense_compute_for_loss_inverts_the_frontier():
    f = chinchilla_form(HOFFMANN)
    for C in (1e18, 1e21, 1e24):
        L = frontier(f, C)[2]
        assert dense_compute_for_loss(f, L) == pytest.approx(C, rel=1e-9)
    assert dense_compute_for_loss(f, 1.6) == math.inf  # below E: no dense compute reaches it
    assert not LawForm(1.7, 5.0, -0.1, 5.0, 0.3).ok and frontier(LawForm(1.7, 5, -0.1, 5, .3), 1e20) is None


# ------------------------------------------------------------------------ memory


def test_layout_counts_weights_grads_and_adam_states_under_zero_and_ep():
    cfg = load_config(ROOT / "configs" / "qwen3-30b-a3b.yaml", ["train.precision=bf16"])
    c = count_params(cfg)
    routed, dense = c.routed_experts, c.total - c.routed_experts
    gib = 2 ** 30
    lay, _ = choose_layout(cfg, 8, 80.0, headroom=0.25)
    # hand count at the chosen layout: bf16 weights 2 + grads 2 + fp32 master/m/v 12
    z, ep = lay["zero"], lay["ep"]
    part = lambda n, ranks: n * (2 + (2 / ranks if z >= 2 else 2) + (12 / ranks if z >= 1 else 12))
    assert lay["states_gib_per_gpu"] * gib == pytest.approx(part(dense, 8) + part(routed / ep, 8 // ep))
    assert lay["states_gib_per_gpu"] <= 80 * 0.75
    # 30.5B params x 16 bytes cannot sit on one 80 GiB GPU unsharded
    assert (z, ep) != (0, 1) and c.total * 16 > 60 * gib
    none, least = choose_layout(cfg, 1, 80.0)
    assert none is None and least == pytest.approx(c.total * 16 / gib)


# ---------------------------------------------------------------- end to end, CLI


def test_the_committed_isoflop_ladder_cannot_plan(tmp_path, capsys):
    """Its joint law's c collapsed to ~0, its dense approach 3's E replicates split and its
    moe8 approach 3's E collapsed: no law it has determines a plan, and plan says so in one
    line naming each law's status."""
    rc = cli_main(["plan", str(ISOFLOP), "--flops", "1e13", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "no law that can plan" in err, err
    assert "joint law is degenerate (c = " in err
    assert "chinchilla (dense approach 3) is unidentified" in err
    assert not (tmp_path / "p").exists()


def test_plan_from_the_committed_isoflop_ladder(tmp_path, capsys):
    out = tmp_path / "plan"
    # --max-epochs: this test checks the plan, not the corpus (a prepared stdlib cache makes
    # the 1e14 rows several passes, refused at the ladder's max_epochs 1)
    rc = cli_main(["plan", str(_copy_isoflop_fits(tmp_path)), "--flops", "1e13,1e14",
                   "--gpus", "8", "--gpu-mem-gib", "80", "--max-epochs", "1000",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert [r["name"] for r in plan["rows"]] == ["dense_1e13", "moe8_1e13", "dense_1e14",
                                                 "moe8_1e14"]
    for r in plan["rows"]:
        assert set(r) == ROW_KEYS
        # the law the approach-2 check chose (these fits have IsoFLOP optima per level)
        assert r["isoflop_check"]["law"] == r["law"]
        lo, hi = r["loss"]["lo"], r["loss"]["hi"]
        assert lo < r["loss"]["value"] < hi
        assert r["intervals"]["n_active"]["lo"] < r["n_active"] < r["intervals"]["n_active"]["hi"]
        assert r["extrapolation"] == pytest.approx(r["flops"] / 1.00159232e12, rel=1e-6)
        assert r["layout"]["ep"] >= 1 and r["gpu_hours"] > 0
        cfg = load_config(out / r["config"])  # a config that loads and matches the plan
        c = count_params(cfg)
        assert c.active == pytest.approx(r["n_active"], rel=0.05)
        assert c.total == pytest.approx(r["n_total"], rel=0.05)
        assert cfg.moe.n_routed == r["experts"] and cfg.model.vocab_size == 384
        assert cfg.train.token_budget >= r["tokens"] * 0.99
    moe = [r for r in plan["rows"] if r["experts"]]
    # EL against the dense form of the row's own law: a number, or no number with the reason
    assert all((r["el"] is not None and r["el"] > 0) or r["el_reason"] for r in moe)
    assert all(r["n_total"] > r["n_active"] for r in moe)
    md = (out / "plan.md").read_text()
    assert "99.8x** the largest run" in md and "ASSUMED" in md
    assert (out / "plan.png").stat().st_size > 10_000


def test_a_planned_config_trains(tmp_path):
    from moe.train import train

    # max_epochs: the row is 1.38 passes over the prepared stdlib corpus (refused at the
    # ladder's 1); this test trains 8192 tokens of its config, not the planned budget
    plan = build_plan(_copy_isoflop_fits(tmp_path), [1e13], experts=[8], max_epochs=10.0)
    write_plan(plan, tmp_path / "plan")
    cfg = load_config(tmp_path / "plan" / "moe8_1e13.yaml",
                      ["train.token_budget=8192", "train.warmup_steps=1", "train.precision=fp32"])
    res = train(cfg, tmp_path / "run", progress=False)
    s = res.summary
    assert res.exit_code == 0 and s["status"] == "done"
    assert s["params"]["active"] == count_params(cfg).active


@pytest.mark.parametrize("args, says", [
    (["--flops", "1e10"], "below the smallest fitted run"),
    (["--flops", "1e29"], "above 1e+28"),
    (["--flops", "lots"], "--flops 'lots' is invalid"),
    (["--flops", "1e13", "--gpus", "8", "--gpu-mem-gib", "1e-7"], "memory: no planned model fits"),
    (["--flops", "1e13", "--gpus", "8"], "--gpus and --gpu-mem-gib go together"),
    (["--flops", "1e13", "--experts", "1"], "--experts [1] is invalid"),
    (["--flops", "1e13", "--mfu", "2"], "--mfu 2.0 is invalid"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, says):
    rc = cli_main(["plan", str(_copy_isoflop_fits(tmp_path)), "--out", str(tmp_path / "p")]
                  + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and says in err, err
    assert not (tmp_path / "p").exists()


def test_fits_without_a_plannable_law(tmp_path, capsys):
    # the fixed-ratio CPU ladder: every run at 20 tokens per parameter
    import shutil

    d = shutil.copytree(LADDER_CPU, tmp_path / "ladder_cpu")  # named as the ladder's results
    rc = cli_main(["plan", str(d), "--flops", "1e13", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "no token variation" in err and "cannot be planned" in err
    fits = _chinchilla_fits()
    fits["chinchilla"] = {"status": "not_fitted", "reason": "5 dense runs; approach 3 needs >= 8"}
    rc = cli_main(["plan", str(_write(tmp_path, fits)), "--flops", "1e21",
                   "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc == 2 and "no law that can plan" in err and "approach 3 needs >= 8" in err


def test_per_level_approach_3_when_no_joint_law(tmp_path):
    fits = _chinchilla_fits()
    moe = dict(HOFFMANN, E=1.60, A=300.0)  # a MoE level that is better at every size
    for r in list(fits["runs"]):
        fits["runs"].append(dict(r, name=r["name"] + "-e8", level="moe8", kind="moe",
                                 n_experts=8, top_k=2, params_total=3 * r["params_active"],
                                 loss=float(chinchilla_predict(moe, r["params_active"],
                                                               r["tokens"]))))
    fits["chinchilla_levels"] = {"moe8": _law_entry(moe)}
    plan = build_plan(_write(tmp_path, fits), [1e21], base=ROOT / "configs" / "tiny-moe.yaml")
    dense, m8 = plan["rows"]
    assert (dense["experts"], m8["experts"], m8["top_k"]) == (0, 8, 2)
    assert m8["law"] == "Chinchilla approach 3 L(N, D), moe8"
    n, d, L = frontier(chinchilla_form(moe), 1e21)
    assert (m8["n_active"], m8["tokens"], m8["loss"]["value"]) == pytest.approx((n, d, L))
    # EL: dense compute on the published frontier reaching the MoE optimum's loss, / C
    assert m8["el"] == pytest.approx(dense_compute_for_loss(chinchilla_form(HOFFMANN), L) / 1e21)
    assert m8["el"] > 1
    assert abs(m8["geometry"]["config_active_rel_err"]) <= 0.05


def test_analysis_fits_approach_3_per_moe_level():
    from moe.scaling.analysis.analyse import analyse

    moe = dict(HOFFMANN, E=1.60, A=300.0)
    rows = []
    for n in (4e7, 1e8, 4e8, 1e9):
        for tpp in (5, 20, 80):
            d = n * tpp
            rows.append({"name": f"d-{n:g}-{tpp}", "kind": "dense", "n_experts": 0, "top_k": 0,
                         "params_active": n, "tokens": d, "flops": 6 * n * d,
                         "final_eval_loss": float(chinchilla_predict(HOFFMANN, n, d))})
            rows.append({"name": f"m-{n:g}-{tpp}", "kind": "moe", "n_experts": 8, "top_k": 2,
                         "sparsity": "moe8", "params_active": n, "params_total": 3 * n,
                         "tokens": d, "flops": 6 * n * d,
                         "final_eval_loss": float(chinchilla_predict(moe, n, d))})
    a = analyse(rows, n_boot=3, holdout="none")
    (level,) = a["chinchilla_levels"]
    e = a["chinchilla_levels"][level]
    assert level == "moe8" and e["n_runs"] == 12
    # the level's law is approach 3 on that level's runs only (fit_chinchilla, same data)
    from moe.scaling.laws.chinchilla import fit_chinchilla

    m = [r for r in rows if r["kind"] == "moe"]
    ref = fit_chinchilla([r["params_active"] for r in m], [r["tokens"] for r in m],
                         [r["final_eval_loss"] for r in m])
    for k in ("E", "A", "B", "alpha", "beta"):
        assert e[k]["value"] == pytest.approx(ref[k], rel=1e-9), k
    assert e["status"] in ("ok", "unbounded") and len(e["replicates"]["E"]) >= 1
    # and it differs from the dense law (fitted on the dense runs)
    assert a["chinchilla"]["E"]["value"] != pytest.approx(e["E"]["value"], rel=1e-3)


# ------------------------------------------- limits: extrapolation, passes, approach 2


def _copy_isoflop_fits(tmp_path) -> Path:
    """The committed IsoFLOP ladder's fits.json with its planning laws marked ok BY HAND.

    Its real statuses refuse every plan (test_the_committed_isoflop_ladder_cannot_plan);
    the tests using this copy check the planner's mechanics (limits, passes, configs, the
    approach-2 check) on a real ladder's numbers and configs, not whether those laws are
    determined."""
    d = tmp_path / "ladder_cpu_isoflop"
    d.mkdir(exist_ok=True)
    fits = json.loads((ISOFLOP / "fits.json").read_text())
    for e in [fits["joint_laws"]["joint"], fits["chinchilla"],
              *fits["chinchilla_levels"].values()]:
        if e["status"] != "not_fitted":
            e["status"], e["reason"] = "ok", ""
    (d / "fits.json").write_text(json.dumps(fits))
    return d


def _corpus(monkeypatch, train_tokens, exact=True):
    """Make the planner's corpus count a given one (the stdlib cache may or may not be
    prepared on the machine running the tests)."""
    from moe.data.prepare import CorpusSize
    import moe.scaling.planner.limits as planner

    monkeypatch.setattr(planner, "corpus_size", lambda cfg: CorpusSize(
        "stdlib", train_tokens, exact, "prepared cache (test)" if exact else "not prepared (test)"))


def test_a_budget_beyond_the_limit_exits_2_naming_the_factor(tmp_path, capsys):
    fits_dir = _copy_isoflop_fits(tmp_path)
    fits = json.loads((fits_dir / "fits.json").read_text())
    cmax = max(r["flops"] for r in fits["runs"] if not r["held_out"])
    rc = cli_main(["plan", str(fits_dir), "--flops", "1e13,1e20", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --flops 1e+20 ") and "\n" not in err, err
    assert f"{1e20 / cmax:.3g}x the compute of the largest fitted run ({cmax:.3g}" in err
    assert "limit is 100x" in err and "--extrapolate" in err
    assert not (tmp_path / "p").exists() and not (fits_dir / "plan").exists()
    # a raised limit lets 1e14 (99.8x) fail at 50x and 1e13 through
    rc = cli_main(["plan", str(fits_dir), "--flops", "1e14", "--max-extrapolation", "50",
                   "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{1e14 / cmax:.3g}x" in err and "--max-extrapolation is 50x" in err
    # checked before any law: fits with no usable law still get this error
    nolaw = _chinchilla_fits()
    nolaw["chinchilla"] = {"status": "degenerate", "reason": "E collapsed to 0"}
    big = max(r["flops"] for r in nolaw["runs"])
    rc = cli_main(["plan", str(_write(tmp_path, nolaw)), "--flops", f"{big * 1000:g}",
                   "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "1e+03x the compute of the largest fitted run" in err, err
    assert "no law" not in err and not (tmp_path / "q").exists()


def test_extrapolate_plans_and_flags_every_row_beyond_the_limit(tmp_path, capsys, monkeypatch):
    _corpus(monkeypatch, None, exact=False)  # passes unknown: this test is about the limit
    fits_dir = _copy_isoflop_fits(tmp_path)
    out = tmp_path / "p"
    rc = cli_main(["plan", str(fits_dir), "--flops", "1e13,1e20", "--extrapolate",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    md = (out / "plan.md").read_text()
    beyond = [r for r in plan["rows"] if r["flops"] == 1e20]
    within = [r for r in plan["rows"] if r["flops"] == 1e13]
    assert len(beyond) == len(within) == 2
    assert all(r["extrapolated"] and "beyond the 100x limit" in r["extrapolated_reason"]
               for r in beyond)
    assert not any(r["extrapolated"] or r["extrapolated_reason"] for r in within)
    assert md.splitlines()[2].startswith("**WARNING: 2 of 4 rows are BEYOND THE FITTED RANGE")
    runs = [r for r in json.loads((fits_dir / "fits.json").read_text())["runs"]
            if not r["held_out"]]
    for r in plan["rows"]:
        line = next(l for l in md.splitlines() if l.startswith(f"| {r['name']} "))
        lvl = [x["params_active"] for x in runs if x["level"] == ("dense" if r["experts"] == 0
                                                                   else f"moe{r['experts']}")]
        assert r["extrapolation_n"] == pytest.approx(r["n_active"] / max(lvl), rel=1e-12)
        if r["extrapolated"]:
            assert f"BEYOND FITTED RANGE x{r['extrapolation']:.2g}" in line
            assert f" {r['n_active']:.2g} [" in line and f"{r['n_active']:.4g}" not in line
            assert f"{r['tokens']:.2g} [" in line
        else:
            assert "BEYOND" not in line and f" {r['n_active']:.4g} [" in line


def test_rows_beyond_max_epochs_are_refused(tmp_path, capsys, monkeypatch):
    fits_dir = _copy_isoflop_fits(tmp_path)
    _corpus(monkeypatch, None, exact=False)
    probe = build_plan(fits_dir, [1e13])
    tokens = {r["name"]: r["tokens"] for r in probe["rows"]}
    assert all(r["passes"] is None and not r["refused"] for r in probe["rows"])
    small, large = sorted(tokens, key=tokens.get)
    corpus = int(math.sqrt(tokens[small] * tokens[large]))  # between the two rows' tokens
    _corpus(monkeypatch, corpus)
    out = tmp_path / "p"
    rc = cli_main(["plan", str(fits_dir), "--flops", "1e13", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    rows = {r["name"]: r for r in plan["rows"]}
    for name, r in rows.items():
        assert r["passes"] == pytest.approx(r["tokens"] / corpus, rel=1e-12)
        assert r["train_tokens"] == corpus and r["max_epochs"] == 1.0
    assert rows[small]["refused"] is None and (out / f"{small}.yaml").is_file()
    assert rows[large]["passes"] > 1 and "max_epochs 1" in rows[large]["refused"]
    assert rows[large]["config"] is None and not (out / f"{large}.yaml").exists()
    md = (out / "plan.md").read_text()
    assert f"| {large} **REFUSED** |" in md and f"- {large}: REFUSED, no config written" in md
    # --max-epochs above the larger row's passes plans both
    rc = cli_main(["plan", str(fits_dir), "--flops", "1e13", "--out", str(tmp_path / "q"),
                   "--max-epochs", f"{rows[large]['passes'] * 1.01:.6g}"])
    assert rc == 0 and (tmp_path / "q" / f"{large}.yaml").is_file()
    # every row refused: exit 2 in one line
    _corpus(monkeypatch, int(tokens[small] / 2))
    rc = cli_main(["plan", str(fits_dir), "--flops", "1e13", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: every row is refused: ") and "\n" not in err
    assert not (tmp_path / "r").exists()


def _isoflop_fits(joint_b_factor: float, chin_b_factor: float = 1.0) -> dict:
    """Dense runs on IsoFLOP profiles of the Hoffmann law (7 sizes around the optimum at
    three budgets) with approach 2 fitted on them by fit_isoflop, a dense approach-3 law
    (Hoffmann with B x chin_b_factor) and a joint law whose dense form is Hoffmann with
    B x joint_b_factor (each factor moves that law's N*(C))."""
    from moe.scaling.laws.isoflop import fit_isoflop

    fits = _chinchilla_fits(dict(HOFFMANN, B=HOFFMANN["B"] * chin_b_factor))
    iso_runs = []
    for c in (1e19, 1e20, 1e21):
        n0 = frontier(chinchilla_form(HOFFMANN), c)[0]
        for k in (-3, -2, -1, 0, 1, 2, 3):
            n = n0 * 1.6 ** k
            d = c / (6 * n)
            iso_runs.append({"name": f"iso-{c:g}-{k}", "level": "dense", "kind": "dense",
                             "n_experts": 0, "top_k": 0, "params_active": n,
                             "params_total": n, "tokens": d, "flops": c, "held_out": False,
                             "loss": float(chinchilla_predict(HOFFMANN, n, d))})
    fits["runs"] += iso_runs
    res = fit_isoflop([r["flops"] for r in iso_runs], [r["params_active"] for r in iso_runs],
                      [r["loss"] for r in iso_runs], [r["tokens"] for r in iso_runs],
                      nominal=[1e19, 1e20, 1e21], n_boot=0)
    fits["isoflop"] = {"dense": {"status": "ok", "reason": "", **res}}
    h = HOFFMANN
    joint = {"a": h["A"], "alpha": -h["alpha"], "gamma": 0.0, "delta": 0.0,
             "b": h["B"] * joint_b_factor, "beta": -h["beta"], "zeta": 0.0, "omega": 0.0,
             "c": h["E"]}
    fits["joint_laws"] = {"joint": dict(_law_entry(joint), fixed={"e_start": 2.0,
                                                                   "e_max": 256.0})}
    return fits


def test_the_planning_law_must_agree_with_approach_2(tmp_path):
    from moe.scaling.planner.laws import choose_law, isoflop_optima

    base = ROOT / "configs" / "tiny-dense.yaml"
    fits = _isoflop_fits(joint_b_factor=30.0)
    optima, _ = isoflop_optima(fits, "dense")
    joint_n = [frontier(joint_form({k: v["value"] for k, v in fits["joint_laws"]["joint"].items()
                                    if isinstance(v, dict) and "value" in v}, 1), o["flops"])[0]
               for o in optima]
    chin_n = [frontier(chinchilla_form(HOFFMANN), o["flops"])[0] for o in optima]
    # the premise: the joint law's N* falls outside approach 2's intervals, approach 3's inside
    assert not all(o["lo"] <= n <= o["hi"] for o, n in zip(optima, joint_n))
    assert all(o["lo"] <= n <= o["hi"] for o, n in zip(optima, chin_n))
    plan = build_plan(_write(tmp_path, fits), [1e22], experts=[0], base=base)
    (row,) = plan["rows"]
    assert row["law"].startswith("Chinchilla approach 3")  # not the preferred joint law
    chk = row["isoflop_check"]
    assert chk["agrees"] and chk["law"] == row["law"] and chk["disagreement"] == ""
    assert [b["law_n_opt"] for b in chk["budgets"]] == pytest.approx(chin_n, rel=1e-9)
    assert [c["agrees"] for c in chk["candidates"]] == [False, True]
    assert any("Ludziejewski" in w and "disagrees with approach 2" in w
               for w in row["laws_not_used"])
    # when no law agrees: the closer one (in log N) is used and the disagreement printed
    fits = _isoflop_fits(joint_b_factor=30.0, chin_b_factor=5.0)
    ch, _ = choose_law(fits, 0, "dense", 1.0)
    devs = {c["law"]: c["rms_log_dev"] for c in ch.isoflop["candidates"]}
    assert not any(c["agrees"] for c in ch.isoflop["candidates"])
    assert ch.label == min(devs, key=devs.get)
    out = tmp_path / "p2"
    plan = build_plan(_write(tmp_path / "b", fits), [1e22], experts=[0], base=base)
    write_plan(plan, out)
    md = (out / "plan.md").read_text()
    worst = max(ch.isoflop["budgets"], key=lambda b: abs(b["log_dev"]))
    assert (f"DISAGREES: planning law {ch.label} puts N*({worst['flops']:.3g}) at "
            f"{worst['law_n_opt']:.2g}; approach 2 measured {worst['n_opt']:.2g}") in md


@pytest.mark.parametrize("status", ["degenerate", "unidentified", "not_converged"])
def test_a_law_with_an_unusable_status_is_not_used(tmp_path, capsys, status):
    from moe.scaling.planner.laws import usable

    fits = _isoflop_fits(joint_b_factor=1.0)  # the joint law would agree with approach 2
    fits["joint_laws"]["joint"].update(status=status, reason=f"why {status}")
    assert not usable(fits["joint_laws"]["joint"])
    assert usable(dict(fits["joint_laws"]["joint"], status="unbounded"))
    plan = build_plan(_write(tmp_path, fits), [1e22], experts=[0],
                      base=ROOT / "configs" / "tiny-dense.yaml")
    (row,) = plan["rows"]
    assert row["law"].startswith("Chinchilla approach 3")
    assert any(f"joint law is {status} (why {status})" in w
               for w in row["laws_not_used"]), row["laws_not_used"]
    # with every law unusable the plan is refused, quoting each status and reason
    fits["chinchilla"].update(status=status, reason=f"approach 3 {status}")
    rc = cli_main(["plan", str(_write(tmp_path / "b", fits)), "--flops", "1e22",
                   "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "no law that can plan" in err
    assert f"joint law is {status}" in err and f"approach 3 {status}" in err
    assert err.count("dense:") == 1  # one line per level
    assert f"chinchilla (dense approach 3) is {status}" in err
