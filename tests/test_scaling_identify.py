"""Fits that say when they cannot know (issue 23): degenerate and unidentified laws,
optimiser tolerances that reach the optimum, profile-likelihood intervals, and a report
that never prints a non-ok law's value bare."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

from moe.scaling.analysis.entries import COLLAPSE_FRAC, boot_law, replicate_modes
from moe.scaling.analysis.kinds import column, pl_at_bound
from moe.scaling.analysis.schema import read_fits, write_fits
from moe.scaling.laws.chinchilla import fit_chinchilla, load_chinchilla_points
from moe.scaling.laws.isoflop import fit_isoflop
from moe.scaling.laws.lse import REFIT_RTOL
from moe.scaling.laws.objective import lse_objective
from moe.scaling.laws.power import fit_power_law
from moe.scaling.laws.profile import law_profiles, lse_profile
from moe.scaling.report import render_report
from moe.scaling.table import load_results

REPO = Path(__file__).resolve().parents[1]
# the CPU ladders as committed at 128aea6 (before issue 25's redesign), kept as fixtures
LADDER = REPO / "tests/data/ladder_cpu_128aea6/results.csv"
ISOFLOP = REPO / "tests/data/ladder_cpu_isoflop_128aea6/results.csv"


def _dense_grid(path=LADDER):
    rows = load_results(path)
    return [r for r in rows if r["kind"] == "dense" and not r.get("held_out")
            and r.get("group", "grid") == "grid"]


# ------------------------------------------------------------- the optimum itself


def test_refit_from_reported_point_does_not_improve():
    """The committed ladder's dense L(N): scipy's default tolerances stopped at E = 0.046
    (objective 8.2602e-5); the reported point must be the optimum, which a tight refit
    started from it cannot lower by more than REFIT_RTOL."""
    d = _dense_grid()
    x, L = column(d, "params_active"), column(d, "final_eval_loss")
    p = fit_power_law(x, L)
    assert p["refit_ok"] and p["converged"]
    prob = p["_problem"]
    res = minimize(lse_objective, prob["theta"], args=(prob["logX"], prob["logL"], 1e-3,
                                                          "sum"),
                   jac=True, method="L-BFGS-B", bounds=prob["bounds"],
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000})
    assert p["objective_sum"] - res.fun <= REFIT_RTOL * p["objective_sum"]
    # the early stop's objective was 8.2602e-5: the optimum is lower, with E collapsed
    assert p["objective_sum"] < 8.2550e-5
    assert p["E"] < COLLAPSE_FRAC * L.min()
    # every start reaches the same objective, but E's log differs by decades among them:
    # a flat valley, recorded as multi-start agreement with a parameter spread
    assert p["starts_agree"] == p["starts_finished"] >= 2
    assert p["starts_spread"] > 0.5


def test_chinchilla_reproduction_unchanged_by_tight_tolerances():
    """The tight options still give Besiroglu et al.'s replication optimum (1.01827e-3)."""
    fit = fit_chinchilla(*load_chinchilla_points())
    assert fit["objective"] == pytest.approx(1.01827e-3, rel=2e-5)
    assert fit["refit_ok"] and fit["starts_agree"] >= 2


# -------------------------------------------------------------------- modes


@pytest.mark.parametrize("draw", [
    lambda r, n: r.normal(0.3, 0.05, n),
    lambda r, n: r.lognormal(0.0, 0.5, n),
    lambda r, n: r.standard_t(3, n),
    lambda r, n: r.uniform(0.0, 1.0, n),
])
def test_no_modes_in_unimodal_replicates(draw):
    rng = np.random.default_rng(0)
    for i in range(200):
        n = (50, 100, 200, 400)[i % 4]
        assert replicate_modes(draw(rng, n)) is None


