"""Benchmark scripts: one package, run from the repository root as modules, e.g.
``python -m benchmarks.bench_train_step`` or ``python -m benchmarks.kernels.bench_kernels``
(the root's ``moe`` and ``kernels`` are then imported from the working tree). Every script
records its environment with :func:`benchmarks.common.environment`; measured rows go to
benchmarks/results/."""
