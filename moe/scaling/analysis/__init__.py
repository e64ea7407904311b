"""Scaling analysis as data: `analyse` (analyse.py) fits every law a results table
supports, section by section (sections.py, leverage.py, runs.py: held-out predictions, seed
noise, sparsity gaps), each bootstrapped law going through `boot_law` (entries.py); the
result is written as fits.json, whose schema schema.py documents. kinds.py names the laws
and their parameters, selection.py decides which runs each law is fitted on.
Import from the modules themselves (this package re-exports nothing)."""
