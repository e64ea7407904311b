"""Triton kernel benchmarks (``python -m benchmarks.kernels.bench_kernels``) and their
summary (``python -m benchmarks.kernels.summarize``). Needs only torch and triton."""
