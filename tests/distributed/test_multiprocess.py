"""Multi-process runs (``spear_jax.distributed``): the same short SPEAR run (tiny model,
TextWorldExpress coin game, replay triggering at step 2) as 1 process x 4 simulated devices and as
2 processes x 2 devices (two OS processes, a local coordinator); a 2-process run whose peer dies
resumed from its checkpoint; a hung peer. ``run_process.py`` is one process of such a run."""
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from spear_jax import distributed
from spear_jax import metrics as run_metrics
from tests import xla

_SCRIPT = os.path.join(os.path.dirname(__file__), "run_process.py")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Computed on device from gradients and token statistics reduced over the mesh: their float32 sums
# run in another order when the reduction crosses processes (gloo) than within one (XLA's CPU
# all-reduce), so they agree to rounding, and the parameters after an update with them.
_REDUCED_ON_DEVICE = ("actor/", "sil/")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _launch(workdir, processes: int, devices: int, steps: int, *extra: str,
            name: str = "") -> list[tuple[subprocess.Popen, str]]:
    """Starts ``processes`` processes of one run; (process, its log path ``<workdir><name>.process<p>.log``) each."""
    port, started = _free_port(), []
    for process in range(processes):
        log = f"{workdir}{name}.process{process}.log"
        command = [sys.executable, _SCRIPT, str(workdir), "--devices", str(devices), "--processes", str(processes),
                   "--process-id", str(process), "--port", str(port), "--steps", str(steps), *extra]
        env = dict(os.environ, XLA_FLAGS=xla.flags(devices))
        with open(log, "w") as handle:
            started.append((subprocess.Popen(command, cwd=_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT),
                            log))
    return started


def _finish(started, timeout: float) -> list[tuple[int | None, str, float]]:
    """(exit code, log text, seconds from now until it exited) of each process; kills those still
    running after ``timeout`` seconds (exit code None)."""
    start, ended = time.monotonic(), {}
    while len(ended) < len(started) and time.monotonic() - start < timeout:
        for number, (process, _) in enumerate(started):
            if number not in ended and process.poll() is not None:
                ended[number] = time.monotonic() - start
        time.sleep(0.5)
    out = []
    for number, (process, log) in enumerate(started):
        if number not in ended:
            process.kill()
            process.wait()
        with open(log) as handle:
            out.append((process.returncode if number in ended else None, handle.read(),
                        ended.get(number, timeout)))
    return out


def _train(workdir, split: str = "train") -> dict[int, dict]:
    return {r["step"]: r for r in run_metrics.read_metrics(str(workdir)) if r["split"] == split}


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not ("time" in k or k.endswith(("_per_s", "_mfu", "peak_flops")))}


def _assert_same_run(want: dict, got: dict, step: int) -> None:
    """Metrics reduced on device agree to float rounding; every other one is exactly equal."""
    a, b = _untimed(want), _untimed(got)
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith(_REDUCED_ON_DEVICE):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (step, key)
        else:  # rollouts, rewards, filters, advantages, the buffer: exactly the 1-process values
            assert a[key] == b[key], (step, key, a[key], b[key])


# -- units ------------------------------------------------------------------------------------------

def test_owned_range_deals_whole_groups_in_contiguous_blocks():
    ranges = [distributed.owned_range(5 * 4, groups=4, process=p, processes=2) for p in range(2)]
    assert ranges == [range(0, 12), range(12, 20)]  # 5 groups: 3 + 2, never a group split
    assert [i for r in (distributed.owned_range(6, 1, p, 3) for p in range(3)) for i in r] == list(range(6))
    assert distributed.owned_range(8, 2, 0, 1) == range(0, 8)  # one process owns everything
    with pytest.raises(ValueError, match="not whole groups"):
        distributed.owned_range(7, 2, 0, 2)


