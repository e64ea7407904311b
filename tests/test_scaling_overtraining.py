"""Gadre et al. 2024 over-training and downstream laws: the published reproduction, recovery, input checks.

    python -m pytest -q tests/test_scaling_overtraining.py

Reads only the packaged table moe/scaling/data/gadre2024_rpj.csv (never shared/).
"""
import math
from importlib import resources

import numpy as np
import pytest

from moe.scaling import (downstream_predict, fit_downstream, fit_overtraining,
                         overtraining_predict)
from moe.scaling.laws.overtraining import (OVERTRAINING_STARTS, gadre_fit_rows, load_gadre_rpj,
                                      main, reproduce_gadre)

# scaling_explorer.ipynb (their repository, a003c49): |predicted - actual| / actual, in %.
PUBLISHED_PCT = {("open_lm_1b", 32.0): {"loss": 0.7103, "error": 3.6365},
                 ("open_lm_7b", 1.0): {"loss": 0.7320, "error": 0.0464}}
# What this implementation gives on the packaged (5-decimal) table, in %; pinned so that a
# change of procedure shows up even where it stays inside the published 4 decimals.
MEASURED_PCT = {("open_lm_1b", 32.0): {"loss": 0.7107053, "error": 3.6367148},
                ("open_lm_7b", 1.0): {"loss": 0.7324473, "error": 0.0473376}}
# The shared README's fitted values, printed to the digits given here.
README_PARAMS = {"a": "166.2", "beta": "366.7", "b": "-0.2729", "E": "1.837",
                 "k": "2.206", "gamma": "0.715", "eps": "0.857"}

LOSS_FIT_NAMES = ["rpj-d=96_l=8_h=4-1.0", "rpj-d=512_l=8_h=4-1.0", "rpj-d=576_l=24_h=8-1.0",
                  "rpj-d=1024_l=24_h=8-1.0", "rpj-d=96_l=8_h=4-16.0"]


@pytest.fixture(scope="module")
def rows():
    return load_gadre_rpj()


def _arrays(rs):
    N = np.array([r["params_total"] for r in rs])
    M = np.array([20.0 * r["cc_mult"] for r in rs])
    return (N, M, np.array([r["final_eval_loss"] for r in rs]),
            np.array([r["error"] for r in rs]))


@pytest.fixture(scope="module")
def gadre_fits(rows):
    """Both laws fitted through the public functions only, as the README describes."""
    N, M, L, _ = _arrays(gadre_fit_rows(rows))
    _, _, dL, dErr = _arrays(gadre_fit_rows(rows, downstream=True))
    return fit_overtraining(N, M, L), fit_downstream(dL, dErr)


# ------------------------------------------------------------------ the packaged table


def test_packaged_table_is_the_rpj_runs_with_two_targets_held_out(rows):
    path = resources.files("moe.scaling").joinpath("data/gadre2024_rpj.csv")
    assert path.is_file() and "shared" not in str(path)
    assert len(rows) == 35 and len({r["name"] for r in rows}) == 35
    assert all(r["name"].startswith("rpj-") for r in rows)
    assert sorted((r["model"], r["cc_mult"]) for r in rows if r["held_out"]) == \
        sorted(PUBLISHED_PCT)
    for r in rows:
        assert r["kind"] == "dense" and r["n_experts"] == 1 and r["top_k"] == 1
        assert r["params_active"] == r["params_total"]
        assert r["params_active_nonembed"] == r["params_total_nonembed"] < r["params_total"]
        assert r["flops"] == pytest.approx(6 * r["params_total"] * r["tokens"], rel=1e-15)
        assert 1.5 < r["final_eval_loss"] < 7 and 0 < r["error"] < 1
    # tokens = 20 x cc_mult x params, up to their rounding of the token count
    for r in rows:
        assert r["tokens"] == pytest.approx(20 * r["cc_mult"] * r["params_total"], rel=1e-3)


