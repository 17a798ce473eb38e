"""Environment workers (spear_jax.env_pool): same rows as in-process stepping whatever the worker
count, failures isolated to a dead or hung worker's episodes, the worker replaced, clean shutdown."""
import dataclasses
import multiprocessing
import os
import re
import shutil
import signal
import time
import zlib

import jax
import numpy as np
import pytest

from environments import registry
from environments.base import Observation, StepResult
from rollout_scripted import SayNumberEnv, ScriptedSampler, chatml_tokenizer, say_number_policy
from spear_jax.env_pool import EnvPool, EnvSpec, EnvWorkerError, SequentialEnvs
from spear_jax.rollout import RolloutConfig, RolloutEngine
from spear_jax.sampling import SamplingParams

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


@pytest.fixture
def say_number(monkeypatch):
    """``say_number`` registered (the pool hands the entry to its workers)."""
    monkeypatch.setattr(registry, "ENVIRONMENTS", dict(registry.ENVIRONMENTS))
    registry.register_env("say_number", SayNumberEnv, ("train",))


def specs(options):
    return [EnvSpec("say_number", dict(o)) for o in options]


def run(tok, envs, task_ids, policy=say_number_policy, max_new_tokens=64, **config):
    sampler = ScriptedSampler(tok, policy)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, stop_sequences=(tok.assistant_end_ids,))
    return RolloutEngine(sampler, tok, RolloutConfig(**config)).run(envs, task_ids, sampling, KEY)


def rows_as_data(result):
    """Every row field (arrays as lists) and every episode summary, for exact comparison."""
    def plain(row):
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in dataclasses.asdict(row).items()}
    return [plain(r) for r in result.rows], [dataclasses.asdict(e) for e in result.episodes]


def without_times(metrics):
    return {k: v for k, v in metrics.items() if not k.endswith("_time_s")}


OPTIONS = [{"episode_length": n} for n in (1, 3, 2, 4, 3, 2)] + [{"fail_at_step": 1}, {"fail_on_reset": True}]


@pytest.mark.parametrize("layout", ["step", "trajectory"])
def test_workers_give_the_in_process_rows(tok, say_number, layout):
    """1, 2 and 3 workers give exactly the rows, episodes and metrics of in-process stepping
    (environment errors raised inside a worker fail their episodes as they do in-process)."""
    config = dict(group_size=2, layout=layout, max_sequence_length=1024)
    wrong = lambda context: say_number_policy(context, wrong_on=lambda n: n % 3 == 0)  # noqa: E731
    reference = run(tok, [SayNumberEnv(**o) for o in OPTIONS], [3, 5, 7, 9], wrong, **config)
    assert [e.failed for e in reference.episodes] == [False] * 6 + [True, True]
    for workers in (1, 2, 3):
        with EnvPool(specs(OPTIONS), workers, step_timeout_s=30.0) as pool:
            result = run(tok, pool, [3, 5, 7, 9], wrong, **config)
        assert rows_as_data(result) == rows_as_data(reference), workers
        assert without_times(result.metrics) == without_times(reference.metrics)


def test_workers_step_their_shares_concurrently(say_number):
    """Four environments whose first step takes 0.6 s (a sleep, so CPU load does not matter):
    one worker answers the turn in 2.4 s, two in 1.2 s."""
    options = [{"hang_at_step": 0, "hang_s": 0.6}] * 4
    elapsed = {}
    for workers in (1, 2):
        with EnvPool(specs(options), workers, step_timeout_s=10.0) as pool:
            pool.reset_batch([(i, i) for i in range(4)])
            start = time.monotonic()
            answers = pool.step_batch([(i, "<think>x</think><action>say 1</action>") for i in range(4)])
            elapsed[workers] = time.monotonic() - start
            assert all(isinstance(a, StepResult) for a in answers)
    assert elapsed[1] >= 2.4 and elapsed[2] < 1.9, elapsed


def test_killed_worker_fails_only_its_episodes_and_is_replaced(tok, say_number):
    with EnvPool(specs([{"episode_length": 3}] * 4), 2, step_timeout_s=30.0) as pool:
        killed = pool.processes[1].pid
        calls = []

        def killing_policy(context):  # kills worker 1 (envs 1, 3) during the second turn
            calls.append(context)
            if len(calls) == 5:
                os.kill(killed, signal.SIGKILL)
            return say_number_policy(context)

        result = run(tok, pool, [1, 2], killing_policy, group_size=2)
        assert [e.failed for e in result.episodes] == [False, True, False, True]
        assert "environment worker 1 died" in result.episodes[1].error
        assert {r.traj_id for r in result.rows} == {0, 2} and all(r.won for r in result.rows)
        assert result.metrics["rollout/failed_episodes"] == 2.0
        again = run(tok, pool, [1, 2], group_size=2)
        assert not any(e.failed for e in again.episodes) and len(again.rows) == 12
        assert pool.processes[1].pid != killed and pool.processes[1].is_alive()


