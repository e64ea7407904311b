"""Chinchilla approach 2 (IsoFLOP, Porian et al. 2024): recovery, dropping, grouping,
bootstrap, and the digitised Chinchilla points.

    python -m pytest tests/test_scaling_isoflop.py -q
"""
import json
import math

import numpy as np
import pytest

from moe.scaling import (CHINCHILLA_ISOFLOP_BUDGETS, CHINCHILLA_PUBLISHED, chinchilla_frontier,
                         chinchilla_predict, fit_isoflop, isoflop_predict_n,
                         load_chinchilla_points)

PUB = CHINCHILLA_PUBLISHED
A_TRUE = PUB["beta"] / (PUB["alpha"] + PUB["beta"])   # N* ~ C^a, 0.4516
B_TRUE = PUB["alpha"] / (PUB["alpha"] + PUB["beta"])  # D* ~ C^b, 0.5484
SIZE_GRID = 10.0 ** np.arange(6.0, 12.0, 0.125)       # one global grid: 8 sizes per decade


def isoflop_runs(budgets, lo=0.1, hi=10.0, jitter=0.0, seed=0):
    """Noise-free runs of the published law, D = C / (6N): at each budget every size of
    SIZE_GRID within [lo, hi] x the analytic N*. The global grid puts the runs off-centre
    around N*, as in a real ladder. jitter: each run's FLOPs times exp(U(-jitter, jitter))."""
    rng = np.random.default_rng(seed)
    C, N = [], []
    for c in budgets:
        n_star = chinchilla_frontier(PUB, c)[0]
        sizes = SIZE_GRID[(SIZE_GRID >= lo * n_star) & (SIZE_GRID <= hi * n_star)]
        C += [c] * len(sizes)
        N += list(sizes)
    C, N = np.array(C), np.array(N)
    C = C * np.exp(rng.uniform(-jitter, jitter, C.size))
    D = C / (6.0 * N)
    return C, N, chinchilla_predict(PUB, N, D), D


BUDGETS = 10.0 ** np.arange(18.0, 22.01, 0.5)  # 1e18 .. 1e22, nine budgets


@pytest.fixture(scope="module")
def clean_fit():
    return fit_isoflop(*isoflop_runs(BUDGETS), n_boot=200)


