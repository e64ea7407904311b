"""Results-table validation, report writing and the `fit` CLI body.

    python -m pytest tests/test_scaling_report.py -q
"""
import csv
import json
import math

import numpy as np
import pytest

from moe.scaling import (ResultsError, chinchilla_rows, fit_main, load_results, split_holdout,
                         write_report, write_results)
from moe.scaling.report import fmt_iv


def ladder(noise=0.003, seed=0, sizes=(1e6, 3e6, 1e7, 3e7, 1e8),
           levels=((1, 1), (8, 2), (32, 2)), maxvio=True):
    """A synthetic ladder: dense and two MoE sparsities at 5 sizes, 20 tokens/param.

    Loss follows the additive law L = 1.8 + A/N_active^0.3 + B/N_total^0.25 with 0.3%
    log-normal noise, so MoE runs (more total params) sit below dense at equal active size.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for ne, k in levels:
        for n in sizes:
            total = n if ne == 1 else n * (1 / 3 + (2 / 3) * ne / k)
            emb = 0.2 * n
            d = 20 * n
            loss = (1.8 + 40.0 / n ** 0.3 + 25.0 / total ** 0.25) * math.exp(rng.normal(0, noise))
            r = {"name": f"{'dense' if ne == 1 else f'moe{ne}k{k}'}_{n:.0e}",
                 "kind": "dense" if ne == 1 else "moe", "n_experts": ne, "top_k": k,
                 "params_total": total + emb, "params_active": n + emb,
                 "params_active_nonembed": n, "params_total_nonembed": total,
                 "tokens": d, "flops": 6 * n * d, "final_eval_loss": loss}
            if maxvio and ne > 1:
                r["maxvio"] = 0.05 + 0.1 * rng.random()
            rows.append(r)
    return rows


def _write_csv(path, rows, drop=()):
    cols = [c for c in rows[0] if c not in drop]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


# ------------------------------------------------------------------ validation


def test_load_results_csv_and_jsonl(tmp_path):
    rows = ladder()
    rows[0]["status"] = "done"
    rows[1]["status"] = "running"  # not fitted: no final loss yet
    rows[1]["final_eval_loss"] = float("nan")
    rows[2]["held_out"] = True
    p_csv = write_results(rows, tmp_path / "r.csv")
    p_jsonl = tmp_path / "r.jsonl"
    p_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for p in (p_csv, p_jsonl):
        got = load_results(p)
        assert len(got) == len(rows) - 1
        assert all(r["name"] != rows[1]["name"] for r in got)
        by = {r["name"]: r for r in got}
        assert by[rows[2]["name"]]["held_out"] is True
        assert by[rows[3]["name"]]["held_out"] is False
        moe = next(r for r in got if r["kind"] == "moe" and r["n_experts"] == 8)
        assert moe["sparsity"] == pytest.approx(0.75)
        assert isinstance(moe["final_eval_loss"], float)


def test_missing_column_is_named(tmp_path):
    p = _write_csv(tmp_path / "r.csv", ladder(), drop=("tokens", "flops"))
    with pytest.raises(ResultsError, match="missing required column.*'tokens'"):
        load_results(p)


def test_any_table_with_the_documented_columns(tmp_path):
    # A table made elsewhere: total params as `params`, loss under another name, no
    # tokens column (derived from flops), no kind / expert columns (dense by default).
    rows = [r for r in ladder() if r["kind"] == "dense"]
    p = tmp_path / "other.csv"
    with open(p, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["params", "flops", "val_loss"])
        for r in rows:
            w.writerow([r["params_active"], r["flops"], r["final_eval_loss"]])
    with pytest.raises(ResultsError, match="'final_eval_loss'.*--column"):
        load_results(p)
    got = load_results(p, columns={"final_eval_loss": "val_loss"})
    assert [g["name"] for g in got] == [f"row{i}" for i in range(1, 6)]
    for g, r in zip(got, rows):
        assert g["kind"] == "dense" and g["n_experts"] == 1
        assert g["params_total"] == g["params_active"] == pytest.approx(r["params_active"])
        assert g["tokens"] == pytest.approx(r["flops"] / (6 * r["params_active"]))
        assert "params_active_nonembed" not in g  # absent, not invented
    with pytest.raises(ResultsError, match="no column 'nope'"):
        load_results(p, columns={"final_eval_loss": "nope"})
    with pytest.raises(ResultsError, match="'lossy' is not a documented column"):
        load_results(p, columns={"lossy": "val_loss"})
    # a moe row must say how many parameters it has in total
    moe = tmp_path / "moe.csv"
    moe.write_text("params,tokens,loss,n_experts,top_k\n1e6,2e7,3.1,8,2\n2e6,4e7,3.0,8,2\n"
                   "4e6,8e7,2.9,8,2\n")
    with pytest.raises(ResultsError, match="row 1.*'params_total'"):
        load_results(moe)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0, ""])
def test_bad_loss_names_row_and_column(tmp_path, bad):
    rows = ladder()
    rows[3]["final_eval_loss"] = bad
    p = _write_csv(tmp_path / "r.csv", rows)
    with pytest.raises(ResultsError) as ei:
        load_results(p)
    msg = str(ei.value)
    assert "row 4" in msg and rows[3]["name"] in msg and "'final_eval_loss'" in msg
    assert "\n" not in msg
    assert isinstance(ei.value, ValueError)


def test_single_point_and_other_bad_tables(tmp_path):
    p = _write_csv(tmp_path / "one.csv", ladder()[:1])
    with pytest.raises(ResultsError, match="only 1 usable run"):
        load_results(p)
    rows = ladder()
    rows[7]["kind"] = "sparse"
    with pytest.raises(ResultsError, match="row 8.*'kind'"):
        load_results(_write_csv(tmp_path / "k.csv", rows))
    rows = ladder()
    rows[6]["top_k"] = 99
    with pytest.raises(ResultsError, match="row 7.*'top_k'"):
        load_results(_write_csv(tmp_path / "t.csv", rows))
    rows = ladder()
    rows[5]["tokens"] = "many"
    with pytest.raises(ResultsError, match="row 6.*'tokens' is not a number"):
        load_results(_write_csv(tmp_path / "n.csv", rows))
    rows = ladder()
    rows[4]["name"] = rows[0]["name"]
    with pytest.raises(ResultsError, match="duplicate name"):
        load_results(_write_csv(tmp_path / "d.csv", rows))
    (tmp_path / "bad.jsonl").write_text('{"name": "a"}\nnot json\n')
    with pytest.raises(ResultsError, match="line 2"):
        load_results(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------------- report


def test_split_holdout():
    rows = ladder()
    train, held = split_holdout(rows, "largest")
    assert sorted(r["name"] for r in held) == ["dense_1e+08", "moe32k2_1e+08", "moe8k2_1e+08"]
    assert len(train) == 12
    rows[0]["held_out"] = True
    train, held = split_holdout(rows, None)  # auto: a flagged row means "flag"
    assert [r["name"] for r in held] == [rows[0]["name"]]
    assert split_holdout(rows, "none") == (rows, [])


SEVEN = (1e6, 2e6, 5e6, 1e7, 2e7, 5e7, 1e8)  # 6 fitted sizes per level + 1 held out


@pytest.fixture(scope="module")
def ladder_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep")
    path = write_report(ladder(sizes=SEVEN), out, n_boot=30, holdout="largest")
    return out, path.read_text(), json.loads((out / "fits.json").read_text())


def test_write_report_on_ladder(ladder_report):
    out, text, fits = ladder_report
    for png in ("loss_vs_active_params.png", "loss_vs_total_params.png", "loss_vs_flops.png",
                "efficiency_leverage.png", "maxvio.png"):
        f = out / png
        assert f.exists() and f.stat().st_size > 5000, png
        assert f"]({png})" in text
    assert "## Extrapolation check" in text
    # every held-out run appears with a predicted value, its actual loss and a % error
    extrap = text.split("## Extrapolation check")[1].split("## Figures")[0]
    for name in ("dense_1e+08", "moe8k2_1e+08", "moe32k2_1e+08"):
        lines = [ln for ln in extrap.splitlines() if ln.startswith(f"| {name} |")]
        assert lines and all(ln.rstrip(" |").endswith("%") for ln in lines), name
    # The ladder is generated by the additive law: cross-validation on the fitted runs must
    # choose it, and it must also be the better law on the held-out runs.
    assert "Chosen by cross-validation on the fitted runs: **additive**" in text
    j = fits["joint_laws"]
    assert j["additive"]["heldout_rmse_log"] < j["clark"]["heldout_rmse_log"]
    assert j["additive"]["cv_rmse_log"] < j["clark"]["cv_rmse_log"]
    assert "| additive | 6e+07 | 15 | 3 |" in text  # the CV fold table: 5 smaller sizes x 3
    assert "Not fitted (6 runs): 6 dense runs; approach 3 needs >= 8" in text
    assert fits["joint_laws"]["better"] == "additive"
    assert set(fits["power_laws"]) == {"dense", "moe E8k2", "moe E32k2"}
    pred = next(h for h in fits["holdout"] if h["run"] == "dense_1e+08" and h["law"] == "L(C), dense")
    assert pred["lo"] <= pred["predicted"] <= pred["hi"]
    assert pred["rel_error"] == pytest.approx(pred["predicted"] / pred["actual"] - 1)
    # 6 sizes, 0.3% noise: the dense law's alpha (0.3 in the generator, but the total-param
    # term bends the dense curve too) comes with a finite interval that holds the estimate.
    dense = fits["power_laws"]["dense"]
    assert dense["status"] == "ok" and dense["bounded"] and dense["converged"]
    a = dense["alpha"]
    assert 0 < a["lo"] <= a["value"] <= a["hi"] < 1
    # printed to the digits its interval supports (report.fmt_iv)
    assert fmt_iv(a["value"], a["lo"], a["hi"]) in text


def test_fits_json_schema(ladder_report):
    from moe.scaling import SCHEMA_VERSION

    _, _, fits = ladder_report
    assert fits["schema_version"] == SCHEMA_VERSION == 2
    for key in ("source", "settings", "counting", "runs", "power_laws", "compute_laws",
                "chinchilla", "isoflop", "overtraining", "downstream", "joint_laws",
                "efficiency_leverage", "holdout", "seed_noise", "compare"):
        assert key in fits, key
    for level, e in fits["power_laws"].items():
        for k in ("E", "A", "alpha"):
            assert set(e[k]) >= {"value", "lo", "hi"}, (level, k)
        for k in ("n_runs", "n_boot", "failed_replicates", "objective", "converged",
                  "replicates", "status", "bounded"):
            assert k in e, (level, k)
        n_ok = e["n_boot"] - e["failed_replicates"]
        assert all(len(e["replicates"][k]) == n_ok for k in ("E", "A", "alpha"))
        # the interval is the replicates' percentile interval: recompute it from the file
        lo, hi = np.percentile(e["replicates"]["alpha"], [2.5, 97.5])
        assert (e["alpha"]["lo"], e["alpha"]["hi"]) == pytest.approx((lo, hi))
    for h in fits["holdout"]:
        assert set(h) >= {"run", "law", "predicted", "lo", "hi", "actual", "rel_error"}
    for e in fits["efficiency_leverage"]:
        assert set(e) >= {"run", "level", "el_params", "el_compute", "el_params_lo",
                          "el_params_hi", "el_compute_lo", "el_compute_hi", "interval_note"}
        # the interval is the dense fits' replicates' EL, holding the point estimate
        assert e["el_params_lo"] <= e["el_params"] <= e["el_params_hi"]
        assert e["el_compute_lo"] <= e["el_compute"] <= e["el_compute_hi"]
    # MoE at equal active size beats dense in the generator: leverage > 1 everywhere
    assert all(e["el_params"] > 1 for e in fits["efficiency_leverage"])
    # recompute one run's EL(params) interval from the dense L(N) replicates in the file
    e = fits["efficiency_leverage"][-1]
    run = next(r for r in fits["runs"] if r["name"] == e["run"])
    reps = fits["power_laws"]["dense"]["replicates"]
    el = [((A / (run["loss"] - E)) ** (1 / al) if run["loss"] > E else np.inf)
          / run["params_active"] for E, A, al in zip(reps["E"], reps["A"], reps["alpha"])]
    assert np.all(np.isfinite(el))
    assert (e["el_params_lo"], e["el_params_hi"]) == pytest.approx(
        tuple(np.percentile(el, [2.5, 97.5])), rel=1e-9)
    assert fits["chinchilla"]["status"] == "not_fitted"
    assert fits["seed_noise"] is None and fits["compare"] is None


def test_report_is_rendered_from_fits_json_alone(ladder_report, tmp_path):
    from moe.scaling import read_fits, render_report

    out, text, _ = ladder_report
    # Re-render from the saved file into an empty directory: same report, same figures.
    again = render_report(read_fits(out / "fits.json"), tmp_path / "again").read_text()
    assert again == text
    assert sorted(p.name for p in (tmp_path / "again").glob("*.png")) == \
        sorted(p.name for p in out.glob("*.png"))
    # ... and what the report prints comes from the file: change a number, see it rendered.
    f = read_fits(out)
    a = f["power_laws"]["dense"]["alpha"]
    a["value"] = 0.123456
    assert fmt_iv(0.123456, a["lo"], a["hi"]) + " |" in render_report(
        f, tmp_path / "edited").read_text()
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({**f, "schema_version": 0}))
    with pytest.raises(ResultsError, match="schema_version 0"):
        read_fits(bad)


def test_unbounded_intervals_are_marked_not_printed(tmp_path):
    # 4 sizes per level for a 3-parameter law (the old CPU ladder's design): whole-run
    # resamples mostly hold <= 3 distinct sizes, and the report must not print the
    # resulting 20-decade intervals as numbers.
    path = write_report(ladder(), tmp_path / "rep", n_boot=20, holdout="largest")
    text = path.read_text()
    fits = json.loads((tmp_path / "rep" / "fits.json").read_text())
    sec = text.split("## Loss vs active parameters")[1].split("Counting conventions")[0]
    for level, e in fits["power_laws"].items():
        assert e["status"] == "unbounded" and not e["bounded"], level
        row = next(ln for ln in sec.splitlines() if ln.startswith(f"| {level} |"))
        assert "(interval unbounded)" in row and "[" not in row, row
        assert f"- {level}: interval unbounded: " in sec
    # a 3-run level interpolates: no interval, whatever the bootstrap says
    three = [r for r in ladder() if r["kind"] == "dense"][:3]
    write_report(three, tmp_path / "three", n_boot=10, holdout="none")
    e = json.loads((tmp_path / "three" / "fits.json").read_text())["power_laws"]["dense"]
    assert e["status"] == "unbounded" and "interpolates" in e["reason"]


def test_seed_repeats_and_compare_rows_are_reported_not_fitted(tmp_path):
    rows = ladder(sizes=SEVEN)
    base = next(r for r in rows if r["name"] == "dense_1e+07")
    seeds = [{**base, "name": f"dense_1e+07-seed{i}", "group": "seed", "repeat_of": base["name"],
              "final_eval_loss": base["final_eval_loss"] * (1 + d)} for i, d in
             enumerate((0.004, -0.006), 1)]
    cmp = [{**base, "name": "cmp-aux", "group": "compare", "tokens_per_s": 1234.0}]
    path = write_results(rows + seeds + cmp, tmp_path / "r.csv")
    assert fit_main([str(path), "--out", str(tmp_path / "rep"), "--n-boot", "3"]) == 0
    fits = json.loads((tmp_path / "rep" / "fits.json").read_text())
    assert {r["name"] for r in fits["runs"]} == {r["name"] for r in rows}  # none fitted
    losses = [base["final_eval_loss"]] + [s["final_eval_loss"] for s in seeds]
    sn = fits["seed_noise"]
    assert sn["runs"][0]["run"] == "dense_1e+07" and sn["runs"][0]["n"] == 3
    assert sn["std"] == pytest.approx(np.std(losses, ddof=1))
    assert fits["compare"] == [{"run": "cmp-aux", "variant": "cmp-aux", "seed": base.get("seed"),
                                "loss": pytest.approx(base["final_eval_loss"]),
                                "maxvio": None, "tokens_per_s": 1234.0,
                                "flops": pytest.approx(base["flops"])}]
    assert fits["compare_variants"] is None  # one run: no variant averaged over seeds
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Pooled std of the final loss over seed repeats" in text and "| cmp-aux |" in text
    # per-size comparison of the levels; only dense was repeated, so no gap has a paired
    # test, and none is judged against the pooled seed std instead
    comp = {c["size"]: c for c in fits["sparsity_comparison"]}
    c = next(c for c in comp.values() if "dense_1e+07" in c["runs"])
    assert c["runs"] == ["dense_1e+07", "moe8k2_1e+07", "moe32k2_1e+07"]
    by = {r["name"]: r for r in rows}
    for g in c["gaps"]:
        gap = by[g["to"]]["final_eval_loss"] - by[g["from"]]["final_eval_loss"]
        assert g["gap"] == pytest.approx(gap)
        assert g["paired"] is None and g["test"] == "one run per level: no paired test"
        assert "within_noise" not in g
    assert "## Sparsity at equal active size" in text
    assert "(one run per level: no paired test)" in text and "within noise" not in text


def test_fit_main_on_a_public_table(tmp_path):
    # The packaged Gadre et al. 2024 RedPajama runs, as a user would refit them: approach 3,
    # the over-training law and the downstream law are all identified (tokens/param varies,
    # an error column is present) and the two flagged runs are predicted.
    from importlib import resources

    table = resources.files("moe.scaling").joinpath("data/gadre2024_rpj.csv")
    assert fit_main([str(table), "--out", str(tmp_path / "g"), "--n-boot", "3"]) == 0
    fits = json.loads((tmp_path / "g" / "fits.json").read_text())
    for key in ("chinchilla", "overtraining", "downstream"):
        assert fits[key]["status"] != "not_fitted", key
    held = {h["run"] for h in fits["holdout"]}
    assert held == {"rpj-open_lm_1b-32.0", "rpj-open_lm_7b-1.0"}
    chained = [h for h in fits["holdout"] if "chained" in h["law"]]
    assert len(chained) == 2 and all(abs(h["rel_error"]) < 0.1 for h in chained)
    # L(N) uses only the runs at one tokens/param ratio, and says so
    assert "tokens/param ratio ~ 20" in fits["power_laws"]["dense"]["selection"]


def test_write_report_dense_only_degrades(tmp_path):
    rows = [r for r in ladder(maxvio=False) if r["kind"] == "dense"]
    text = write_report(rows, tmp_path / "rep", n_boot=4).read_text()
    assert "no MoE runs" in text
    assert "Efficiency leverage\n\nNot computed" in text
    assert not (tmp_path / "rep" / "efficiency_leverage.png").exists()
    assert (tmp_path / "rep" / "loss_vs_active_params.png").exists()


def test_write_report_on_chinchilla_table(tmp_path):
    # The chinchilla points as a results table: approach 3 with bootstrap intervals is the
    # main result; 4 replicates keep it fast (each refits 239 points from 32 grid starts).
    text = write_report(chinchilla_rows(), tmp_path / "rep", n_boot=4).read_text()
    sec = text.split("## Chinchilla approach 3")[1].split("## IsoFLOP")[0]
    assert "Not fitted" not in sec
    row = next(ln for ln in sec.splitlines() if ln.startswith("| alpha |"))
    assert float(row.split("|")[2].split()[0]) == pytest.approx(0.347, rel=0.03)
    assert "| a (N_opt ~ C^a) |" in sec
    assert (tmp_path / "rep" / "chinchilla_fit.png").exists()
    # approach 2 on the same table: chinchilla_rows tags the runs of the nine IsoFLOP
    # profiles with their budget, so the analysis gets the module's published-procedure
    # result (0.486 on these points; Hoffmann et al. publish 0.49 for approach 2)
    iso = json.loads((tmp_path / "rep" / "fits.json").read_text())["isoflop"]["dense"]
    assert iso["grouping"] == "flop_budget column" and len(iso["budgets"]) == 9
    assert iso["exponent"] == pytest.approx(0.486, abs=0.001)
    i = iso["exponent_interval"]
    assert (tmp_path / "rep" / "isoflop.png").exists()
    assert f"- dense: a = {fmt_iv(iso['exponent'], i['lo'], i['hi'])} (bootstrap)" in text
    # and its profile-likelihood (t) interval from the nine budgets beside it
    pi = iso["exponent_profile_interval"]
    assert pi["lo"] < iso["exponent"] < pi["hi"]
    assert f"{fmt_iv(iso['exponent'], pi['lo'], pi['hi'])} (profile likelihood, 7 dof)" in text
    assert "| chinchilla_239 | loss | Chinchilla L(N, D) |" in text


def test_fit_main(tmp_path, capsys):
    rows = ladder()
    good = write_results(rows, tmp_path / "ok.csv")
    assert fit_main([str(good), "--out", str(tmp_path / "out"), "--n-boot", "3"]) == 0
    assert (tmp_path / "out" / "report.md").exists()
    capsys.readouterr()
    rows[2]["final_eval_loss"] = float("nan")
    bad = _write_csv(tmp_path / "bad.csv", rows)
    assert fit_main([str(bad), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "row 3" in err and "final_eval_loss" in err
    assert not (tmp_path / "out2").exists()  # failed before any fitting or writing
    assert fit_main([str(tmp_path / "nope.csv")]) == 2
    assert "no results table" in capsys.readouterr().err
    assert fit_main([str(good), "--holdout", "sideways"]) == 2


def test_ladder_results_table_is_accepted(tmp_path, capsys):
    # The format moe/scaling/ladder/results.py writes: sparsity holds the level's NAME, dense rows
    # have n_experts = top_k = 0, unfinished runs are "pending" with an empty loss, and
    # "compare" rows are fixed-size variants that must not enter the fits.
    from moe.scaling import REQUIRED_COLUMNS
    from moe.scaling.ladder import results as ladder_mod

    cols = list(getattr(ladder_mod, "RESULT_COLUMNS", []))
    assert set(REQUIRED_COLUMNS) <= set(cols), "ladder results lack columns the fitter needs"
    rows = []
    for r in ladder():
        dense = r["kind"] == "dense"
        rows.append({**r, "group": "grid", "size": f"s{r['params_active_nonembed']:.0e}",
                     "sparsity": "dense" if dense else f"e{r['n_experts']}k{r['top_k']}",
                     "n_experts": 0 if dense else r["n_experts"], "top_k": 0 if dense else r["top_k"],
                     "maxvio": "" if dense else r["maxvio"], "params_embedding": 1.0,
                     "tokens_per_s": "", "wall_time_s": "",
                     "held_out": r["params_active_nonembed"] == 1e8, "status": "done"})
    rows.append({**rows[-1], "name": "cmp-aux", "group": "compare", "held_out": False})
    rows.append({**rows[0], "name": "xl-dense", "final_eval_loss": "", "status": "pending",
                 "held_out": False})
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in cols} for r in rows)
    skipped = []
    got = load_results(path, skipped=skipped)
    assert len(got) == 15
    assert sorted(n for n, _ in skipped) == ["cmp-aux", "xl-dense"]
    e8 = next(r for r in got if r["level"] == "e8k2")
    assert e8["sparsity"] == pytest.approx(0.75)
    assert fit_main([str(path), "--out", str(tmp_path / "rep"), "--n-boot", "3"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "not fitted: cmp-aux (group 'compare'" in text
    assert "| e32k2 |" in text  # grouped by the ladder's level names
    # default holdout follows the ladder's held_out flags (the largest size)
    assert "3 held out" in text and "dense_1e+08" in text.split("held out")[1].splitlines()[0]


def test_joint_laws_are_bootstrapped_and_predict_held_out_runs(tmp_path):
    # A ladder that varies tokens/param at every size (what the joint law needs), generated
    # by Ludziejewski et al.'s law with 0.3% noise; the largest size at 20 tokens/param is
    # held out in each sparsity level.
    from moe.scaling import joint_moe_predict

    law = dict(a=35.0, alpha=-0.19, gamma=-0.01, delta=0.2, b=36.0, beta=-0.18, zeta=0.02,
               omega=-0.5, c=1.4)
    rng = np.random.default_rng(1)
    rows = []
    for ne, k in ((1, 1), (8, 2), (32, 2)):
        for n in (1e7, 1e8, 3e8, 1e9):
            for tpp in (5, 20, 80):
                loss = float(joint_moe_predict(law, n, tpp * n, ne)) * math.exp(rng.normal(0, 0.003))
                rows.append({"name": f"e{ne}_{n:.0e}_{tpp}", "n_experts": ne, "top_k": k,
                             "params_active": n, "params_total": n * (1 + (ne - 1) / 3),
                             "tokens": tpp * n, "final_eval_loss": loss,
                             "held_out": n == 1e9 and tpp == 20})
    write_report(rows, tmp_path / "rep", n_boot=6)
    fits = json.loads((tmp_path / "rep" / "fits.json").read_text())
    j = fits["joint_laws"]
    assert j["better"] == "joint"
    e = j["joint"]
    assert e["status"] in ("ok", "unbounded") and e["converged"]
    assert len(e["replicates"]["alpha"]) == e["n_boot"] - e["failed_replicates"] > 0
    assert e["alpha"]["value"] == pytest.approx(-0.19, abs=0.03)
    held = [h for h in fits["holdout"] if h["law"] == "Ludziejewski et al. L(N_active, D, E)"]
    assert sorted(h["run"] for h in held) == ["e1_1e+09_20", "e32_1e+09_20", "e8_1e+09_20"]
    for h in held:
        assert h["lo"] <= h["predicted"] <= h["hi"] and abs(h["rel_error"]) < 0.01
    # the per-level L(N) is fitted along ONE recipe (here 20 tokens/param, the held-out
    # runs' own) and predicts only runs of that recipe
    pl = fits["power_laws"]["dense"]
    assert pl["recipe"]["by"] == "tokens_per_param" and pl["recipe"]["value"] == pytest.approx(20)
    assert pl["n_runs"] == 3 and "3 of 11 runs" in pl["selection"]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Chosen by cross-validation on the fitted runs: **joint**" in text
    assert j["selected_by"].startswith("cross-validation on fitted runs")


def test_efficiency_leverage_needs_a_bounded_dense_curve():
    """EL comes from the dense L(N) only when that fit is bounded; an IsoFLOP ladder (whose
    L(N) sees one tokens/param ratio) falls back to the dense Chinchilla L(N, D) at the
    run's own tokens; with neither, no number and a reason."""
    from moe.scaling.analysis.leverage import efficiency_leverage_section

    def law(status, **p):
        return {"status": status, "reason": "r", **{k: {"value": v} for k, v in p.items()}}

    run = {"name": "m", "kind": "moe", "level": "moe8", "final_eval_loss": 3.0,
           "params_active": 1e5, "tokens": 2e6, "flops": 1e12}
    chin = law("ok", E=1.5, A=400.0, B=90.0, alpha=0.4, beta=0.35)
    unb = {"dense": law("unbounded", E=0.05, A=30.0, alpha=0.2)}
    (e,) = efficiency_leverage_section([run], unb, {}, chin)
    n = e["el_params"] * run["params_active"]
    assert 1.5 + 400.0 / n ** 0.4 + 90.0 / 2e6 ** 0.35 == pytest.approx(3.0, rel=1e-12)
    assert e["basis"].startswith("dense Chinchilla") and e["el_compute"] is None
    (e,) = efficiency_leverage_section([run], unb, {}, None)
    assert e["el_params"] is None and "unbounded" in e["reason"]
    ok = {"dense": law("ok", E=1.0, A=30.0, alpha=0.2)}
    (e,) = efficiency_leverage_section([run], ok, {}, chin)
    assert e["basis"] == "dense L(N)"
    assert 1.0 + 30.0 / (e["el_params"] * 1e5) ** 0.2 == pytest.approx(3.0, rel=1e-12)
    # L(N) not fitted at all (an IsoFLOP ladder whose held-out top size leaves 2 sizes at
    # one tokens/param ratio): the Chinchilla basis still applies, with its replicates'
    # interval; one replicate whose curve cannot reach the loss opens the upper edge
    nf = {"dense": {"status": "not_fitted", "reason": "2 distinct sizes"}}
    reps = {"E": [1.5, 1.45, 1.55, 2.9], "A": [400.0, 380.0, 420.0, 400.0],
            "B": [90.0] * 4, "alpha": [0.4, 0.41, 0.39, 0.4], "beta": [0.35] * 4}
    (e,) = efficiency_leverage_section([run], nf, {}, {**chin, "replicates": reps}, level=0.5)
    assert e["basis"].startswith("dense Chinchilla")
    el = [(A / (3.0 - E - B / 2e6 ** be)) ** (1 / al) / 1e5 if 3.0 - E - B / 2e6 ** be > 0
          else np.inf for E, A, B, al, be in zip(*(reps[k] for k in CHIN_NAMES))]
    assert np.isinf(el[-1]) and np.all(np.isfinite(el[:3]))
    srt = np.sort(el)  # 25th percentile of 4 values: 3/4 of the way from the 1st to the 2nd
    assert e["el_params_lo"] == pytest.approx(srt[0] + 0.75 * (srt[1] - srt[0]), rel=1e-12)
    assert e["el_params_hi"] is None and "1 of 4 replicates" in e["interval_note"]
    assert efficiency_leverage_section([run], nf, {}, None) == []