def test_two_populations_are_found():
    """The CPU ladder's dense E replicates fell into ~0 and > 1 (35% and 39%)."""
    rng = np.random.default_rng(1)
    x = np.concatenate([np.abs(rng.normal(0.0, 0.02, 70)), rng.normal(1.6, 0.25, 130)])
    m = replicate_modes(x)
    assert m is not None
    assert m["masses"][0] == pytest.approx(0.35, abs=0.03)
    assert m["medians"][0] < 0.1 and m["medians"][1] > 1.2
    # amplitudes spanning decades are split in log units
    amp = np.concatenate([rng.lognormal(np.log(30), 0.1, 100), rng.lognormal(np.log(3e6), 0.3, 60)])
    assert replicate_modes(amp, log=True) is not None


# ------------------------------------------------------------- law statuses


def _law(rows, fit, **kw):
    return boot_law(lambda rs: fit(column(rs, "params_active"), column(rs, "final_eval_loss")),
                     rows, ("E", "A", "alpha"), n_params=3, key=lambda r: r["params_active"],
                     at_bound=pl_at_bound, n_boot=40, seed=0, level=0.95, law="L(N)",
                     progress=False, irreducible="E", log_scale=("A",), **kw)


def test_collapsed_irreducible_loss_is_degenerate_and_named():
    e = _law(_dense_grid(), fit_power_law)
    assert e["status"] == "degenerate" and not e["bounded"]
    assert e["reason"].startswith("E = ") and "collapsed to 0" in e["reason"]
    assert e["optimum"]["refit_ok"]


def test_identified_law_stays_ok():
    """Noise-free-ish runs of a law with a clear irreducible term: ok, no modes."""
    rng = np.random.default_rng(3)
    n = np.geomspace(1e6, 1e9, 8)
    loss = (1.7 + 300.0 / n ** 0.3) * np.exp(rng.normal(0, 0.002, n.size))
    rows = [{"params_active": float(a), "final_eval_loss": float(b)} for a, b in zip(n, loss)]
    e = _law(rows, fit_power_law)
    assert e["status"] == "ok", e["reason"]
    assert "modes" not in e and e["E"]["value"] > 1.5


def test_bound_reason_names_the_parameter():
    p = {"alpha": 0.0, "a_log": 1.0}
    assert pl_at_bound(p).startswith("alpha = 0")
    assert pl_at_bound({"alpha": 0.3, "a_log": 50.0}).startswith("the amplitude")
    assert pl_at_bound({"alpha": 0.3, "a_log": 1.0}) == ""


def test_split_replicates_make_a_law_unidentified(monkeypatch):
    """A point fit that is fine but whose replicates fall into two populations."""
    calls = {"n": 0}

    def fit(x, loss):
        calls["n"] += 1
        first = calls["n"] == 1
        E = 1.5 if first or calls["n"] % 3 else 0.6
        return {"E": E, "A": 10.0, "alpha": 0.3, "a_log": 1.0, "objective_sum": 1e-4,
                "converged": True}

    rows = [{"params_active": float(v), "final_eval_loss": 3.0 - 0.1 * i}
            for i, v in enumerate(np.geomspace(1e4, 1e6, 8))]
    monkeypatch.setattr("moe.scaling.laws.resample._workers", lambda w, n: 1)
    e = _law(rows, fit)
    assert e["status"] == "unidentified", e["reason"]
    assert "E's bootstrap replicates split into two modes" in e["reason"]
    assert set(e["modes"]) == {"E"}


# ------------------------------------------------------------ profile likelihood


def test_profile_interval_covers_the_truth():
    """Coverage of the 95% profile interval of alpha over repeated noisy ladders (8 sizes,
    1% noise): a check that the threshold is calibrated, not a number copied from a run."""
    rng = np.random.default_rng(7)
    n = np.geomspace(1e5, 1e8, 8)
    hits, widths = 0, []
    reps = 40
    for _ in range(reps):
        loss = (2.0 + 80.0 / n ** 0.35) * np.exp(rng.normal(0, 0.01, n.size))
        p = fit_power_law(n, loss)
        prob = p["_problem"]
        a = lse_profile(prob["logX"], prob["logL"], prob["theta"], index=2,
                        limits=(0.0, 5.0), bounds=prob["bounds"])
        assert a["lo"] <= a["value"] <= a["hi"]
        hits += a["lo"] <= 0.35 <= a["hi"]
        widths.append(a["hi"] - a["lo"])
    # binomial(40, 0.95): P(hits < 34) ~ 0.2%; a threshold off by a factor would miss more
    assert hits >= 34, hits
    assert np.median(widths) < 1.0


