"""TextWorldExpress through the engine: the gold policy's rewards, wins and validity reach the rows."""
import re
import shutil

import jax
import pytest

pytest.importorskip("textworld_express", reason="textworld-express is not installed")
if shutil.which("java") is None:
    pytest.skip("TextWorldExpress needs a Java runtime on PATH", allow_module_level=True)

from environments.textworld_express import TextWorldExpressEnv, TextWorldExpressJVM  # noqa: E402
from rollout_scripted import ScriptedSampler, chatml_tokenizer  # noqa: E402
from spear_jax.rollout import RolloutConfig, RolloutEngine  # noqa: E402
from spear_jax.sampling import SamplingParams  # noqa: E402

TASKS = [0, 1, 2]
STEP = re.compile(r"You are now at step (\d+) and your current observation is: (.*?)\nYour admissible", re.S)
FIRST = re.compile(r"Your current observation is: (.*?)\nYour admissible", re.S)


def gold_table(env, task_ids):
    """(step index, observation text) -> gold action, from playing each task's gold path."""
    table = {}
    for task_id in task_ids:
        obs = env.reset(task_id)
        for t, action in enumerate(env.gold_actions()):
            key = (t, obs.text)
            assert table.get(key, action) == action, "two tasks share a state but not the action"
            table[key] = action
            result = env.step(f"<think>gold</think><action>{action}</action>")
            obs = result.observation
            if result.done:
                break
    return table


def gold_policy(table):
    def policy(context):
        later = STEP.findall(context)
        t, obs = (int(later[-1][0]) - 1, later[-1][1]) if later else (0, FIRST.findall(context)[-1])
        return f"<think>the gold path says so</think><action>{table[(t, obs)]}</action>"
    return policy


@pytest.fixture(scope="module")
def setup():
    # A JVM of its own: the gold table is replayed on fresh simulators, so nothing another test
    # did in the process-wide JVM may influence the games generated here.
    # TWX's gold path for a twc seed varies between resets and sometimes wanders (27 steps seen
    # for train seed 1); the step limit must not cut the table's path short.
    jvm = TextWorldExpressJVM()
    envs = [TextWorldExpressEnv("twc", split="train", max_steps=80, jvm=jvm) for _ in range(2 * len(TASKS))]
    yield envs, chatml_tokenizer()
    for env in envs:
        env.close()
    jvm.close()


def test_gold_policy_through_engine(setup):
    envs, tok = setup
    sampler = ScriptedSampler(tok, gold_policy(gold_table(envs[0], TASKS)))
    engine = RolloutEngine(sampler, tok, RolloutConfig(group_size=2))
    sampling = SamplingParams(max_new_tokens=256, stop_sequences=(tok.assistant_end_ids,))
    result = engine.run(envs, TASKS, sampling, jax.random.key(0))
    assert not any(e.failed for e in result.episodes)
    assert all(e.won and e.episode_return == 10.0 and not e.truncated for e in result.episodes)
    for episode in result.episodes:
        rows = [r for r in result.rows if r.traj_id == episode.traj_id]
        assert len(rows) == episode.length >= 1
        assert [r.reward for r in rows] == [0.0] * (len(rows) - 1) + [10.0]
        assert all(r.won and r.episode_return == 10.0 and r.action_valid and not r.incomplete for r in rows)
        assert {r.group_id for r in rows} == {episode.traj_id // 2}
        assert rows[-1].info["task_score"] == pytest.approx(1.0)
        assert all(r.task_type == "textworld_express" for r in rows)
    assert result.metrics["rollout/success_rate"] == 1.0
    assert result.metrics["rollout/invalid_action_rate"] == 0.0


def test_malformed_responses_are_invalid_not_fatal(setup):
    envs, tok = setup
    sampler = ScriptedSampler(tok, lambda context: "I will just wander around")
    engine = RolloutEngine(sampler, tok, RolloutConfig(group_size=2, max_turns=2))
    sampling = SamplingParams(max_new_tokens=64, stop_sequences=(tok.assistant_end_ids,))
    result = engine.run(envs[:2], [5], sampling, jax.random.key(1))
    assert len(result.rows) == 4
    assert all(not r.action_valid and r.incomplete and r.reward == 0.0 and not r.won for r in result.rows)
    assert all(e.truncated for e in result.episodes)
    assert result.metrics["rollout/invalid_action_rate"] == 1.0
