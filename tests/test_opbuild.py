"""DeepSpeed's op build cannot be wedged by an interrupted build (issue 16, item 4).

torch guards `cpp_extension.load` with a `lock` file (FileBaton) and waits, silently and
forever, while it exists; `kill -9` during the build leaves it. These tests plant such a
file and never compile: the op's load is replaced by a stand-in that takes torch's own
baton the way the real build does."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from moe.train import opbuild

REPO = Path(__file__).resolve().parents[1]


class FakeBuilder:
    name = "deepspeed_shm_comm"


def _torch_like_load(loaded: list):
    """Stand-in for builder.load(): what torch's _jit_compile does with its baton, except
    that a held baton fails the test instead of spinning forever."""
    import os

    def load(b):
        build_dir = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / b.name
        build_dir.mkdir(parents=True, exist_ok=True)
        baton = FileBaton(str(build_dir / "lock"))
        assert baton.try_acquire(), "torch would wait forever on this lock"
        baton.release()
        loaded.append((b.name, build_dir))
    return load


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv(opbuild.TIMEOUT_ENV, raising=False)
    monkeypatch.setenv("MOE_TESTBED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "torch_extensions" / opbuild._build_tag()


def test_private_build_dir_is_in_the_projects_cache(private_cache):
    loaded = []
    opbuild.ensure_deepspeed_ops(builders=[FakeBuilder()], load=_torch_like_load(loaded))
    assert loaded == [("deepspeed_shm_comm", private_cache / "deepspeed_shm_comm")]
    assert (private_cache / opbuild.OUR_LOCK).exists()


def test_stale_torch_lock_in_private_dir_is_removed(private_cache, capsys):
    stale = private_cache / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True)
    stale.write_text("")  # what a build killed with -9 leaves
    loaded = []
    t0 = time.monotonic()
    opbuild.ensure_deepspeed_ops(builders=[FakeBuilder()], load=_torch_like_load(loaded))
    assert time.monotonic() - t0 < 5
    assert loaded and not stale.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: removed stale DeepSpeed op build lock {stale} (left by an "
                   "interrupted build)"]


def test_live_builder_is_waited_for_not_robbed(private_cache, monkeypatch):
    """A torch lock while another live process holds our build lock is a real build: it
    is neither removed nor raced; after the timeout the error names the holder."""
    private_cache.mkdir(parents=True)
    torch_lock = private_cache / "deepspeed_shm_comm" / "lock"
    torch_lock.parent.mkdir()
    torch_lock.write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(private_cache / opbuild.OUR_LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
         "print('held', flush=True); time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv(opbuild.TIMEOUT_ENV, "0.5")
        with pytest.raises(opbuild.OpBuildError, match=f"held by pid {holder.pid} for more "
                                                      "than 0.5 s"):
            opbuild.ensure_deepspeed_ops(builders=[FakeBuilder()], load=_torch_like_load([]))
        assert torch_lock.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (as kill -9 does): its lock went with it, the torch lock is stale now
    loaded = []
    opbuild.ensure_deepspeed_ops(builders=[FakeBuilder()], load=_torch_like_load(loaded))
    assert loaded and not torch_lock.exists()


def test_user_extensions_dir_lock_times_out_naming_the_file(tmp_path, monkeypatch):
    """TORCH_EXTENSIONS_DIR set by the user may be shared with other programs: a torch lock
    there is never removed, but waited for with a timeout that names the file."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv(opbuild.TIMEOUT_ENV, "0.5")
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    with pytest.raises(opbuild.OpBuildError) as e:
        opbuild.ensure_deepspeed_ops(builders=[FakeBuilder()], load=_torch_like_load([]))
    assert str(e.value) == (f"DeepSpeed op build lock {lock} is still there after 0.5 s; if "
                            "no build is running (an interrupted one leaves it behind), "
                            "delete that file and rerun")
    assert lock.exists()
    # a lock that goes away while we wait (a live build finishing) lets the load proceed
    monkeypatch.setenv(opbuild.TIMEOUT_ENV, "30")
    threading.Timer(0.5, lock.unlink).start()
    loaded = []
    opbuild.ensure_deepspeed_ops(builders=[FakeBuilder()], load=_torch_like_load(loaded))
    assert loaded


def test_one_cpu_process_builds_no_comm_op_and_ignores_a_stale_lock(tmp_path):
    """End to end: a stale torch build lock in the user's extensions dir once hung `train`
    with no message (then: one error line, exit 2). A single CPU process now builds no op
    at all (nothing to all-reduce: opbuild.skip_comm_op_for_one_process), so the lock is
    never reached: the run finishes and nothing is compiled."""
    import os

    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONPATH=str(REPO),
               **{opbuild.TIMEOUT_ENV: "1"})
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    p = subprocess.run(
        [sys.executable, "-m", "moe.cli", "train", str(REPO / "configs" / "tiny-moe.yaml"),
         "train.max_steps=2", "--out", str(tmp_path / "run"), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(x.name for x in (tmp_path / "ext").rglob("*")) == ["deepspeed_shm_comm", "lock"]


def test_comm_op_is_skipped_only_for_one_cpu_process(monkeypatch):
    """World size 1 on CPU: DeepSpeed's builder of the shared-memory all-reduce op returns
    None (DeepSpeed's "op unavailable"); any larger world keeps DeepSpeed's builder."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")

    monkeypatch.setattr(ds_torch, "build_shm_op", ds_torch.build_shm_op)
    original = ds_torch.build_shm_op
    assert opbuild.skip_comm_op_for_one_process(2) is False
    assert ds_torch.build_shm_op is original
    assert opbuild.skip_comm_op_for_one_process(1) is True
    assert ds_torch.build_shm_op() is None