def test_packaged_table_is_a_valid_results_table():
    from moe.scaling import load_results
    path = resources.files("moe.scaling").joinpath("data/gadre2024_rpj.csv")
    with resources.as_file(path) as p:
        got = load_results(p)
    assert len(got) == 35 and sum(r["held_out"] for r in got) == 2


def test_fit_rows_are_their_runs(rows):
    assert [r["name"] for r in gadre_fit_rows(rows)] == LOSS_FIT_NAMES
    ds = gadre_fit_rows(rows, downstream=True)
    assert [r["name"] for r in ds] == LOSS_FIT_NAMES + ["rpj-open_lm_1b-1.0"]
    assert not any(r["held_out"] for r in ds)
    with pytest.raises(ValueError, match="d=576_l=24_h=8 at cc_mult 1.0; found 0"):
        gadre_fit_rows([r for r in rows if r["name"] != "rpj-d=576_l=24_h=8-1.0"])
    with pytest.raises(ValueError, match="found 2"):
        gadre_fit_rows(rows + [rows[[r["name"] for r in rows].index(LOSS_FIT_NAMES[0])]])


# ------------------------------------------------------------------ the published reproduction


def test_reproduces_published_relative_errors(rows, gadre_fits):
    lfit, dfit = gadre_fits
    assert lfit["converged"] and dfit["converged"]
    assert lfit["n"] == 5 and dfit["n"] == 6
    for (model, cc), pub in PUBLISHED_PCT.items():
        [r] = [r for r in rows if r["model"] == model and r["cc_mult"] == cc]
        loss_pred = overtraining_predict(lfit, r["params_total"], 20.0 * cc)
        err_pred = downstream_predict(dfit, loss_pred)         # the chain (N, M) -> L -> Err
        loss_pct = 100 * abs(loss_pred - r["final_eval_loss"]) / r["final_eval_loss"]
        err_pct = 100 * abs(err_pred - r["error"]) / r["error"]
        assert loss_pct == pytest.approx(pub["loss"], abs=0.01), (model, cc)
        assert err_pct == pytest.approx(pub["error"], abs=0.01), (model, cc)
        # measured: within 0.001 pp of the published values (README), and pinned
        assert abs(loss_pct - pub["loss"]) < 1e-3 and abs(err_pct - pub["error"]) < 1e-3
        assert loss_pct == pytest.approx(MEASURED_PCT[(model, cc)]["loss"], abs=1e-5)
        assert err_pct == pytest.approx(MEASURED_PCT[(model, cc)]["error"], abs=1e-5)
        # both targets are over-predicted: the magnitudes above are also the signed errors
        assert loss_pred > r["final_eval_loss"] and err_pred > r["error"]


def test_fitted_parameters_match_readme(gadre_fits):
    # The README prints each value rounded to the digits in README_PARAMS, so the fit must
    # agree to half a unit in the last printed digit (i.e. round to the printed value). This
    # is tight: b = -0.2728525 is 4.7e-5 from -0.2729 (limit 5e-5); the fit on the unrounded
    # JSON values (-0.2728507) rounds the same way, so the 5-decimal table does not move it.
    lfit, dfit = gadre_fits
    got = {**{k: lfit[k] for k in ("a", "beta", "b", "E")},
           **{k: dfit[k] for k in ("k", "gamma", "eps")}}
    for key, printed in README_PARAMS.items():
        decimals = len(printed.split(".")[1])
        assert abs(got[key] - float(printed)) <= 0.5 * 10 ** -decimals, (key, got[key])
    assert lfit["b"] < 0 and lfit["objective"] == lfit["sse"] == pytest.approx(4.255032e-4,
                                                                                 rel=1e-5)
    assert lfit["n_starts"] == len(OVERTRAINING_STARTS) == 128
    assert lfit["n_converged"] == 128
    assert lfit["rse"] == pytest.approx(math.sqrt(lfit["sse"] / (5 - 4)))
    assert dfit["rse"] == pytest.approx(math.sqrt(dfit["sse"] / (6 - 3)))


