"""`moe-testbed plan`: from fitted laws to the run you cannot yet afford.

    moe-testbed plan benchmarks/results/ladder_cpu_isoflop --flops 1e13,1e14 --out runs/plan

Reads a fits.json (moe/scaling/analysis/schema.py) and answers, for each FLOP budget C and for
dense and each expert count: the compute-optimal active parameters and tokens, the total
parameters of a model of that size, the predicted loss, and the efficiency leverage
against the dense optimum at the same C, each with an interval propagated from the
bootstrap replicates stored in fits.json (never refitted).

Limits, checked in this order:
  - extrapolation: a budget more than MAX_EXTRAPOLATION (100) x the compute of the largest
    fitted (not held-out) run (--max-extrapolation) is refused with one line naming the
    factor, before any law is chosen (check_extrapolation); --extrapolate plans it anyway
    and flags each such row (`extrapolated`, `extrapolated_reason`; plan.md: a warning line,
    "BEYOND FITTED RANGE xF" and 2 significant figures). Every row also records
    `extrapolation` (C / the largest fitted run's FLOPs) and `extrapolation_n` (N_opt / the
    largest fitted run's params_active, over the runs of the row's level when it has
    fitted runs, else over all fitted runs: `extrapolation_n_basis` says which).
  - passes: tokens / the training tokens of the corpus the row's config trains on (the
    ladder's, when configs follow the ladder), from moe.data.train_token_count without
    building: exact from a prepared cache; when the corpus is not prepared, `passes` is
    None with the reason and the on-disk estimate (`passes_estimate`), not checked. A row
    whose passes exceed max_epochs (--max-epochs, else the ladder's max_epochs, default 1)
    is refused: it keeps its numbers, gets `refused` (why) and no config; every row refused
    is an error.

Laws, in order of preference (every row names the one it used), only those whose status
is in USABLE_STATUSES ("ok", "unbounded"); "degenerate", "unidentified", "not_converged",
"not_fitted" are passed over with their status and reason quoted (`laws_not_used`):
  1. Ludziejewski et al. 2025's joint law L(N_active, D, E) (`joint_laws.joint`): at a
     fixed expert count E it is a Chinchilla law in (N_active, D) with
     A_E = a E'^delta, alpha_E = -(alpha + gamma ln E'), B_E = b E'^omega,
     beta_E = -(beta + zeta ln E'), irreducible loss c (E' Clark's saturating transform);
  2. per-level approach 3: `chinchilla` for dense (and `chinchilla_levels.<level>` for a
     MoE level when a fits.json carries it);
  otherwise the row is refused with what is missing (e.g. no token variation).
Where the row's level has approach-2 optima (`isoflop.<level>` with status "ok"), the
preference yields to agreement (choose_law): the first law whose N*(C) lies inside approach
2's interval at every measured budget is used, else the closest in RMS log N, and the
disagreement is recorded (`isoflop_check`, a note, a line in plan.md). The interval of a
budget's N* is the pair of trained sizes bracketing it (widened to the approach-2 line's
bootstrap interval when fit_isoflop gave one): isoflop_optima. EL always compares a MoE
row with the dense form of its own law (`el_basis`).

Compute-optimal point of L = E0 + A/N^alpha + B/D^beta under C = 6 N D (Hoffmann et al.
2022, eq. 4): N* = G (C/6)^(beta/(alpha+beta)), D* = (C/6)^(alpha/(alpha+beta)) / G,
G = (alpha A / (beta B))^(1/(alpha+beta)), computed in log space (raw-unit amplitudes can
be 1e60). On the frontier L*(C) = E0 + K (C/6)^(-alpha beta/(alpha+beta)) with
K = A G^-alpha + B G^beta, so the dense compute that reaches a loss L is
C_d(L) = 6 ((L - E0)/K)^(-(alpha+beta)/(alpha beta)) and the efficiency leverage of a MoE
optimum is EL = C_d(L_moe*(C)) / C (infinite when L_moe* is below the dense asymptote).

FLOPs: the laws are fitted on the table's N_active and D; the table's `flops` column may
count more than 6 N D (attention, the output head: the ladder records exact matmul
FLOPs). The plan converts a budget C to the law's 6 N D with kappa = median over the
fitted runs of flops / (6 N_active D), and says so (kappa = 1 for 6ND tables).

Memory (with --gpus/--gpu-mem-gib): weights + gradients + AdamW states per GPU, bf16 mixed
precision 2 + 2 + 12 bytes per parameter (fp32 master, m, v), fp32 4 + 4 + 8; ZeRO stage 1
partitions the optimizer states, stage 2 also the gradients, over the data-parallel ranks
(dense parameters over all G, routed experts over the G / ep replicas of each expert);
expert parallelism ep keeps 1/ep of the routed experts per GPU; tp = 1. The layout chosen
is the first that fits in the order zero 0, 1, 2 and, within each, ep ascending, leaving
`headroom` of the memory for activations and buffers (activations are not modelled: choose
micro-batch and activation checkpointing to fit them).

Time: GPU-hours = C / (peak x MFU) / 3600; wall hours = that / G. MFU: --mfu, else the
median `mfu` of the fits' runs when the table carried one, else an assumption stated in
plan.md.

Configs: each row gets `<name>.yaml`, a complete training config whose geometry follows
the ladder the fits came from (its base config, size rule, LR rule and schedule) when that
ladder is known, else the nearest preset in configs/ scaled at the preset's aspect ratio;
its `count_params` active parameters are within 5% of the plan (checked).

Modules: `laws` (law forms, frontier, the choice of law), `limits` (extrapolation and
passes checks, the planner's constants, PlanError), `geometry` (config families, the model
nearest a size, memory layouts), `make` (`make_plan`: the plan as a dict), `output`
(plan.json, plan.md, configs, plan.png data) and `command` (`build_plan`, `plan_main`).
Import from the modules themselves (this package re-exports nothing).
"""
