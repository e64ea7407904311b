"""One tolerance table for every kernel test: (atol, rtol) by dtype.

fp32 runs IEEE products in the kernels and the references, so differences are only
summation order (~1e-6 relative at these sizes). bf16 (GPU only) has 8 mantissa bits:
outputs of K-term fp32-accumulated products rounded to bf16 differ by ~2^-8 relative.
"""

import torch

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
