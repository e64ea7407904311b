"""Shared pytest setup.

Triton kernels run on CPU tensors under the interpreter; TRITON_INTERPRET must be set
before any `@triton.jit` decorator runs, so it is set here, before tests import kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