CHIN_NAMES = ("E", "A", "B", "alpha", "beta")


def test_joint_law_choice_never_sees_held_out_runs():
    # The old rule chose the law with the lowest held-out RMSE: scaling only the held-out
    # runs' losses by 0.97 made Clark "better" on this additive-law ladder. The choice is now
    # made by cross-validation on the fitted runs, so the held-out losses cannot move it.
    from moe.scaling import analyse, compare_joint_laws

    rows = ladder(sizes=SEVEN)
    train, held = split_holdout(rows, "largest")
    cmps, fits = {}, {}
    for f in (0.97, 1.0, 1.03):
        h = [{**r, "final_eval_loss": r["final_eval_loss"] * f} for r in held]
        cmps[f] = compare_joint_laws(train, h)
        flagged = train + [{**r, "held_out": True} for r in h]
        fits[f] = analyse(flagged, n_boot=4, holdout="flag")
    by_heldout = {f: min(("clark", "additive"), key=lambda k: c[k]["heldout_rmse_log"])
                  for f, c in cmps.items()}
    assert len(set(by_heldout.values())) == 2  # the held-out ranking does flip ...
    base = cmps[1.0]
    assert base["better"] == "additive"  # ... the choice does not (the generator's law)
    assert base["selected_by"].startswith("cross-validation on fitted runs")
    assert len(base["cv_folds_used"]) == 3
    for f, c in cmps.items():
        assert c["better"] == base["better"] and c["selected_by"] == base["selected_by"]
        for k in ("clark", "additive"):
            assert c[k]["params"] == base[k]["params"]
            assert c[k]["cv_rmse_log"] == base[k]["cv_rmse_log"]
            assert c[k]["cv_folds"] == base[k]["cv_folds"]
            # every fold is scored on training runs of the left-out size only
            for fold in c[k]["cv_folds"]:
                assert fold["n_train"] + fold["n_test"] <= len(train)
        j, j0 = fits[f]["joint_laws"], fits[1.0]["joint_laws"]
        assert j["better"] == j0["better"] == "additive"
        for k in ("clark", "additive"):
            for p in JOINT_PARAMS[k]:
                assert j[k][p] == j0[k][p]
                assert j[k]["replicates"][p] == j0[k]["replicates"][p]
            assert j[k]["cv_rmse_log"] == j0[k]["cv_rmse_log"]
    # the held-out runs still score the laws: their RMSE moves with their losses
    assert (fits[0.97]["joint_laws"]["additive"]["heldout_rmse_log"]
            != fits[1.03]["joint_laws"]["additive"]["heldout_rmse_log"])


