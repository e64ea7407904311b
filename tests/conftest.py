"""Shared pytest setup.

Triton kernels run on CPU tensors under the interpreter; TRITON_INTERPRET must be set
before any `@triton.jit` decorator runs, so it is set here, before tests import kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# DeepSpeed's C++ ops build where torch builds them by default, once for the whole suite:
# tests point MOE_TESTBED_CACHE at a temporary directory, and the trainer's private build
# directory (moe.train.opbuild) would otherwise rebuild the op (~20 s) in every test.
if not os.environ.get("TORCH_EXTENSIONS_DIR"):
    from torch.utils.cpp_extension import get_default_build_root

    from moe.train.opbuild import _build_tag

    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(get_default_build_root(), _build_tag())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