def _plain(x):
    """Only builtin JSON types (np.float64 is a float subclass; reject it explicitly)."""
    if isinstance(x, dict):
        return all(type(k) is str and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (float, int, str, bool)


# ------------------------------------------------------------------ noise-free recovery


def test_recovers_exponents_noise_free(clean_fit):
    fit = clean_fit
    # measured: exponent 0.451693 (rel. error 1.8e-4), d_exponent 0.548307 (-1.5e-4)
    assert fit["exponent"] == pytest.approx(A_TRUE, rel=0.01)
    assert fit["d_exponent"] == pytest.approx(B_TRUE, rel=0.01)
    assert fit["n_budgets"] == 9 and fit["dropped"] == [] and fit["unassigned_runs"] == 0
    assert fit["r2"] > 0.9999
    # the line passes through C^a with the frontier's prefactor G 6^-a (ln, not log10)
    G = (PUB["alpha"] * PUB["A"] / (PUB["beta"] * PUB["B"])) ** (1 / (PUB["alpha"] + PUB["beta"]))
    assert fit["intercept"] == pytest.approx(math.log(G * 6.0 ** -A_TRUE), abs=0.05)
    for b in fit["budgets"]:
        n_star, d_star, l_star = chinchilla_frontier(PUB, b["flops"])
        # the interpolation grid steps by 1.2% in N here; measured max error 0.5%
        assert b["n_opt"] == pytest.approx(n_star, rel=0.01)
        assert b["d_opt"] == pytest.approx(d_star, rel=0.01)
        assert b["loss_opt"] == pytest.approx(l_star, rel=1e-4)
        assert b["n_runs"] == b["n_sizes"] == 16 and b["d_edge"] is False
        # C = 6ND exactly: the separate D profile is the N profile mirrored
        assert b["d_opt"] == pytest.approx(b["flops"] / (6.0 * b["n_opt"]), rel=1e-9)
    assert isoflop_predict_n(fit, 1e21) == pytest.approx(chinchilla_frontier(PUB, 1e21)[0],
                                                         rel=0.01)
    assert isoflop_predict_n(fit, np.array([1e20, 1e21])).shape == (2,)


def test_result_is_plain_json(clean_fit):
    assert _plain(clean_fit)
    json.dumps(clean_fit, allow_nan=False)
    keys = {"exponent", "intercept", "exponent_interval", "r2", "resid_std", "n_budgets",
            "budgets", "dropped", "unassigned_runs", "n_boot", "failed_replicates", "seed",
            "level", "rtol", "exponent_replicates", "intercept_replicates", "d_exponent",
            "d_intercept", "d_exponent_interval", "d_r2", "d_resid_std",
            "d_exponent_replicates", "d_intercept_replicates", "interval_note",
            "exponent_profile_interval", "d_exponent_profile_interval"}
    assert set(clean_fit) == keys
    no_tokens = fit_isoflop(*isoflop_runs(BUDGETS)[:3], n_boot=10)
    assert set(no_tokens) == {k for k in keys if not k.startswith("d_")}
    assert "d_opt" not in no_tokens["budgets"][0]
    assert no_tokens["exponent"] == clean_fit["exponent"]


# ------------------------------------------------------------------ dropping


def test_one_sided_and_small_budgets_are_dropped():
    C, N, L, D = isoflop_runs(BUDGETS[:4])  # 1e18 .. 3e19, complete
    # 1e20: every size below the optimum -> loss falls to the largest N, argmin on the edge
    C2, N2, L2, D2 = isoflop_runs([1e20], lo=1 / 30, hi=1 / 3)
    # 1e21: every size above the optimum -> argmin at the smallest N
    C3, N3, L3, D3 = isoflop_runs([1e21], lo=3, hi=30)
    # 1e22: only two sizes (three runs: one size twice)
    n_star = chinchilla_frontier(PUB, 1e22)[0]
    C4, N4 = np.full(3, 1e22), n_star * np.array([0.8, 1.25, 0.8])
    D4 = C4 / (6.0 * N4)
    L4 = chinchilla_predict(PUB, N4, D4)
    cat = [np.concatenate(x) for x in zip((C, N, L, D), (C2, N2, L2, D2), (C3, N3, L3, D3),
                                          (C4, N4, L4, D4))]
    fit = fit_isoflop(*cat, n_boot=50)
    assert fit["n_budgets"] == 4
    reasons = {d["flops"]: d["reason"] for d in fit["dropped"]}
    assert sorted(reasons) == pytest.approx([1e20, 1e21, 1e22])  # geometric means of exact C
    by_c = {round(math.log10(c)): r for c, r in reasons.items()}
    assert by_c[20].startswith("edge argmin") and "largest N" in by_c[20]
    assert by_c[21].startswith("edge argmin") and "smallest N" in by_c[21]
    assert by_c[22].startswith("fewer than 3 distinct N (2 distinct in 3 runs)")
    # the four kept budgets alone give the same line
    assert fit["exponent"] == pytest.approx(fit_isoflop(C, N, L, D, n_boot=0)["exponent"])


def test_fewer_than_two_budgets_and_bad_input_raise():
    C, N, L, D = isoflop_runs([1e19, 1e20])
    C2, N2, L2, _ = isoflop_runs([1e21], lo=3, hi=30)
    with pytest.raises(ValueError, match="needs >= 2 kept budgets, got 1") as e:
        fit_isoflop(np.r_[C[:20], C2], np.r_[N[:20], N2], np.r_[L[:20], L2])
    assert "edge argmin" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="n has 3 values"):
        fit_isoflop(C, N[:3], L)
    with pytest.raises(ValueError, match="loss must be"):
        fit_isoflop(C, N, -L)
    with pytest.raises(ValueError, match="rtol"):
        fit_isoflop(C, N, L, rtol=0)
    with pytest.raises(ValueError, match="level"):
        fit_isoflop(C, N, L, level=1.0)


# ------------------------------------------------------------------ grouping