def test_profile_over_E_on_the_committed_ladder():
    """The issue's finding: E = 0 (alpha ~0.22) and E = 1.0 (alpha ~0.34) fit the dense
    ladder about equally well. The profile interval of E reaches its lower limit 0, and the
    exponents conditional on stated E grow with E, each row inside the threshold."""
    d = _dense_grid()
    p = fit_power_law(column(d, "params_active"), column(d, "final_eval_loss"))
    pr = law_profiles(p, exponents={"alpha": (2, 1.0)}, irreducible="E")
    E = pr["E"]
    assert E["lo"] == 0.0 and E["lo_open"] and not E["hi_open"]
    assert E["hi"] > 1.0
    rows = pr["conditional"]["rows"]
    assert rows[0]["E"] == 0.0
    assert all(r["F"] <= _fcrit(pr) + 1e-6 for r in rows)
    alphas = [r["alpha"] for r in rows]
    assert alphas == sorted(alphas) and alphas[-1] > alphas[0] + 0.1
    # alpha's own profile interval spans both readings
    assert pr["alpha"]["lo"] < 0.23 and pr["alpha"]["hi"] > 0.34


def _fcrit(pr):
    from scipy.stats import f

    return f.ppf(pr["level"], 1, pr["dof"])


def test_profile_needs_residual_dof():
    x = np.array([1.0, 2.0, 4.0])
    assert lse_profile([np.log(x)], np.log([3.0, 2.5, 2.2]), np.array([0.0, 0.0, 0.5]),
                       index=2, limits=(0.0, 5.0)) is None


def test_isoflop_profile_interval_is_the_t_interval():
    from scipy.stats import t

    c = np.array([1e10, 1e11, 1e12, 1e13])
    rows_c, rows_n, rows_l = [], [], []
    rng = np.random.default_rng(0)
    for ci in c:
        n_opt = 0.1 * ci ** 0.5 * math.exp(rng.normal(0, 0.1))
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            n = n_opt * f
            rows_c.append(ci), rows_n.append(n)
            rows_l.append(2.0 + 0.3 * math.log(f) ** 2)
    fit = fit_isoflop(rows_c, rows_n, rows_l, n_boot=0)
    pi = fit["exponent_profile_interval"]
    logc = np.log([b["flops"] for b in fit["budgets"]])
    logn = np.log([b["n_opt"] for b in fit["budgets"]])
    X = np.column_stack([np.ones_like(logc), logc])
    beta, res, *_ = np.linalg.lstsq(X, logn, rcond=None)
    se = math.sqrt(res[0] / 2 / np.sum((logc - logc.mean()) ** 2))
    half = t.ppf(0.975, 2) * se
    assert pi["lo"] == pytest.approx(beta[1] - half) and pi["hi"] == pytest.approx(beta[1] + half)


# ------------------------------------------------------------------- report, schema


@pytest.fixture(scope="module")
def ladder_fits():
    from moe.scaling.analysis.analyse import analyse

    return analyse(load_results(LADDER), n_boot=8, progress=False)


def test_committed_ladder_marks_its_degenerate_fits(ladder_fits):
    for level in ("dense", "moe8", "moe32"):
        e = ladder_fits["power_laws"][level]
        assert e["status"] == "degenerate" and "E = " in e["reason"], level
        assert e["profile"]["E"]["lo"] == 0.0
        assert ladder_fits["compute_laws"][level]["status"] == "degenerate"
    assert ladder_fits["schema_version"] == 2


