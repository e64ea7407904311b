"""Warm process for ladder runs: import the trainer's heavy dependencies once.

    python -c "import moe.train.preload"       # ~7 s on a 2-core CPU box; forks start warm

`moe-testbed ladder` (local, no launcher) starts a multiprocessing forkserver with this
module preloaded and forks each run from it: every run still gets a process of its own
(its own torch.distributed group, DeepSpeed engine and memory, freed when it exits), but
not a fresh interpreter. Measured on the 2-core development box: `import torch,
megatron.core, deepspeed, matplotlib` costs ~7 s per process (megatron-core alone ~3.8 s),
which was most of a small ladder run's 9 s wall time.
"""
import warnings

from moe.parallel.topology import import_deepspeed

# megatron-core warns at import that Transformer Engine / Apex are absent (four lines per
# process); the trainer does not use them, and the ladder's log should show the runs.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed",
                        category=UserWarning)
import_deepspeed()  # sets DS_ACCELERATOR=cpu first when there is no GPU

import matplotlib  # noqa: E402,F401  (training.png)
import megatron.core  # noqa: E402,F401  (indexed datasets, TP layers)

import moe.train.cli  # noqa: E402,F401
import moe.train.loop  # noqa: E402,F401

# Nothing here may run a torch operation: the first parallel op starts OpenMP's thread
# pool, and a process forked after that hangs in its first parallel region (libgomp is not
# fork-safe; measured: a ladder that ran the matmul-peak probe here never finished its
# first run). Imports only.
