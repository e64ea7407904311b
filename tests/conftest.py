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


@pytest.fixture(autouse=True, scope="session")
def _no_user_cache(tmp_path_factory):
    """No test reads or fills the user's ~/.cache/moe-testbed (or $MOE_TESTBED_CACHE): what
    a test sees must not depend on what this machine prepared before (the planner, e.g.,
    refuses rows by the prepared corpus' size). Tests that need their own cache still set
    it with monkeypatch; this is the session's default."""
    old = os.environ.get("MOE_TESTBED_CACHE")
    os.environ["MOE_TESTBED_CACHE"] = str(tmp_path_factory.mktemp("moe-testbed-cache"))
    yield
    if old is None:
        os.environ.pop("MOE_TESTBED_CACHE", None)
    else:
        os.environ["MOE_TESTBED_CACHE"] = old


def _slurm_answers() -> bool:
    import shutil
    import subprocess

    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pytest_collection_modifyitems(config, items):
    if any("slurm" in item.keywords for item in items) and not _slurm_answers():
        if os.environ.get("MOE_TESTBED_REQUIRE_SLURM") == "1":  # CI: never skip them
            raise pytest.UsageError("MOE_TESTBED_REQUIRE_SLURM=1 but no Slurm answers sinfo "
                                    "(configs/slurm/start-local.sh starts one)")
        skip_slurm = pytest.mark.skip(reason="needs a running Slurm (configs/slurm/start-local.sh)")
        for item in items:
            if "slurm" in item.keywords:
                item.add_marker(skip_slurm)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
