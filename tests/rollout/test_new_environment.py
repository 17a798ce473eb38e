"""The recipe "a new environment" (docs/environments.md): one class written against
``environments.base`` and one ``register_env`` call are all a rollout and the start-up checks need.
"""
import re

import jax
import ml_collections
import pytest

from configs.spear import get_config
from environments import registry
from environments.base import AgentEnv, HasGoldActions, Observation, StepResult
from environments.prompts import AgentPromptStyle
from environments.registry import make_env, register_env
from spear_jax import run_config
from spear_jax.rollout import RolloutConfig, RolloutEngine
from spear_jax.run_config import ConfigError
from spear_jax.sampling import SamplingParams
from tests.rollout.rollout_scripted import ScriptedSampler, chatml_tokenizer

LADDER_SPLITS = ("train", "test")


class LadderEnv:
    """Climb a ladder of ``height`` rungs with ``up``; ``look`` (a tool call) reads the rung
    number. Even task ids are short ladders (task type ``"short"``), odd ones tall."""

    name = "ladder"
    domain = "agent"
    prompt_style = AgentPromptStyle(intro="You are climbing a ladder.")

    def __init__(self, split: str = "train", seed: int = 0, max_steps: int = 6):
        self.split, self.seed, self.max_steps = split, seed, max_steps
        self.task_ids = range(10)

    def reset(self, task_id=None, seed=None) -> Observation:
        self.height = 2 if int(task_id) % 2 == 0 else 3
        self.rung, self.looks = 0, 0
        return self._observation()

    def _observation(self) -> Observation:
        return Observation(text=f"Rung {self.rung} of {self.height}.", task="reach the top",
                           admissible_actions=("up", "look"))

    def step(self, response_text: str) -> StepResult:
        action = re.search(r"<action>(\w+)</action>", response_text)
        verb = action.group(1) if action else ""
        self.rung += verb == "up"
        self.looks += verb == "look"
        won = self.rung >= self.height
        return StepResult(self._observation(), reward=10.0 * won, done=won, won=won,
                          action_valid=verb in ("up", "look"), info={"rung": self.rung},
                          num_tool_calls=self.looks, task_type="short" if self.height == 2 else "tall")

    def gold_actions(self) -> tuple[str, ...]:
        return ("up",) * self.height

    def close(self) -> None:
        pass


def climber(context: str) -> str:
    """Looks on the first step (its prompt has no history), then climbs."""
    verb = "up" if "Prior to this step" in context else "look"
    return f"<think>climb</think><action>{verb}</action>"


@pytest.fixture
def ladder(monkeypatch):
    """``ladder`` registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "ENVIRONMENTS", dict(registry.ENVIRONMENTS))
    register_env("ladder", LadderEnv, LADDER_SPLITS)
    return "ladder"


def test_a_registered_environment_satisfies_the_contract_and_rolls_out(ladder):
    envs = [make_env(ladder, split="train", seed=i) for i in range(4)]
    assert all(isinstance(env, AgentEnv) and isinstance(env, HasGoldActions) for env in envs)
    tok = chatml_tokenizer()
    engine = RolloutEngine(ScriptedSampler(tok, climber), tok, RolloutConfig(group_size=2))
    sampling = SamplingParams(max_new_tokens=64, stop_sequences=(tuple(tok.assistant_end_ids),))
    result = engine.run(envs, [0, 1], sampling, jax.random.key(0))
    assert [r.task_type for r in result.rows] == ["short"] * 3 * 2 + ["tall"] * 4 * 2
    assert [r.num_tool_calls for r in result.rows] == ([1] * 3) * 2 + ([1] * 4) * 2
    assert all(r.won and r.episode_return == 10.0 and r.action_valid and not r.incomplete for r in result.rows)
    assert result.rows[2].info == {"rung": 2}
    assert result.metrics["rollout/success_rate/short"] == result.metrics["rollout/success_rate/tall"] == 1.0


def test_a_registered_environment_passes_the_start_up_checks(ladder):
    c = get_config()
    c.unlock()
    c.env.name, c.env.kwargs, c.data.eval_split = ladder, ml_collections.ConfigDict(), "test"
    run_config.validate(c, num_devices=8)
    c.env.domain = "math"
    with pytest.raises(ConfigError, match=r"config\.env\.domain='math': environment 'ladder' \(LadderEnv\) "
                       r"declares domain = 'agent'"):
        run_config.validate(c, num_devices=8)


def test_registering_a_name_twice_is_an_error(ladder):
    with pytest.raises(ValueError, match="'ladder' is already registered"):
        register_env(ladder, LadderEnv, LADDER_SPLITS)