def test_kept_fit_is_the_lowest_sse_over_the_grid(rows, gadre_fits):
    lfit, _ = gadre_fits
    N, M, L, _ = _arrays(gadre_fit_rows(rows))
    # a worse start alone converges elsewhere or no better; the grid keeps the minimum
    for p0 in OVERTRAINING_STARTS[::17]:
        one = fit_overtraining(N, M, L, starts=[p0])
        assert one["n_starts"] == 1 and one["start"] == tuple(p0)
        assert one["sse"] >= lfit["sse"] * (1 - 1e-9)
    sse = np.sum((overtraining_predict(lfit, N, M) - L) ** 2)
    assert sse == pytest.approx(lfit["sse"], rel=1e-12)


def test_reproduce_gadre_and_main_report_the_same_numbers(gadre_fits, capsys):
    lfit, dfit = gadre_fits
    res = reproduce_gadre()
    assert res["loss_fit"]["a"] == pytest.approx(lfit["a"], rel=1e-12)
    assert res["downstream_fit"]["gamma"] == pytest.approx(dfit["gamma"], rel=1e-12)
    got = {(t["model"], t["cc_mult"]): t for t in res["targets"]}
    for key, m in MEASURED_PCT.items():
        assert 100 * got[key]["loss_rel_err"] == pytest.approx(m["loss"], abs=1e-5)
        assert 100 * got[key]["error_rel_err"] == pytest.approx(m["error"], abs=1e-5)
    main()
    out = capsys.readouterr().out
    for line in ("(open_lm_1b, M=640) C4 loss: 0.7107%", "(open_lm_7b, M=20) C4 loss: 0.7324%",
                 "(open_lm_1b, M=640) 17-task top-1 error: 3.6367%",
                 "(open_lm_7b, M=20) 17-task top-1 error: 0.0473%"):
        assert line in out


# ------------------------------------------------------------------ recovery, noise-free


@pytest.mark.parametrize("true", [
    {"a": 166.2, "beta": 366.7, "b": -0.2729, "E": 1.837},     # near Gadre's RedPajama fit
    {"a": 900.0, "beta": 2500.0, "b": -0.35, "E": 2.4},        # steeper, far from it
])
def test_overtraining_recovers_known_law(true):
    # 4 sizes x 3 token multipliers over their range (10M-1.4B params, M = 20-640)
    N, M = np.meshgrid(np.logspace(7, 9.2, 4), np.array([20.0, 80.0, 640.0]))
    N, M = N.ravel(), M.ravel()
    fit = fit_overtraining(N, M, overtraining_predict(true, N, M))
    assert fit["converged"] and fit["n"] == 12
    for k in true:
        assert fit[k] == pytest.approx(true[k], rel=1e-5), k
    assert fit["sse"] < 1e-18


def test_overtraining_predict_matches_the_formula():
    p = {"a": 200.0, "beta": 300.0, "b": -0.3, "E": 1.5}
    N, M = 1.0e8, 40.0
    D = M * N
    want = 1.5 + 200.0 * N ** -0.3 + 300.0 * 6 ** -0.15 * D ** -0.3
    assert overtraining_predict(p, N, M) == pytest.approx(want, rel=1e-14)
    got = overtraining_predict(p, [N, 2 * N], 40.0)              # broadcasts
    assert isinstance(got, np.ndarray) and got.shape == (2,) and got[1] < got[0]
    # more tokens per parameter at fixed N lowers the loss toward E + a N^b
    by_m = overtraining_predict(p, N, [20.0, 640.0, 1e30])
    assert by_m[0] > by_m[1] > by_m[2] == pytest.approx(1.5 + 200.0 * N ** -0.3, rel=1e-8)