JOINT_PARAMS = {"clark": ("a", "b", "c", "d"), "additive": ("E0", "A", "alpha", "B", "beta")}


def test_split_holdout_largest_is_the_top_size_of_every_level():
    # a size ladder: each level's top size, dense included
    rows = ladder(sizes=SEVEN)
    _, held = split_holdout(rows, "largest")
    assert sorted(r["name"] for r in held) == ["dense_1e+08", "moe32k2_1e+08", "moe8k2_1e+08"]
    # an IsoFLOP ladder: several sizes share the top nominal budget, their actual FLOPs
    # differ by rounding; the largest size at the top budget is held out, not the run that
    # rounded up most
    iso = []
    for budget in (1e11, 1e12):
        for i, n in enumerate((1e5, 2e5, 4e5)):
            for kind, ne in (("dense", 1), ("moe", 8)):
                d = budget / (6 * n)
                iso.append({"name": f"{kind}-{n:.0e}-{budget:.0e}", "kind": kind,
                            "n_experts": ne, "top_k": 2 if ne > 1 else 1,
                            "params_active": n, "params_total": n * (3 if ne > 1 else 1),
                            "tokens": d, "flop_budget": budget,
                            "flops": budget * (1.002 - 0.001 * i),  # the smallest rounds up most
                            "final_eval_loss": 3.0 + 1e3 / n ** 0.5})
    _, held = split_holdout(iso, "largest")
    assert sorted(r["name"] for r in held) == ["dense-4e+05-1e+12", "moe-4e+05-1e+12"]


