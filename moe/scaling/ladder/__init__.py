"""Scaling ladders (`moe-testbed ladder`): `design` (the ladder file, its rules and the runs
they expand into), `epochs` (passes over the corpus, checked before training), `dry_run`
(the --dry-run table), `staleness` (summaries, checkpoints, config fingerprints: a changed
run is set aside, never reused), `executor` (how one run is trained: `LocalExecutor`),
`results` (results.csv) and `command` (`run_ladder`, `ladder_main`). Import from the
modules themselves (this package re-exports nothing)."""
