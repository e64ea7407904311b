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
    p = _write_csv(tmp_path / "r.csv", ladder(), drop=("params_active_nonembed",))
    with pytest.raises(ResultsError, match="missing required column.*'params_active_nonembed'"):
        load_results(p)


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


def test_write_report_on_ladder(tmp_path):
    path = write_report(ladder(), tmp_path / "rep", n_boot=8, holdout="largest")
    text = path.read_text()
    for png in ("loss_vs_active_params.png", "loss_vs_total_params.png", "loss_vs_flops.png",
                "efficiency_leverage.png", "maxvio.png"):
        f = tmp_path / "rep" / png
        assert f.exists() and f.stat().st_size > 5000, png
        assert f"]({png})" in text
    assert "## Extrapolation check" in text
    # every held-out run appears with a predicted value, its actual loss and a % error
    extrap = text.split("## Extrapolation check")[1].split("## Figures")[0]
    for name in ("dense_1e+08", "moe8k2_1e+08", "moe32k2_1e+08"):
        lines = [ln for ln in extrap.splitlines() if ln.startswith(f"| {name} |")]
        assert lines and all(ln.rstrip(" |").endswith("%") for ln in lines), name
    # The ladder is generated by the additive law: it must win the held-out comparison.
    assert "Better on held-out runs: **additive**" in text
    assert "Not fitted: 4 dense runs" in text  # approach 3 needs more dense runs
    summary = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert summary["joint"]["better"] == "additive"
    assert set(summary["power_law_active"]) == {"dense", "moe E8k2", "moe E32k2"}
    pred = summary["compute_law"]["dense"]["held_out_pred"]["dense_1e+08"]
    assert pred["lo"] <= pred["estimate"] <= pred["hi"]


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
    sec = text.split("## Chinchilla approach 3")[1].split("## MoE joint laws")[0]
    assert "Not fitted" not in sec
    row = next(ln for ln in sec.splitlines() if ln.startswith("| alpha |"))
    assert float(row.split("|")[2].split()[0]) == pytest.approx(0.347, rel=0.03)
    assert "| a (N_opt ~ C^a) |" in sec
    assert (tmp_path / "rep" / "chinchilla_fit.png").exists()
    assert "chinchilla_239 | Chinchilla L(N, D)" in text


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
    # The format moe/scaling/ladder.py writes: sparsity holds the level's NAME, dense rows
    # have n_experts = top_k = 0, unfinished runs are "pending" with an empty loss, and
    # "compare" rows are fixed-size variants that must not enter the fits.
    from moe.scaling import REQUIRED_COLUMNS
    from moe.scaling import ladder as ladder_mod

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
