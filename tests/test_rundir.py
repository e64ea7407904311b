"""Run-directory ownership (flock on DIR/.lock) and children that die with the ladder.

Every process here is tiny (a lock holder, a sleeping stub trainer); only the refused
`train` / `ladder` commands import the package's CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moe.runs.lock import RunDirError, lock_dir

REPO = Path(__file__).resolve().parents[1]



def _write_ladder(path: Path) -> None:
    """A one-run ladder config (one tiny dense size) at ``path``."""
    path.write_text(f"train_config: {REPO / 'configs' / 'tiny-moe.yaml'}\n" + textwrap.dedent("""
        name: t
        overrides: [model.vocab_size=512, mtp.depth=0, train.seq_len=32]
        sizes: [{name: xs, d_model: 16, n_layers: 2, n_heads: 2}]
        sparsities: [{name: dense}]
        tokens: {mode: fixed, value: 4096}
    """))

def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return env


def _holder(d: Path) -> subprocess.Popen:
    """A process that holds ``d``'s lock until killed; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from moe.runs.lock import lock_dir; "
         f"l = lock_dir({str(d)!r}); print('held', flush=True); time.sleep(120)"],
        env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its new parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_lock_in_process_and_after_sigkill(tmp_path):
    d = tmp_path / "run"
    with lock_dir(d):
        assert (d / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirError, match=f"in use by process {os.getpid()}"):
            lock_dir(d)  # a second holder, even in the same process
    lock_dir(d).release()  # released: free again
    holder = _holder(d)
    with pytest.raises(RunDirError, match=f"in use by process {holder.pid}"):
        lock_dir(d)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with lock_dir(d) as lk:  # the kernel dropped the dead holder's lock: never stale
        assert lk.path.read_text().strip() == str(os.getpid())


def test_second_train_and_ladder_on_held_dir_exit_2_naming_pid(tmp_path):
    run, lad = tmp_path / "run", tmp_path / "ladder"
    holders = [_holder(run), _holder(lad)]
    try:
        r = subprocess.run([sys.executable, "-m", "moe.cli", "train",
                            str(REPO / "configs" / "tiny-moe.yaml"), "--out", str(run),
                            "--no-progress"], env=_env(), capture_output=True, text=True,
                           timeout=300)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr[-2000:]
        assert len(err) == 1 and err[0].startswith("error: ")
        assert f"in use by process {holders[0].pid}" in err[0] and str(run) in err[0]
        assert not (run / "config.yaml").exists()  # refused before writing anything

        ladder = tmp_path / "l.yaml"
        _write_ladder(ladder)
        r = subprocess.run([sys.executable, "-m", "moe.cli", "ladder", str(ladder), "--out",
                            str(lad), "--no-progress"], env=_env(), capture_output=True,
                           text=True, timeout=300)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr[-2000:]
        assert len(err) == 1 and f"in use by process {holders[1].pid}" in err[0], err
        assert not (lad / "runs").exists() and not (lad / "plan.json").exists()
    finally:
        for h in holders:
            h.kill()
            h.wait()


# --------------------------------------------------------------------------------------
# Ladder children: own process group, taken down with the ladder
# --------------------------------------------------------------------------------------

SLEEPER = """
import os, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
(out.parent.parent / "child.pid").write_text(str(os.getpid()))
time.sleep(120)
"""


def _start_ladder(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """A ladder driver whose (only) run is a sleeping stub; returns (driver, stub pid)."""
    stub = tmp_path / "sleeper.py"
    stub.write_text(SLEEPER)
    ladder = tmp_path / "l.yaml"
    _write_ladder(ladder)
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from moe.scaling.ladder.command import run_ladder
        from moe.scaling.ladder.design import load_ladder, plan
        cfg, base = load_ladder({str(ladder)!r})
        run_ladder(cfg, base, Path({str(out)!r}), plan(cfg, base),
                   train_cmd={[sys.executable, str(stub)]!r}, progress=False)
    """))
    proc = subprocess.Popen([sys.executable, str(driver)], env=_env())
    pid_file = out / "child.pid"
    deadline = time.time() + 120
    while not (pid_file.is_file() and pid_file.read_text()):
        assert proc.poll() is None and time.time() < deadline, "the ladder did not start its run"
        time.sleep(0.02)
    child = int(pid_file.read_text())
    assert os.getpgid(child) == child != os.getpgid(proc.pid)  # its own process group
    return proc, child


def test_orphaned_run_exits_when_the_ladder_is_killed(tmp_path):
    proc, child = _start_ladder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # the ladder only; its child is in another group
    proc.wait()
    assert _wait_gone(child), "the run outlived its ladder"


def test_sigterm_to_the_ladder_takes_its_run_down(tmp_path):
    proc, child = _start_ladder(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert _wait_gone(child)


def test_watch_parent_ends_a_child_of_a_killed_process(tmp_path):
    """The fork-server path: the run's OS parent is the server, so it watches the ladder's
    pid itself."""
    pid_file = tmp_path / "child.pid"
    middle = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys, time
        code = ("import os, time; from moe.runs.process import watch_parent; "
                "watch_parent({{}}); open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                "time.sleep(120)").format(os.getpid())
        subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        time.sleep(120)
    """)], env=_env())
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()):
        assert time.time() < deadline
        time.sleep(0.02)
    child = int(pid_file.read_text())
    os.kill(middle.pid, signal.SIGKILL)
    middle.wait()
    assert _wait_gone(child)
