"""Recorded warm-start data: gold conversations that train exactly the gold examples, tool-calling
math solutions that the environment grades correct, and a warm start that is the same each time
it is trained from the recorded file."""
import importlib
import json

import jax
import numpy as np
import pytest

from spear_jax import sft, sft_data
from spear_jax.policy import model_config_of, restore_params
from spear_jax.study import warm_data


def _config(preset, **fields):
    c = importlib.import_module("configs.sft").get_config(preset)
    c.unlock()
    c.sft.episodes = 6
    for path, value in fields.items():
        node = c
        *parents, leaf = path.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


def test_arithmetic_expression_and_printed_number():
    assert warm_data.arithmetic_expression("Calculate -1515 / 5 + -( -2842 * -5436 ) * -6892.") == \
        "-1515 / 5 + -( -2842 * -5436 ) * -6892"
    assert warm_data.arithmetic_expression("Calculate 2 - -1.\nThe answer format must be: x") == "2 - -1"
    assert warm_data.arithmetic_expression("What is the capital of France?") is None
    assert warm_data.printed_number("106475279601.0\n") == "106475279601"
    assert warm_data.printed_number("-2.5\n") == "-2.5" and warm_data.printed_number("error\n") == "error"


def test_gold_conversations_render_to_the_gold_examples(tmp_path):
    config = _config("twx_tiny")
    conversations, stats = warm_data.record_gold(config)
    assert stats["episodes"] == 6 and stats["rows"] == len(conversations) >= 6
    path = str(tmp_path / "seed0.jsonl")
    warm_data.write_conversations(path, conversations, stats)
    chat = warm_data.chat_of(config)
    examples = sft_data.conversation_examples(path, chat)  # the warm start's reading of the file
    assert [e.mask for e in examples] == [[1.0] * len(e.response) for e in examples]
    assert all(m[-1][1].startswith("<think>next step</think><action>") for m in conversations)
    assert json.loads((tmp_path / "seed0.json").read_text())["rows"] == len(examples)


def test_a_gold_prompt_that_cannot_be_written_as_text_is_refused():
    with pytest.raises(ValueError, match="max_prompt_length"):
        warm_data.record_gold(_config("twx_tiny", rollout__max_prompt_length=40))


def test_math_tool_solutions_call_the_tool_and_are_graded_correct():
    config = _config("math_tiny")
    conversations, stats = warm_data.record_math_tool(config)
    assert stats["episodes"] == 6 and len(conversations) == stats["rows"] > 0
    for messages in conversations:
        roles = [role for role, _ in messages]
        assert roles == ["user", "assistant", "tool", "assistant"]
        assert messages[1][1].startswith("```python\nprint(") and messages[3][1].startswith("The answer is \\boxed{")
        assert warm_data.printed_number(messages[2][1]) in messages[3][1]


@pytest.mark.slow
def test_the_warm_start_trained_twice_from_the_recorded_file_is_the_same(tmp_path):
    config = _config("twx_tiny")
    path = str(tmp_path / "data.jsonl")
    warm_data.record("gold", config, path)
    config.sft.source, config.sft.data_path = "conversations", path
    config.sft.steps, config.sft.batch_size = 3, 8
    config.actor.ppo_micro_batch_size = 8
    weights = []
    for name in ("first", "second"):
        sft.run_sft(config, str(tmp_path / name))
        weights.append(restore_params(str(tmp_path / name), model_config_of(config), None))
    first, second = (jax.tree.leaves(w) for w in weights)
    assert len(first) == len(second) > 0 and all(np.array_equal(a, b) for a, b in zip(first, second))
