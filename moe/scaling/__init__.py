"""Scaling laws: fit, bootstrap and report the testbed's results table.

    moe-testbed fit runs/results.csv --out runs/scaling_report      # (wired by moe/cli.py)

Modules: `fits` (Chinchilla approach 3, Kaplan, power laws, L(C), MoE joint laws,
efficiency leverage), `isoflop` (Chinchilla approach 2 as Porian et al. 2024 do it: Akima
argmin per FLOP budget, OLS of ln N* on ln C, budget bootstrap), `joint_moe` (Ludziejewski et al. 2025: joint law over N_active, D
and experts), `overtraining` (Gadre et al. 2024: loss from N and tokens per parameter,
top-1 error from loss, reproduced on their RedPajama runs), `resample` (`bootstrap`:
whole-run resampling; not named bootstrap.py so the function does not shadow its module),
`results` (the table and its validation), `analysis` (every fit as one dict, written as
fits.json; its schema), `report` (analyse -> fits.json -> report.md, and `fit_main`, the
CLI body), `figures` (PNGs drawn from fits.json).
The fits need only numpy and scipy; matplotlib is imported when a report is written.
"""
from moe.scaling.resample import bootstrap, resample_rows
from moe.scaling.fits import (CHINCHILLA_PUBLISHED, KAPLAN, additive_moe_predict,
                              chinchilla_frontier, chinchilla_grid, chinchilla_objective,
                              chinchilla_predict, clark_expert_transform, clark_predict,
                              compare_joint_laws, compute_law_predict, efficiency_leverage,
                              fit_additive_moe, fit_chinchilla, fit_clark, fit_compute_law,
                              fit_power_law, huber, kaplan_loss_D, kaplan_loss_N,
                              load_chinchilla_points, power_law_inverse, power_law_predict)
from moe.scaling.isoflop import CHINCHILLA_ISOFLOP_BUDGETS, fit_isoflop, isoflop_predict_n
from moe.scaling.joint_moe import fit_joint_moe, joint_moe_predict
from moe.scaling.overtraining import (downstream_predict, fit_downstream, fit_overtraining,
                                      overtraining_predict)
from moe.scaling.analysis import SCHEMA_VERSION, analyse, read_fits, split_holdout, write_fits
from moe.scaling.report import fit_main, render_report, write_report
from moe.scaling.results import (ALIASES, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, ResultsError,
                                 chinchilla_rows, load_results, run_group, validate_rows,
                                 write_results)

__all__ = [
    "ALIASES", "CHINCHILLA_ISOFLOP_BUDGETS", "CHINCHILLA_PUBLISHED", "KAPLAN", "OPTIONAL_COLUMNS", "REQUIRED_COLUMNS",
    "ResultsError", "SCHEMA_VERSION", "additive_moe_predict", "analyse", "bootstrap",
    "chinchilla_frontier", "chinchilla_grid", "chinchilla_objective", "chinchilla_predict",
    "chinchilla_rows", "clark_expert_transform", "clark_predict", "compare_joint_laws",
    "compute_law_predict", "downstream_predict", "efficiency_leverage", "fit_additive_moe",
    "fit_chinchilla", "fit_clark", "fit_compute_law", "fit_downstream", "fit_isoflop", "fit_joint_moe",
    "fit_main", "joint_moe_predict",
    "fit_overtraining", "fit_power_law", "huber", "isoflop_predict_n", "kaplan_loss_D", "kaplan_loss_N",
    "load_chinchilla_points", "load_results", "overtraining_predict", "power_law_inverse",
    "power_law_predict", "read_fits", "render_report", "resample_rows", "run_group",
    "split_holdout", "validate_rows", "write_fits", "write_report", "write_results",
]
