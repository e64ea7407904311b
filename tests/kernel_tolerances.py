"""One tolerance table for every kernel test, by the dtype the kernel ran in.

Kernels are compared with the plain-torch ``*_ref`` evaluated in fp32 on the same
(already rounded) inputs, so the table measures the kernel's own rounding. ``atol`` is
relative to the largest magnitude in the expected tensor (floored at 1): the error of a
K-term sum scales with its terms, not with the (possibly cancelled) result, so a fixed
absolute tolerance is too loose for small tensors and too tight for large ones.
  * fp32: IEEE products (no TF32) and fp32 accumulation in the kernels, so only the
    summation order differs: ~1e-6 relative at test sizes.
  * bf16 (8 mantissa bits, unit roundoff 2^-9 ~ 2e-3): outputs are rounded once, and the
    backward reuses the bf16-rounded pre-activation h and rounds dh before the dX GEMM,
    so gradients carry two or three roundings (seen up to ~0.6% of the tensor's max).
  * fp16: 11 mantissa bits, 8x tighter than bf16.
"""

import torch

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=3e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg=None):
    """Compare in fp32 with the tolerance of ``dtype`` (the dtype the kernel computed in)."""
    expected = expected.detach().float()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(actual.detach().float(), expected, atol=tol["atol"] * scale, rtol=tol["rtol"],
                               msg=None if msg is None else (lambda m: f"{msg}: {m}"))