@pytest.mark.parametrize("true", [{"k": 2.206, "gamma": 0.715, "eps": 0.857},
                                  {"k": 5.0, "gamma": 1.3, "eps": 0.75}])
def test_downstream_recovers_known_law(true):
    L = np.linspace(2.4, 6.0, 8)
    fit = fit_downstream(L, downstream_predict(true, L))
    assert fit["converged"] and fit["n"] == 8
    for k in true:
        assert fit[k] == pytest.approx(true[k], rel=1e-6), k
    assert downstream_predict(true, 2.0) == pytest.approx(
        true["eps"] - true["k"] * math.exp(-true["gamma"] * 2.0), rel=1e-14)


def test_non_converged_starts_are_skipped_and_reported():
    N = np.array([1e7, 1e8, 1e9, 1e7, 1e8])
    M = np.array([20.0, 20.0, 20.0, 320.0, 320.0])
    L = overtraining_predict({"a": 166.2, "beta": 366.7, "b": -0.2729, "E": 1.837}, N, M)
    bad = (1e2, 1e2, 80.0, 0.0)              # N^80 overflows: non-finite at the start
    none = fit_overtraining(N, M, L, starts=[bad])
    assert not none["converged"] and none["n_converged"] == 0 and none["start"] is None
    assert all(math.isnan(none[k]) for k in ("a", "beta", "b", "E", "objective"))
    some = fit_overtraining(N, M, L, starts=[bad, OVERTRAINING_STARTS[0]])
    assert some["converged"] and some["n_converged"] == 1
    assert some["start"] == OVERTRAINING_STARTS[0]


# ------------------------------------------------------------------ bad input


GOOD = dict(N=[1e7, 1e8, 1e9, 1e7, 1e8], M=[20.0, 20, 20, 320, 320],
            loss=[4.0, 3.5, 3.0, 3.6, 3.2])


@pytest.mark.parametrize("change, match", [
    ({"N": [1e7, 1e8, math.nan, 1e7, 1e8]}, "N must be finite"),
    ({"M": [20.0, 20, math.inf, 320, 320]}, "M must be finite"),
    ({"loss": [4.0, 3.5, 3.0, 3.6, -math.inf]}, "loss must be finite"),
    ({"N": [1e7, 0.0, 1e9, 1e7, 1e8]}, "N must be > 0"),
    ({"M": [20.0, 20, -20, 320, 320]}, "M must be > 0"),
    ({"loss": [4.0, 3.5, 0.0, 3.6, 3.2]}, "loss must be > 0"),
    ({"M": [20.0, 20, 20, 320]}, "lengths differ: 5, 4, 5"),
    ({"N": [1e7, 1e8, 1e9], "M": [20.0, 20, 320], "loss": [4.0, 3.5, 3.0]}, "4 parameters; got 3"),
    ({"N": [[1e7, 1e8, 1e9, 1e7, 1e8]]}, "N must be one-dimensional"),
])
def test_fit_overtraining_rejects_bad_input(change, match):
    kw = {**GOOD, **change}
    with pytest.raises(ValueError, match=match):
        fit_overtraining(kw["N"], kw["M"], kw["loss"])


@pytest.mark.parametrize("loss, err, match", [
    ([3.0, 3.5, math.nan, 4.5], [0.5, 0.6, 0.7, 0.8], "loss must be finite"),
    ([3.0, 3.5, 4.0, 4.5], [0.5, math.inf, 0.7, 0.8], "err must be finite"),
    ([3.0, -3.5, 4.0, 4.5], [0.5, 0.6, 0.7, 0.8], "loss must be > 0"),
    ([3.0, 3.5, 4.0, 4.5], [0.5, 0.6, 0.7], "lengths differ: 4 vs 3"),
    ([3.0, 3.5], [0.5, 0.6], "3 parameters; got 2"),
])
def test_fit_downstream_rejects_bad_input(loss, err, match):
    with pytest.raises(ValueError, match=match):
        fit_downstream(loss, err)
