"""The command line's failure modes, run as a user runs it (``python -m spear_jax.main``): a bad
config ends in one line on stderr before anything starts; Ctrl-C ends in one line and status 130."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tiny default cut down to reach RL training within seconds of start-up (no warm start).
SHORT_RUN = ("--config.sft.enable=False", "--config.data.eval_episodes=8", "--config.data.train_tasks_per_step=2",
             "--config.data.group_size=2", "--config.actor.ppo_micro_batch_size=8",
             "--config.actor.ppo_mini_batch_size=8")


def _main(workdir, *overrides, config="configs/spear.py:twx_tiny"):
    return [sys.executable, "-m", "spear_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


@pytest.mark.parametrize("config, override, message", [
    ("configs/spear.py:twx_tiny", "--config.rollout.top_p=0",
     "config error: config.rollout.top_p=0.0: must be in (0, 1]; use 1.0 to disable nucleus sampling"),
    ("configs/spear.py:twx_tiny", "--config.data.eval_split=validation", "config.data.eval_split='validation'"),
    ("configs/spear.py:no_such_preset", "--config.seed=0", "unknown preset 'no_such_preset'"),
    ("configs/spear.py:twx_tiny", "--config.actor.clip_ratio=0.3", "no such config field: 'clip_ratio'"),
])
def test_a_config_error_is_one_line_on_stderr(config, override, message, tmp_path):
    start = time.perf_counter()
    out = subprocess.run(_main(tmp_path / "run", override, config=config), cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr + out.stdout and not out.stdout
    assert not (tmp_path / "run").exists()  # failed before the run started
    assert time.perf_counter() - start < 120


def _read_lines(stream, lines):
    for line in iter(stream.readline, b""):
        lines.append((time.monotonic(), line.decode(errors="replace")))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    """SIGINT to the process group (what Ctrl-C in a terminal sends) while the trainer runs its
    first evaluation: the TextWorldExpress JVM dies with it, and the run must neither print the
    environments' connection errors nor a KeyboardInterrupt traceback."""
    workdir = tmp_path / "run"
    process = subprocess.Popen(_main(workdir, *SHORT_RUN), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[tuple[float, str]] = []
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + 400
    # metrics.jsonl appears when the trainer is built (its environments running).
    while not (workdir / "metrics.jsonl").exists():
        assert process.poll() is None and time.monotonic() < deadline, "".join(text for _, text in lines)
        time.sleep(0.2)
    time.sleep(1.0)
    interrupted = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    try:
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    exit_seconds = time.monotonic() - interrupted
    time.sleep(0.5)  # the reader thread drains the pipe
    after = "".join(text for t, text in lines if t >= interrupted)
    assert status == 130, after
    assert exit_seconds < 30
    assert "Traceback" not in after and "rror" not in after, after
    assert after.count("\n") <= 2 and "interrupted: rerun the same command to resume" in after, after
    deadline = time.monotonic() + 10
    while _group_alive(process.pid) and time.monotonic() < deadline:  # the JVM goes too
        time.sleep(0.2)
    assert not _group_alive(process.pid)
