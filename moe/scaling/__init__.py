"""Scaling laws: fit, bootstrap and report the testbed's results table; run ladders; plan.

    moe-testbed fit runs/results.csv --out runs/scaling_report      # (wired by moe/cli.py)

What it is made of:

- `table` the results table (one row per run): reading, column mapping, validation.
- `laws/` the fitters, numpy and scipy only: the Huber/log-sum-exp objective and its
  multi-start fitter (`objective`, `lse`), profile likelihood (`profile`), Chinchilla
  approach 3 and Kaplan (`chinchilla`), 1-D power laws, L(C) and efficiency leverage
  (`power`), approach 2 as Porian et al. 2024 do it (`isoflop`), over-training and
  downstream laws of Gadre et al. 2024 (`overtraining`), the MoE laws (`moe_laws`: Clark et
  al., additive; `joint_moe`: Ludziejewski et al. 2025; `compare`: which one a ladder
  supports), whole-run resampling (`resample`) and BLAS pinning (`_blas`).
- `analysis/` every fit of a table as one dict (`analyse`), written as fits.json (`schema`).
- `report` (analyse -> fits.json -> report.md, and `fit_main`, the CLI body) and
  `figures` (PNGs drawn from fits.json).
- `ladder/` design, run and collect a scaling ladder (`moe-testbed ladder`).
- `planner/` from fits.json to training plans for FLOP budgets (`moe-testbed plan`).

The fits need only numpy and scipy; matplotlib is imported when a report is written.
"""
from moe.scaling.laws.resample import bootstrap, resample_rows
from moe.scaling.laws.chinchilla import (CHINCHILLA_PUBLISHED, KAPLAN, chinchilla_frontier,
                                         chinchilla_grid, chinchilla_objective,
                                         chinchilla_predict, fit_chinchilla, kaplan_loss_D,
                                         kaplan_loss_N, load_chinchilla_points)
from moe.scaling.laws.compare import compare_joint_laws
from moe.scaling.laws.moe_laws import (additive_moe_predict, clark_expert_transform,
                                       clark_predict, fit_additive_moe, fit_clark)
from moe.scaling.laws.objective import huber
from moe.scaling.laws.power import (compute_law_predict, efficiency_leverage, fit_compute_law,
                                    fit_power_law, power_law_inverse, power_law_predict)
from moe.scaling.laws.isoflop import CHINCHILLA_ISOFLOP_BUDGETS, fit_isoflop, isoflop_predict_n
from moe.scaling.laws.joint_moe import fit_joint_moe, joint_moe_predict
from moe.scaling.laws.overtraining import (downstream_predict, fit_downstream, fit_overtraining,
                                           overtraining_predict)
from moe.scaling.analysis.analyse import analyse
from moe.scaling.analysis.schema import SCHEMA_VERSION, read_fits, write_fits
from moe.scaling.analysis.selection import split_holdout
from moe.scaling.report import fit_main, render_report, write_report
from moe.scaling.table import (ALIASES, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, ResultsError,
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
