"""Scaling analysis as data: every fit, interval and prediction in one JSON-ready object.

    python -c "from moe.scaling import analyse, chinchilla_rows; a = analyse(chinchilla_rows(), n_boot=8); print(a['chinchilla']['alpha'])"

`analyse(rows)` runs every law the table supports and returns one dict, whose schema is
written out in `schema.py` (with `write_fits` and `read_fits`).
"""
from __future__ import annotations

from typing import Sequence

from moe.scaling.analysis.kinds import (CHIN, COMPUTE, DOWNSTREAM, JOINT, JOINT_LABELS,
                                        OVERTRAIN, POWER)
from moe.scaling.analysis.leverage import efficiency_leverage_section
from moe.scaling.analysis.runs import (compare_runs, compare_variants, epoch_notes,
                                       holdout_predictions, run_record, seed_noise,
                                       sparsity_comparison)
from moe.scaling.analysis.schema import SCHEMA_VERSION
from moe.scaling.analysis.sections import (chinchilla_section, downstream_section,
                                           isoflop_section, joint_laws, one_d_laws,
                                           overtraining_section)
from moe.scaling.analysis.selection import level_groups, split_holdout
from moe.scaling.laws.objective import HUBER_DELTA
from moe.scaling.table import ResultsError, validate_rows


def analyse(rows: Sequence[dict], *, n_boot: int = 200, holdout: str | None = None,
            seed: int = 0, level: float = 0.95, source: str = "rows",
            notes: Sequence[str] = (), side: dict | None = None,
            chinchilla_min_runs: int = 8, progress: bool | None = None) -> dict:
    """Fit every law the table supports; return the analysis dict (schema_version 1).

    rows: run dicts (from `load_results`, or e.g. `chinchilla_rows()`); validated again.
    holdout: "largest" | "flag" | "none" | None (see `split_holdout`): held-out runs enter
    no fit and are predicted by every law that covers them. n_boot: whole-run bootstrap
    replicates per law (each re-runs the full multi-start fit). side: {"compare": rows,
    "seed": rows} as `validate_rows` collects them. A law the data cannot identify is
    recorded as not fitted with the reason; the analysis never fails because one law has
    too few runs.
    """
    rows = validate_rows(rows, source=source)
    side = side or {}
    if holdout is None:
        holdout = "flag" if any(r.get("held_out") for r in rows) else "largest"
    train, held = split_holdout(rows, holdout)
    for r in rows:  # validate_rows returned copies: mark the split the fits used
        r["held_out"] = any(r is h for h in held)
    if len(train) < 3:
        raise ResultsError(f"{source}: only {len(train)} run(s) left to fit after holding out "
                           f"{len(held)}; a fit needs at least 3")
    groups, held_groups = level_groups(train), level_groups(held)
    a = _head(rows, source, n_boot, level, seed, holdout, notes)
    a["power_laws"], a["compute_laws"] = one_d_laws(groups, held_groups, n_boot, seed,
                                                    level, progress)
    a["chinchilla"] = chinchilla_section(train, rows, n_boot, seed, level, chinchilla_min_runs,
                                         progress)
    a["chinchilla_levels"] = {
        g: chinchilla_section(train, rows, n_boot, seed, level, chinchilla_min_runs, progress, g)
        for g, gr in groups.items() if any(r["kind"] == "moe" for r in gr)}
    a["isoflop"] = isoflop_section(groups, level, n_boot, seed)
    a["overtraining"] = overtraining_section(train, n_boot, seed, level, progress)
    a["downstream"] = downstream_section(train, n_boot, seed, level, progress)
    a["joint_laws"] = joint_laws(train, held, n_boot, seed, level, progress)
    a["efficiency_leverage"] = efficiency_leverage_section(
        rows, a["power_laws"], a["compute_laws"], a["chinchilla"], level)
    a["holdout"] = holdout_predictions(held, _holdout_laws(a), level)
    a["seed_noise"] = seed_noise(rows, side.get("seed"))
    a["sparsity_comparison"] = sparsity_comparison(rows, side.get("seed"), level)
    a["compare"] = compare_runs(side.get("compare"))
    a["compare_variants"] = compare_variants(side.get("compare"), level)
    return a


def _head(rows, source, n_boot, level, seed, holdout, notes) -> dict:
    """schema_version, source, settings, counting conventions, notes and the run records."""
    has_nonembed = all("params_active_nonembed" in r for r in rows)
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "settings": {"n_boot": int(n_boot), "level": float(level), "seed": int(seed),
                     "holdout": holdout, "huber_delta": HUBER_DELTA},
        "counting": {
            "params": "params_active = parameters used per token, embeddings included "
                      "(Chinchilla convention); params_active_nonembed excludes embeddings "
                      "(Kaplan convention)" + ("" if has_nonembed else
                                               "; this table has no non-embedding counts"),
            "conventions": ["params_active"] + (["params_active_nonembed"] if has_nonembed
                                                else []),
            "flops": "training FLOPs as the table gives them (6 N_active D when absent)"},
        "notes": list(notes) + epoch_notes(rows),
        "runs": [run_record(r) for r in rows],
    }


def _holdout_laws(a: dict) -> list:
    """(label, kind, scope, entry, parameter names) of every law that predicts held-out runs."""
    laws = [(f"L(N_active), {g}", "power", g, e, POWER) for g, e in a["power_laws"].items()]
    laws += [(f"L(C), {g}", "compute", g, e, COMPUTE) for g, e in a["compute_laws"].items()]
    laws += [("Chinchilla L(N, D)", "chinchilla", "dense", a["chinchilla"], CHIN),
             ("over-training L(N, M)", "overtraining", "dense", a["overtraining"], OVERTRAIN),
             ("downstream Err(L), from the actual loss", "downstream", "all",
              a["downstream"], DOWNSTREAM)]
    laws += [(JOINT_LABELS[name], name, "all", a["joint_laws"][name], names)
             for name, names in JOINT.items()]
    return laws
