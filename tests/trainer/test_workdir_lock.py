"""One run per workdir: real processes contend for the lock."""
import importlib
import os
import signal
import subprocess
import sys

import pytest

from spear_jax import workdir_lock

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Takes the lock, says so, then waits for stdin to close (or forks a child that keeps the locked
# file open and exits at once without releasing, with "orphan").
_HOLDER = """
import os, sys, time
from spear_jax import workdir_lock
workdir_lock.acquire(sys.argv[1])
if sys.argv[2] == "orphan":
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    os._exit(0)
print("locked", flush=True)
sys.stdin.read()
"""


def _holder(workdir, mode="wait"):
    return subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir), mode], cwd=_REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=_REPO))


@pytest.mark.slow
def test_a_second_run_on_the_workdir_fails_naming_the_first(tmp_path):
    workdir = tmp_path / "run"
    holder = _holder(workdir)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cmd = [sys.executable, "-m", "spear_jax.main", "--config=configs/spear.py:twx_tiny",
               f"--workdir={workdir}", "--config.trainer.total_steps=1", "--config.sft.steps=2",
               "--config.sft.episodes=4", "--config.data.train_tasks_per_step=2",
               "--config.data.group_size=2", "--config.data.eval_episodes=2", "--config.env.max_steps=2",
               "--config.actor.ppo_mini_batch_size=16", "--config.actor.ppo_micro_batch_size=8"]
        out = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 1
        message = out.stderr
        assert message.startswith("error: ") and "Traceback" not in message, message[-3000:]
        assert "in use by another run" in message and f"pid {holder.pid}" in message, message[-3000:]
        assert "-c" in message and os.uname().nodename in message and "another --workdir" in message
        assert not os.path.exists(workdir / "config.json")  # the second run wrote nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    workdir_lock.acquire(str(workdir))  # released on exit
    workdir_lock.release(str(workdir))


def test_main_run_refuses_a_locked_workdir(tmp_path, monkeypatch):
    config = importlib.import_module("configs.spear").get_config("twx_tiny")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a run started on a locked workdir")

    monkeypatch.setattr("spear_jax.sft.run_sft", must_not_run)
    monkeypatch.setattr("spear_jax.trainer.Trainer", must_not_run)
    holder = _holder(tmp_path)
    try:
        assert holder.stdout.readline().strip() == "locked"
        from spear_jax import main

        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"in use by another run: pid {holder.pid}"):
            main.run(config, str(tmp_path))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path, caplog):
    holder = _holder(tmp_path)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    with caplog.at_level("WARNING"):
        workdir_lock.acquire(str(tmp_path))
    assert f"pid {holder.pid}" in caplog.text and "ended without releasing" in caplog.text
    workdir_lock.release(str(tmp_path))
    caplog.clear()
    with caplog.at_level("WARNING"):  # released cleanly: nothing to report
        with workdir_lock.hold(str(tmp_path)):
            with workdir_lock.hold(str(tmp_path)):  # reentrant within a process
                pass
    assert caplog.text == ""


def test_a_lock_kept_by_the_dead_owners_child_is_broken(tmp_path, caplog):
    """The owner exited but a child it forked still has the locked file open: the recorded pid
    is gone on this host, so the lock file is replaced."""
    holder = _holder(tmp_path, mode="orphan")
    child = int(holder.stdout.readline())
    holder.wait(timeout=60)
    try:
        with caplog.at_level("WARNING"):
            workdir_lock.acquire(str(tmp_path))
        assert f"pid {holder.pid}" in caplog.text and "breaking the lock" in caplog.text
        workdir_lock.release(str(tmp_path))
    finally:
        os.kill(child, signal.SIGKILL)
