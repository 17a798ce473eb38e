"""Trajectory rows on the math code-interpreter env: real sandbox calls, real verifier."""
import json
import re

import jax
import numpy as np
import pytest

from environments.math_data import MathProblem
from environments.math_env import MathToolEnv
from environments.sandbox import Sandbox, SandboxConfig
from rollout_scripted import ScriptedSampler, chatml_tokenizer
from spear_jax.rollout import RolloutConfig, RolloutEngine
from spear_jax.sampling import SamplingParams

PROBLEMS = [
    MathProblem(id="mul", problem="What is 6 times 7?", answer="42", source="test"),
    MathProblem(id="pow", problem="What is 2 to the power 10?", answer="1024", source="test"),
]
CODE = {"mul": "print(6 * 7)", "pow": "print(2 ** 10)"}
TOOL_OUTPUT = re.compile(r"<\|im_start\|>tool\n(.*?)<\|im_end\|>", re.S)


def policy(context):
    """Turn 1: compute with the tool. Turn 2: answer the tool's output (wrongly for "pow")."""
    outputs = TOOL_OUTPUT.findall(context)
    if not outputs:
        code = CODE["mul"] if "6 times 7" in context else CODE["pow"]
        return "Let me compute.<tool_call>" + json.dumps(
            {"name": "code_interpreter", "arguments": {"code": code}}) + "</tool_call>"
    value = int(re.findall(r"\d+", outputs[-1])[0])
    return f"The tool says {value}. \\boxed{{{value if value == 42 else value + 1}}}"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxConfig(pool_size=1, timeout_s=5.0, cpu_time_s=3)) as sb:
        yield sb


def test_math_trajectory_rows(sandbox):
    tok = chatml_tokenizer()
    envs = [MathToolEnv(PROBLEMS, sandbox) for _ in range(4)]
    sampler = ScriptedSampler(tok, policy)
    config = RolloutConfig(group_size=2, layout="trajectory", domain="math", max_sequence_length=2048,
                           system_prompt="Solve with the code_interpreter tool.")
    sampling = SamplingParams(max_new_tokens=200, stop_sequences=(tok.assistant_end_ids,))
    result = RolloutEngine(sampler, tok, config).run(envs, ["mul", "pow"], sampling, jax.random.key(0))
    assert sampler.calls == [4, 4] and len(result.rows) == 4
    for row in result.rows:
        correct = row.task_id == "mul"
        assert row.reward == row.episode_return == (1.0 if correct else -1.0)
        assert row.won == correct and row.num_tool_calls == 1 and row.num_turns == 2
        assert not row.incomplete and row.action_valid and row.group_id == (0 if correct else 1)
        # the tool output sits in the response with loss mask 0, generated turns have mask 1
        answer = "42" if correct else "1024"
        observation = tok.render_followup("tool", answer + "\n")
        r = row.response_ids
        starts = [i for i in range(len(r) - len(observation) + 1) if list(r[i:i + len(observation)]) == observation]
        assert len(starts) == 1, tok.decode(r)
        s = starts[0]
        np.testing.assert_array_equal(row.loss_mask[s:s + len(observation)], 0)
        np.testing.assert_array_equal(row.loss_mask[:s], 1)
        np.testing.assert_array_equal(row.loss_mask[s + len(observation):], 1)
        assert "\\boxed{" in tok.decode(r[s + len(observation):])
    assert result.metrics["rollout/success_rate"] == 0.5
    assert result.metrics["rollout/tool_calls"] == 1.0


def test_math_incomplete_answer_flagged(sandbox):
    tok = chatml_tokenizer()
    envs = [MathToolEnv(PROBLEMS, sandbox)]
    sampler = ScriptedSampler(tok, lambda context: "I think it is forty-two.")
    config = RolloutConfig(group_size=1, layout="trajectory", domain="math", max_sequence_length=1024)
    sampling = SamplingParams(max_new_tokens=64, stop_sequences=(tok.assistant_end_ids,))
    result = RolloutEngine(sampler, tok, config).run(envs, ["mul"], sampling, jax.random.key(0))
    (row,) = result.rows
    assert row.incomplete and row.reward == -1.0 and row.num_tool_calls == 0 and row.num_turns == 1