def test_fmt_iv_precision_follows_the_interval():
    from moe.scaling.report import fmt_iv

    # two significant digits of the half-width set the last decimal kept
    assert fmt_iv(0.2248, 0.2167, 0.9588) == "0.22 [0.22, 0.96]"
    assert fmt_iv(1.188, 1.05, 1.31) == "1.19 [1.05, 1.31]"
    assert fmt_iv(2.3659, 2.300, 2.430) == "2.366 [2.300, 2.430]"
    assert fmt_iv(-0.0213, -0.035, -0.008) == "-0.021 [-0.035, -0.008]"
    assert fmt_iv(12345.6, 12000, 12800) == "12350 [12000, 12800]"  # tens: half-width 400
    # very large / small numbers in e-notation, digits down to the same place
    assert fmt_iv(3.2e8, 2.9e8, 3.6e8) == "3.20e+08 [2.90e+08, 3.60e+08]"
    assert fmt_iv(1.2e-6, 1.0e-6, 1.5e-6) == "1.20e-06 [1.00e-06, 1.50e-06]"
    # a narrower interval prints more digits of the same value
    assert fmt_iv(1.23456, 1.2340, 1.2351) == "1.23456 [1.23400, 1.23510]"
    # no interval: 4 significant figures of the value alone
    assert fmt_iv(1.23456) == "1.235"
    assert fmt_iv(1.23456, None, 1.3) == "1.235"
    assert fmt_iv(1.23456, 1.3, 1.3) == "1.235"
    assert fmt_iv(1.23456, float("nan"), 1.3) == "1.235"
    assert fmt_iv(None, 1, 2) == "-"


