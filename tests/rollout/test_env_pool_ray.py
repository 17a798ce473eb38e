"""The Ray backend of the environment workers on a local Ray cluster: the in-process rows, a
killed actor failing only its episodes and replaced, a hung actor timed out."""
import os
import sys
import time

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (the optional Ray worker backend)")

from environments.base import Observation  # noqa: E402
from rollout_scripted import SayNumberEnv, say_number_policy  # noqa: E402
from spear_jax.env_pool import EnvPool  # noqa: E402
from test_env_pool import rows_as_data, run, say_number, specs, tok, without_times  # noqa: E402,F401


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    """A local Ray cluster whose workers import the test helpers (the pool's builders)."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = previous


def test_ray_workers_give_the_in_process_rows(tok, say_number):
    options = [{"episode_length": n} for n in (1, 3, 2, 4)] + [{"fail_at_step": 1}, {"fail_on_reset": True}]
    reference = run(tok, [SayNumberEnv(**o) for o in options], [3, 5, 7], group_size=2)
    with EnvPool(specs(options), 2, step_timeout_s=30.0, backend="ray") as pool:
        assert pool.processes == []  # no local processes: actors
        result = run(tok, pool, [3, 5, 7], group_size=2)
    assert rows_as_data(result) == rows_as_data(reference)
    assert without_times(result.metrics) == without_times(reference.metrics)


def test_killed_ray_worker_fails_only_its_episodes_and_is_replaced(tok, say_number):
    with EnvPool(specs([{"episode_length": 3}] * 4), 2, step_timeout_s=30.0, backend="ray") as pool:
        killed = pool._workers[1].actor
        calls = []

        def killing_policy(context):  # kills actor 1 (envs 1, 3) during the second turn
            calls.append(context)
            if len(calls) == 5:
                ray.kill(killed, no_restart=True)
            return say_number_policy(context)

        result = run(tok, pool, [1, 2], killing_policy, group_size=2)
        assert [e.failed for e in result.episodes] == [False, True, False, True]
        assert "environment worker 1 died" in result.episodes[1].error
        again = run(tok, pool, [1, 2], group_size=2)
        assert not any(e.failed for e in again.episodes) and len(again.rows) == 12
        assert pool._workers[1].actor != killed


def test_hung_ray_worker_times_out(tok, say_number):
    options = [{"episode_length": 3}, {"episode_length": 3, "hang_at_step": 1, "hang_s": 120.0}]
    with EnvPool(specs(options), 2, step_timeout_s=2.0, backend="ray") as pool:
        start = time.monotonic()
        result = run(tok, pool, [1], group_size=2)
        assert time.monotonic() - start < 30.0
        assert [e.failed for e in result.episodes] == [False, True]
        assert "did not answer within its step timeout" in result.episodes[1].error
        assert isinstance(pool.reset_batch([(1, 1)])[0], Observation)