def test_hung_worker_times_out_and_is_replaced(tok, say_number):
    options = [{"episode_length": 3}, {"episode_length": 3, "hang_at_step": 1, "hang_s": 120.0}] * 2
    with EnvPool(specs(options), 2, step_timeout_s=2.0) as pool:
        hung = pool.processes[1].pid
        start = time.monotonic()
        result = run(tok, pool, [1, 2], group_size=2)
        assert time.monotonic() - start < 30.0  # two requests x 2 s, not the 120 s sleep
        assert [e.failed for e in result.episodes] == [False, True, False, True]
        assert "did not answer within its step timeout" in result.episodes[3].error
        assert {r.traj_id for r in result.rows} == {0, 2}
        _assert_gone(hung)
        assert isinstance(pool.reset_batch([(1, 1)])[0], Observation)  # a fresh worker answers
        assert pool.processes[1].pid != hung and pool.processes[1].is_alive()


def _assert_gone(pid):
    """``pid`` is no process of ours any more (killed and reaped)."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_close_ends_every_worker(say_number):
    pool = EnvPool(specs([{}] * 3), 3, step_timeout_s=10.0)
    pids = [p.pid for p in pool.processes]
    assert len(set(pids)) == 3 and all(p.is_alive() for p in pool.processes)
    pool.close()
    for pid in pids:
        _assert_gone(pid)


def test_pool_errors_name_their_cause(say_number):
    with pytest.raises(ValueError, match="num_workers must be a positive int"):
        EnvPool(specs([{}]), 0, step_timeout_s=1.0)
    with pytest.raises(ValueError, match="step_timeout_s must be > 0"):
        EnvPool(specs([{}]), 1, step_timeout_s=0.0)
    with pytest.raises(EnvWorkerError, match="could not build its environments: TypeError: .*no_such_option"):
        EnvPool(specs([{}, {"no_such_option": 1}]), 2, step_timeout_s=1.0)
    assert multiprocessing.active_children() == []  # the worker that did build was ended too


def test_pooled_env_is_an_env(say_number):
    """A pool entry answers the Env members and steps alone; failures raise with their text."""
    with EnvPool(specs([{}, {"fail_on_reset": True}]), 2, step_timeout_s=10.0) as pool:
        env = pool[0]
        assert (env.name, env.domain, env.max_steps, env.prompt_style) == (
            "say_number", "agent", 10, SayNumberEnv.prompt_style)
        assert env.reset(task_id=4).text == SayNumberEnv().reset(task_id=4).text
        assert env.step("<think>x</think><action>say 1</action>").action_valid
        with pytest.raises(EnvWorkerError, match="scripted reset failure"):
            pool[1].reset(task_id=4)
        assert len(pool[1:]) == 1 and pool[1:][0] is pool[1]
    assert isinstance(SequentialEnvs([SayNumberEnv()])[0], SayNumberEnv)


ADMISSIBLE = re.compile(r"admissible actions of the current situation are: \[(.*?)\]\.", re.S)


def hashed_admissible_policy(context):
    """A deterministic walk: the admissible action chosen by a hash of the whole context."""
    actions = re.findall(r"'([^']*)'", ADMISSIBLE.findall(context)[-1])
    action = actions[zlib.crc32(context.encode()) % len(actions)]
    return f"<think>pick</think><action>{action}</action>"


def test_textworld_express_one_and_two_workers_agree(tok):
    pytest.importorskip("textworld_express", reason="textworld-express is not installed")
    if shutil.which("java") is None:
        pytest.skip("TextWorldExpress needs a Java runtime on PATH")
    twx = [EnvSpec("textworld_express", {"game": "coin", "split": "train", "seed": i, "max_steps": 6})
           for i in range(4)]
    results = []
    for workers in (1, 2):
        with EnvPool(twx, workers, step_timeout_s=60.0) as pool:
            results.append(run(tok, pool, [0, 1], hashed_admissible_policy, max_new_tokens=96, group_size=2))
    assert not any(e.failed for e in results[0].episodes)
    assert len(results[0].rows) > 4
    assert rows_as_data(results[0]) == rows_as_data(results[1])
    assert without_times(results[0].metrics) == without_times(results[1].metrics)