def test_paired_seed_differences_test_the_gaps(tmp_path):
    # 5 seeds of every level at one size (the ladder's seeds_s7 design): the gaps are tested
    # by differences paired by seed, and the test is the textbook paired t-test.
    from scipy import stats

    rows = ladder(sizes=SEVEN)
    for r in rows:
        r["seed"] = 0
    rng = np.random.default_rng(5)
    seed_noise = rng.normal(0, 0.01, size=5)  # shared per seed: what pairing removes
    names = ("dense_1e+07", "moe8k2_1e+07", "moe32k2_1e+07")
    by = {r["name"]: r for r in rows}
    losses = {}
    seeds = []
    for name in names:
        base = by[name]
        losses[name] = [base["final_eval_loss"]]
        for sd in range(1, 5):
            loss = base["final_eval_loss"] + seed_noise[sd] + rng.normal(0, 0.002)
            losses[name].append(loss)
            seeds.append({**base, "name": f"{name}-seed{sd}", "group": "seed",
                          "repeat_of": name, "seed": sd, "final_eval_loss": loss})
    path = write_results(rows + seeds, tmp_path / "r.csv")
    assert fit_main([str(path), "--out", str(tmp_path / "rep"), "--n-boot", "3"]) == 0
    fits = json.loads((tmp_path / "rep" / "fits.json").read_text())
    c = next(c for c in fits["sparsity_comparison"] if "dense_1e+07" in c["runs"])
    for g in c["gaps"]:
        p = g["paired"]
        a, b = np.array(losses[g["from"]]), np.array(losses[g["to"]])
        ref = stats.ttest_rel(b, a)
        assert p["n"] == 5 and p["seeds"] == [0, 1, 2, 3, 4] and p["df"] == 4
        assert p["mean"] == pytest.approx(np.mean(b - a))
        assert p["se"] == pytest.approx(np.std(b - a, ddof=1) / math.sqrt(5))
        assert p["t"] == pytest.approx(ref.statistic) and p["p"] == pytest.approx(ref.pvalue)
        half = stats.t.ppf(0.975, 4) * p["se"]
        assert (p["lo"], p["hi"]) == pytest.approx((p["mean"] - half, p["mean"] + half))
        assert g["test"] == f"paired t-test over 5 seeds: p = {p['p']:.2g}"
    # other sizes have one run per level: no test
    other = next(c for c in fits["sparsity_comparison"] if "dense_1e+08" in c["runs"])
    assert all(g["paired"] is None for g in other["gaps"])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Paired differences over seeds" in text
    g = c["gaps"][0]
    from moe.scaling.report import fmt_iv

    assert f"{fmt_iv(g['paired']['mean'], g['paired']['lo'], g['paired']['hi'])}" in text
