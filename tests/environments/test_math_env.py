"""MathToolEnv: episodes over real problems with real sandbox calls and the real verifier."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from environments.base import Env
from environments.math_data import ANSWER_FORMAT_INSTRUCTION, MathProblem, ProceduralProblems, bundled_math_builder, load_problems
from environments.math_env import MathEnvConfig, MathToolEnv, truncate_middle
from environments.sandbox import Sandbox, SandboxConfig


def call(code: str) -> str:
    return "<tool_call>" + json.dumps({"name": "code_interpreter", "arguments": {"code": code}}) + "</tool_call>"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxConfig(pool_size=1, timeout_s=3.0, cpu_time_s=2)) as sb:
        yield sb


@pytest.fixture(scope="module")
def aime(tmp_path_factory):
    return load_problems(bundled_math_builder("aime2024", str(tmp_path_factory.mktemp("tfds"))), "test")


def test_implements_the_protocol(aime, sandbox):
    assert isinstance(MathToolEnv(aime, sandbox), Env)


def test_reset_appends_the_reference_instruction(aime, sandbox):
    env = MathToolEnv(aime, sandbox)
    obs = env.reset(task_id="aime2024-I-3")
    assert obs.text == env.problem.problem + "\n" + ANSWER_FORMAT_INSTRUCTION == obs.task
    assert ANSWER_FORMAT_INSTRUCTION == "The answer format must be: \\boxed{'The final answer goes here.'}"
    assert obs.admissible_actions is None
    assert env.reset(task_id=0).task.startswith(aime[0].problem)
    assert MathToolEnv(aime, sandbox, MathEnvConfig(append_instruction=False)).reset(task_id=1).text == aime[1].problem


def test_seeded_draws_are_deterministic(aime, sandbox):
    env = MathToolEnv(aime, sandbox)
    picks = [env.reset(seed=s).task for s in range(5)]
    assert picks == [env.reset(seed=s).task for s in range(5)]
    assert len(set(picks)) > 1


def test_bad_task_ids(aime, sandbox):
    env = MathToolEnv(aime, sandbox)
    with pytest.raises(KeyError, match="nope"):
        env.reset(task_id="nope")
    with pytest.raises(IndexError, match="out of range"):
        env.reset(task_id=30)
    with pytest.raises(ValueError, match="empty"):
        MathToolEnv([], sandbox)
    with pytest.raises(ValueError, match="max_turns"):
        MathEnvConfig(max_turns=0)


def test_full_episode_tool_call_then_correct_answer(aime, sandbox):
    env = MathToolEnv(aime, sandbox)
    env.reset(task_id="aime2024-I-3")
    r = env.step("Bob wins iff n = 0 or 2 mod 5.\n" + call("print(sum(1 for n in range(1, 2025) if n % 5 in (0, 2)))"))
    assert (r.observation.text, r.reward, r.done, r.action_valid) == ("809\n", 0.0, False, True)
    assert r.num_tool_calls == 1 and r.info["tool_status"] == "ok"
    r = env.step("So the answer is \\boxed{809}.")
    assert r.done and r.won and r.reward == 1.0 and r.action_valid
    assert r.info["correct"] and r.info["acc"] == 1.0 and not r.incomplete
    assert r.num_tool_calls == 1 and r.info["turns"] == 2 and r.info["extracted_answer"] == "809"
    with pytest.raises(RuntimeError, match="reset"):
        env.step("more")


def test_wrong_and_missing_answers(aime, sandbox):
    env = MathToolEnv(aime, sandbox)
    env.reset(task_id="aime2024-I-3")
    r = env.step("\\boxed{808}")
    assert r.done and not r.won and r.reward == -1.0 and not r.incomplete and r.info["acc"] == 0.0
    env.reset(task_id="aime2024-I-3")
    r = env.step("I think it is 809.")
    assert r.done and r.reward == -1.0 and r.incomplete and r.num_tool_calls == 0


def test_malformed_call_is_an_invalid_action_not_an_exception(aime, sandbox):
    env = MathToolEnv(aime, sandbox)
    env.reset(task_id=0)
    r = env.step("<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expr\": \"1+1\"}}</tool_call>")
    assert not r.done and not r.action_valid and r.reward == 0.0
    assert r.observation.text == "Error: unknown tool 'calculator'; the only tool is 'code_interpreter'."
    assert r.num_tool_calls == 0 and r.info["num_invalid_calls"] == 1
    r = env.step(call("print(1)") + call("print(2)"))
    assert not r.action_valid and "2 tool calls" in r.observation.text
    r = env.step(None)
    assert r.done and r.incomplete


def test_hostile_code_in_an_episode_gives_an_error_observation(aime, sandbox):
    env = MathToolEnv(aime, sandbox)
    env.reset(task_id=0)
    r = env.step(call("import time\nwhile True:\n    time.sleep(1)"))
    assert not r.done and r.action_valid and r.info["tool_status"] == "timeout"
    assert "timed out" in r.observation.text
    r = env.step(call("1/0"))
    assert "ZeroDivisionError" in r.observation.text and r.num_tool_calls == 2


def test_tool_output_is_cut_in_the_middle(aime, sandbox):
    env = MathToolEnv(aime, sandbox, MathEnvConfig(max_tool_output_chars=200))
    env.reset(task_id=0)
    r = env.step(call("print('HEAD' + 'x' * 5000 + 'TAIL')"))
    assert len(r.observation.text) <= 200
    assert r.observation.text.startswith("HEAD") and r.observation.text.endswith("TAIL\n")
    assert "characters truncated" in r.observation.text


def test_turn_limit_ends_the_episode_incomplete(aime, sandbox):
    env = MathToolEnv(aime, sandbox, MathEnvConfig(max_turns=3))
    env.reset(task_id=0)
    assert not env.step(call("print(1)")).done
    assert not env.step("```python\nprint(2)\n```").done
    r = env.step(call("print(3)"))
    assert r.done and r.reward == -1.0 and r.incomplete and r.info["turns_exhausted"]
    assert r.num_tool_calls == 3 and "tool_status" not in r.info  # counted, not run
    env.reset(task_id="aime2024-I-3")
    env.step(call("print(1)"))
    env.step(call("print(2)"))
    r = env.step("\\boxed{809}")
    assert r.done and r.won and not r.info["turns_exhausted"]


def test_reference_turn_limit_is_eight(aime, sandbox):
    env = MathToolEnv(aime, sandbox, MathEnvConfig(max_turns=8))
    env.reset(task_id=0)
    results = [env.step("<tool_call>{broken</tool_call>") for _ in range(8)]
    assert [r.done for r in results] == [False] * 7 + [True] and env.max_steps == 8


def test_procedural_problems_with_their_own_grader(sandbox):
    problems = ProceduralProblems("chain_sum", seed=1, size=5)
    env = MathToolEnv(problems, sandbox, grader=problems.grade)
    env.reset(task_id=0)
    expression = problems[0].problem.split("=")[0].split(":")[-1].strip()
    r = env.step(call(f"print({expression})"))
    assert r.observation.text.strip() == problems[0].answer
    assert env.step(f"\\boxed{{{r.observation.text.strip()}}}").won


def test_custom_problem_list(sandbox):
    env = MathToolEnv([MathProblem("p", "What is 1/2 + 1/3?", "\\frac{5}{6}", "custom")], sandbox)
    env.reset()
    assert env.step("\\boxed{5/6}").won


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.integers(min_value=1, max_value=300))
def test_truncate_middle_properties(text, limit):
    out = truncate_middle(text, limit)
    assert len(out) <= limit
    if len(text) <= limit:
        assert out == text
    elif "truncated]" in out:
        head, tail = out.split("\n...[", 1)[0], out.rsplit("]...\n", 1)[1]
        assert text.startswith(head) and text.endswith(tail)
        cut = int(out.split("\n...[", 1)[1].split(" ")[0])
        assert len(head) + len(tail) + cut == len(text)
    else:
        assert out == text[:limit]


def test_faithful_strict_verifier_option(aime, sandbox):
    sound = MathToolEnv(aime, sandbox)
    strict = MathToolEnv(aime, sandbox, MathEnvConfig(verifier="dapo_strict"))
    for env in (sound, strict):
        env.reset(task_id="aime2024-I-3")
    assert sound.step("\\boxed{0809}").won
    assert not strict.step("\\boxed{0809}").won
    with pytest.raises(ValueError, match="verifier"):
        MathEnvConfig(verifier="nope")