def test_report_never_prints_a_non_ok_value_bare(ladder_fits, tmp_path):
    text = render_report(ladder_fits, tmp_path).read_text()
    dense = ladder_fits["power_laws"]["dense"]
    row = next(ln for ln in text.splitlines() if ln.startswith("| dense | "))
    assert "not determined (degenerate fit)" in row
    for k in ("E", "A", "alpha"):
        v = dense[k]["value"]
        assert f"{v:.4g}" not in row and f"{v:.3g}" not in row, k
    assert "profile-likelihood intervals" in text
    assert "E is not identified" in text


def test_version_1_fits_still_read_and_render(ladder_fits, tmp_path):
    old = copy.deepcopy(ladder_fits)
    old["schema_version"] = 1
    for sec in ("power_laws", "compute_laws"):
        for e in old[sec].values():
            for k in ("profile", "modes", "optimum"):
                e.pop(k, None)
            e["status"] = "ok" if e["status"] == "degenerate" else e["status"]
    path = write_fits(old, tmp_path / "v1" / "fits.json")
    back = read_fits(path)
    assert back["schema_version"] == 1
    assert (render_report(back, tmp_path / "v1")).exists()
    bad = tmp_path / "v0.json"
    bad.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 0}))
    with pytest.raises(Exception, match="reads 1, 2"):
        read_fits(bad)


def test_committed_isoflop_ladder_joint_law_is_degenerate():
    """Its Ludziejewski et al. joint law put c at 2.4e-13 and was marked ok, and `plan`
    planned from it; now it is degenerate, naming c."""
    from moe.scaling.analysis.sections import joint_laws
    from moe.scaling.analysis.selection import split_holdout

    rows = load_results(ISOFLOP)
    for r in rows:
        r.setdefault("group", "grid")
    train, held = split_holdout([r for r in rows if r["group"] == "grid"], None)
    j = joint_laws(train, held, 4, 0, 0.95, False)
    assert j["joint"]["status"] == "degenerate", j["joint"]["reason"]
    assert j["joint"]["reason"].startswith("c = ")
    assert j["joint"]["c"]["value"] < COLLAPSE_FRAC * min(r["final_eval_loss"] for r in train)


def test_collapsed_and_real_irreducible_replicates_are_a_split():
    """A point mass at 0 beside a spread of real values: a kernel density smooths it into
    one broad mode, so the irreducible term has its own rule (collapse_split)."""
    from moe.scaling.analysis.entries import collapse_split

    rng = np.random.default_rng(2)
    E = np.concatenate([np.full(30, 1e-11), rng.uniform(0.3, 2.2, 170)])
    assert replicate_modes(E) is None  # what the density alone says
    m = collapse_split(E, 2.4)
    assert m["masses"] == pytest.approx([0.15, 0.85]) and m["medians"][0] == 1e-11
    assert collapse_split(rng.uniform(0.3, 2.2, 200), 2.4) is None
    assert collapse_split(np.full(200, 1e-11), 2.4) is None  # all collapsed: degenerate


def test_version_1_files_are_rechecked_on_reading(tmp_path):
    """The committed ladder's version-1 fits.json called its dense L(N) ok, with E at an
    early stop of 0.046 and 11% of the replicates collapsed to 0; read today it is not ok,
    and `plan` cannot take it as ok either."""
    import shutil

    # the file as committed at 4d36eef (benchmarks/results/ladder_cpu/fits.json), kept
    # here because that one has since been re-rendered as version 2
    d = tmp_path / "v1"
    d.mkdir()
    shutil.copy(REPO / "tests/data/ladder_cpu_fits_v1.json", d / "fits.json")
    assert json.loads((d / "fits.json").read_text())["schema_version"] == 1
    a = read_fits(d)
    dense = a["power_laws"]["dense"]
    assert dense["status"] == "unidentified" and dense["reason"].startswith("E collapsed to 0")
    assert not dense["bounded"]
    assert "rechecked without refitting" in a["notes"][-1]
    assert (render_report(a, tmp_path / "r")).exists()