def test_join_mode_explicit_discovered_or_one_process():
    import ml_collections

    d = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0))
    assert distributed.join_mode(d, {}) is None
    assert distributed.join_mode(d, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task
    assert distributed.join_mode(d, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "discovered"
    assert distributed.join_mode(d, {"TPU_WORKER_HOSTNAMES": "a,b"}) == "discovered"
    d.coordinator_address, d.num_processes, d.process_id = "node0:1234", 2, 1
    assert distributed.join_mode(d, {}) == "explicit"
    d.process_id = 2
    with pytest.raises(ValueError, match="process_id=2"):
        distributed.join_mode(d, {})


def test_env_share_addresses_its_block_by_global_index():
    class Env:
        def __init__(self, name):
            self.name, self.task_ids = name, [3, 4]

        def reset(self, task_id):
            return (self.name, task_id)

    share = distributed.EnvShare([Env("a"), Env("b")], range(2, 4), total=6)
    assert len(share) == 6 and share[3].name == "b" and share.task_ids == [3, 4]
    assert distributed.EnvShare([Env("a"), Env("b")], range(4, 6), total=6)[-1].name == "b"
    assert share.reset_batch([(2, 7), (3, 8)]) == [("a", 7), ("b", 8)]
    with pytest.raises(IndexError, match="another process"):
        share[0]


def test_one_process_exchange_and_global_arrays_round_trip():
    import jax

    assert distributed.allgather({"rows": [1, 2]}) == [{"rows": [1, 2]}]
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    host = np.arange(4 * jax.device_count(), dtype=np.float32).reshape(jax.device_count(), 4)
    placed = distributed.global_array(host, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    assert len(placed.sharding.device_set) == jax.device_count()
    np.testing.assert_array_equal(distributed.host_values({"x": placed})["x"], host)


# -- two OS processes -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1x4 run, the 2x2 run (2 steps each), and a 2x2 run whose process 1 dies as step 2
    begins, then resumed by 2 new processes and (a copy) by 1 process x 4 devices."""
    root = tmp_path_factory.mktemp("multiprocess")
    out = {"one": _finish(_launch(root / "one", 1, 4, 2), 900), "two": _finish(_launch(root / "two", 2, 2, 2), 900)}
    out["killed"] = _finish(_launch(root / "resumed", 2, 2, 2, "--stop-at-step", "2", "--gather-timeout", "10",
                                    "--heartbeat-timeout", "30", "--shutdown-timeout", "10", name="-killed"), 900)
    shutil.copytree(root / "resumed", root / "resumed_one")
    out["resumed"] = _finish(_launch(root / "resumed", 2, 2, 2), 900)
    out["resumed_one"] = _finish(_launch(root / "resumed_one", 1, 4, 2), 900)
    out["metrics"] = {name: _train(root / name) for name in ("one", "two", "resumed", "resumed_one")}
    out["root"] = root
    return out


@pytest.mark.slow
def test_two_processes_train_as_one(runs):
    for name in ("one", "two"):
        assert all(code == 0 for code, _, _ in runs[name]), runs[name][0][1][-3000:]
    one, two = runs["metrics"]["one"], runs["metrics"]["two"]
    assert sorted(one) == sorted(two) == [1, 2]
    assert one[2]["replay/triggered"] == 1.0 and one[2]["sil/optimizer_steps"] >= 1  # the replay path ran
    for step in (1, 2):
        _assert_same_run(one[step], two[step], step)
    # the held-out evaluation after the last step: episodes split over the processes, reduced
    one_eval, two_eval = _train(runs["root"] / "one", "eval"), _train(runs["root"] / "two", "eval")
    assert sorted(one_eval) == sorted(two_eval) == [2] and one_eval[2]["episodes"] == 4
    assert _untimed(one_eval[2]) == _untimed(two_eval[2])


@pytest.mark.slow
def test_two_processes_decode_trajectory_rows_as_one(tmp_path):
    """Math (trajectory rows): the multi-turn session decodes both processes' rows in lockstep."""
    runs = {name: _finish(_launch(tmp_path / name, processes, devices, 1, "--task", "math"), 900)
            for name, processes, devices in (("one", 1, 4), ("two", 2, 2))}
    for name, ended in runs.items():
        assert all(code == 0 for code, _, _ in ended), ended[0][1][-3000:]
    one, two = _train(tmp_path / "one"), _train(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1] and one[1]["rollout/rows"] == 8
    _assert_same_run(one[1], two[1], 1)
    assert _untimed(_train(tmp_path / "one", "eval")[1]) == _untimed(_train(tmp_path / "two", "eval")[1])


@pytest.mark.slow
def test_a_dead_peer_ends_the_run_with_an_error_and_it_resumes(runs):
    (code0, log0, seconds0), (code1, log1, seconds1) = runs["killed"]
    assert code1 == 17 and "process 1 stops (die) at step 2" in log1
    assert code0 not in (0, None), log0[-3000:]  # ended, not hung, and not as a success
    # the next host exchange (10 s), a collective (gloo) or the heartbeat (30 s) names the cause,
    # and the shutdown barrier (10 s) lets the process go
    causes = ("PeerTimeoutError", "Connection closed by peer", "stopped sending heartbeats")
    assert any(cause in log0 for cause in causes), log0[-3000:]
    assert seconds0 - seconds1 < 90
    assert all(code == 0 for code, _, _ in runs["resumed"]), runs["resumed"][0][1][-3000:]
    two, resumed = runs["metrics"]["two"], runs["metrics"]["resumed"]
    assert sorted(resumed) == [1, 2]
    assert resumed[2]["replay/triggered"] == 1.0  # from the buffer the checkpoint of step 1 held
    assert _untimed(resumed[2]) == _untimed(two[2])


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    assert all(code == 0 for code, _, _ in runs["resumed_one"]), runs["resumed_one"][0][1][-3000:]
    one, resumed = runs["metrics"]["one"], runs["metrics"]["resumed_one"]
    assert sorted(resumed) == [1, 2] and resumed[2]["replay/triggered"] == 1.0
    _assert_same_run(one[2], resumed[2], 2)


@pytest.mark.slow
def test_a_hung_peer_ends_the_run_within_the_exchange_timeout(tmp_path):
    started = _launch(tmp_path / "hung", 2, 2, 1, "--stop-at-step", "1", "--stop-how", "hang",
                      "--gather-timeout", "15", "--shutdown-timeout", "10")
    (code0, log0, _), (code1, log1, seconds1) = _finish(started, 600)
    assert "process 1 stops (hang) at step 1" in log1
    assert code0 not in (0, None), log0[-3000:]
    assert "PeerTimeoutError" in log0 and "no answer within distributed.gather_timeout_s=15s from process(es) 1" in log0
    # process 0 then leaves; the coordination service's shutdown barrier ends the hung process too
    assert code1 not in (0, None) and "Shutdown barrier" in log1 and seconds1 < 600