def test_grouping_with_jittered_flops():
    # each run's FLOPs off its budget by up to 3%; budgets 10^0.5 = 3.2x apart
    C, N, L, D = isoflop_runs(BUDGETS, jitter=0.03, seed=1)
    fit = fit_isoflop(C, N, L, D, n_boot=50)
    assert fit["n_budgets"] == 9 and fit["dropped"] == []
    for b, c in zip(fit["budgets"], BUDGETS):
        assert b["n_runs"] == 16
        lo, hi = b["flops_range"]
        m = (C >= lo) & (C <= hi)
        assert m.sum() == 16
        assert b["flops"] == pytest.approx(math.exp(np.log(C[m]).mean()), rel=1e-12)
        assert b["flops"] == pytest.approx(c, rel=0.03)
    # runs of one budget now differ in compute by up to 6%, which bends the profiles:
    # measured exponent -1.3% (d_exponent +2.9%) off the truth, against 2e-4 without jitter
    assert fit["exponent"] == pytest.approx(A_TRUE, rel=0.02)
    # nominal budgets: the same nine groups, budget value = nominal
    nom = fit_isoflop(C, N, L, D, nominal=BUDGETS, n_boot=50)
    assert [b["flops"] for b in nom["budgets"]] == pytest.approx(list(BUDGETS))
    assert nom["unassigned_runs"] == 0
    # an rtol tighter than the jitter splits budgets into fragments (most too small to fit)
    frag = fit_isoflop(C, N, L, D, rtol=0.001, n_boot=0)
    assert frag["n_budgets"] + len(frag["dropped"]) > 9


def test_nominal_budgets_leave_far_runs_unassigned():
    C, N, L, D = isoflop_runs([1e19, 1e20, 1e21])
    fit = fit_isoflop(np.r_[C, 3e19], np.r_[N, 1e9], np.r_[L, 3.0], nominal=[1e19, 1e20, 1e21],
                      n_boot=0)
    assert fit["unassigned_runs"] == 1 and fit["n_budgets"] == 3
    empty = fit_isoflop(C, N, L, nominal=[1e19, 1e20, 1e21, 1e23], n_boot=0)
    assert empty["dropped"] == [{"flops": 1e23, "reason": "fewer than 3 distinct N (0 distinct "
                                 "in 0 runs)", "n_runs": 0, "flops_range": []}]


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    C, N, L, D = isoflop_runs(BUDGETS, jitter=0.03, seed=2)
    a = fit_isoflop(C, N, L, D, n_boot=300, seed=5)
    b = fit_isoflop(C, N, L, D, n_boot=300, seed=5)
    c = fit_isoflop(C, N, L, D, n_boot=300, seed=6)
    assert a["exponent_replicates"] == b["exponent_replicates"]
    assert a["exponent_replicates"] != c["exponent_replicates"]
    assert len(a["exponent_replicates"]) == len(a["intercept_replicates"]) == 300
    assert a["failed_replicates"] == 0  # 9 budgets: a one-budget draw has p = 9 / 9^9
    lo, hi = a["exponent_interval"]["lo"], a["exponent_interval"]["hi"]
    assert lo < a["exponent"] < hi and lo < hi
    assert lo == pytest.approx(np.percentile(a["exponent_replicates"], 2.5))
    lo_d, hi_d = a["d_exponent_interval"]["lo"], a["d_exponent_interval"]["hi"]
    assert lo_d < a["d_exponent"] < hi_d
    # replicate pairs are real refits: each pair reproduces a line through resampled budgets
    assert np.std(a["exponent_replicates"]) > 0


def test_bootstrap_counts_failed_replicates():
    # two budgets: a draw of one budget twice (p = 1/2) cannot fit a line
    C, N, L, _ = isoflop_runs([1e19, 1e21])
    fit = fit_isoflop(C, N, L, n_boot=400, seed=0)
    assert 150 < fit["failed_replicates"] < 250
    assert len(fit["exponent_replicates"]) == 400 - fit["failed_replicates"]
    assert fit["resid_std"] is None and fit["r2"] == pytest.approx(1.0)
    # every successful replicate uses both budgets, so equals the point estimate
    reps = fit["exponent_replicates"]
    assert reps == pytest.approx([fit["exponent"]] * len(reps))
    assert fit_isoflop(C, N, L, n_boot=0)["exponent_interval"] is None
    # two or three budgets: the replicates all but repeat the point fit, so no interval
    assert fit["exponent_interval"] is None and "2 kept budgets" in fit["interval_note"]
    three = fit_isoflop(*isoflop_runs([1e19, 1e20, 1e21])[:3], n_boot=200, seed=0)
    assert three["exponent_interval"] is None and "needs >= 4" in three["interval_note"]
    four = fit_isoflop(*isoflop_runs([1e19, 1e20, 1e21, 1e22])[:3], n_boot=200, seed=0)
    assert four["exponent_interval"] is not None and four["interval_note"] == ""


# ------------------------------------------------------------------ digitised Chinchilla


@pytest.fixture(scope="module")
def chinchilla():
    N, D, L = load_chinchilla_points(drop_highest=0)
    return 6.0 * N * D, N, L, D


def test_chinchilla_digitised_points(chinchilla):
    C, N, L, D = chinchilla
    fit = fit_isoflop(C, N, L, D, nominal=CHINCHILLA_ISOFLOP_BUDGETS)
    # the default rtol (0.1) assigns runs to all nine budgets, and every one is kept
    assert fit["n_budgets"] == 9 and fit["dropped"] == []
    assert [b["flops"] for b in fit["budgets"]] == list(CHINCHILLA_ISOFLOP_BUDGETS)
    assert sum(b["n_runs"] for b in fit["budgets"]) + fit["unassigned_runs"] == 245
    # Measured: exponent 0.4856, 95% interval (0.400, 0.537), d_exponent 0.5024.
    # Hoffmann et al. 2022 (Table 2, approach 2, parabola fits of the undigitised runs):
    # a = 0.49 (0.462, 0.534), b = 0.51 (0.483, 0.529), 10th-90th percentiles. Digitised
    # points (loss quantised through the colour map, approach-1 runs mixed into the FLOP
    # windows) add error, so assert only that the estimates fall inside the published
    # intervals and that ours covers the published value.
    assert 0.462 < fit["exponent"] < 0.534
    assert 0.483 < fit["d_exponent"] < 0.529
    assert fit["exponent_interval"]["lo"] < 0.49 < fit["exponent_interval"]["hi"]
    assert fit["failed_replicates"] == 0
    # The figure repeats model sizes with 2e-7 relative digitisation differences; unmerged,
    # Akima's slopes blow up between them (the 6e19 profile's minimum fell to loss ~0).
    # Merged, every interpolated minimum is within 0.15% of the budget's best run.
    for b in fit["budgets"]:
        runs = np.abs(np.log(C / b["flops"])) <= math.log1p(fit["rtol"])
        assert b["n_runs"] == runs.sum() and b["n_sizes"] <= b["n_runs"]
        assert 0.998 * L[runs].min() <= b["loss_opt"] <= L[runs].min()


def test_near_identical_sizes_are_one_model():
    C, N, L, D = isoflop_runs([1e19, 1e20, 1e21])
    # a second run of one 1e20 size, N off by 3e-7 (as digitised), 1% worse loss
    i = int(np.argmin(np.where(C == 1e20, L, np.inf)))
    fit = fit_isoflop(np.r_[C, C[i]], np.r_[N, N[i] * (1 + 3e-7)], np.r_[L, L[i] * 1.01],
                      n_boot=0)
    ref = fit_isoflop(C, N, L, n_boot=0)
    b = fit["budgets"][1]
    assert b["n_runs"] == ref["budgets"][1]["n_runs"] + 1 == b["n_sizes"] + 1
    assert b["n_opt"] == ref["budgets"][1]["n_opt"] and fit["exponent"] == ref["exponent"]


def test_chinchilla_points_do_not_cluster_into_nine_budgets(chinchilla):
    # Without nominal budgets the FLOPs chain: Figure 4 also holds approach-1 runs whose
    # FLOPs fall between the IsoFLOP budgets (measured: one "budget" spans 1.6e19-1.5e20).
    C, N, L, D = chinchilla
    fit = fit_isoflop(C, N, L, D, n_boot=0)
    widest = max(hi / lo for lo, hi in (b["flops_range"] for b in fit["budgets"]))
    assert widest > 5
