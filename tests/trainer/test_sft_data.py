"""Warm-start examples: conversations, worked math solutions, gold paths, packing."""
import json
import os

import numpy as np
import pytest

from environments.math_env import problem_text
from spear_jax import sft, sft_data, train_step
from spear_jax.batching import bucket_length
from spear_jax.minibatches import micro_split
from spear_jax.sft_data import Example, conversation_example, solution_text
from spear_jax.model.chat_template import ChatTemplate
from spear_jax.model.tokenizer import tiny_tokenizer
from spear_jax.rollout import TemplateChatTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GSM8K = os.path.join(REPO, "data", "math", "gsm8k_test.jsonl")
MESSAGES = [("system", "You can run Python."), ("user", "What is 2 + 3?"),
            ("assistant", "<tool_call>print(2 + 3)</tool_call>"), ("tool", "5"),
            ("assistant", "The answer is \\boxed{5}.")]


@pytest.fixture(scope="module")
def chat():
    return TemplateChatTokenizer(ChatTemplate(tiny_tokenizer(), "chatml"))


def write_jsonl(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def test_conversation_tokens_equal_the_rendered_dialogue(chat):
    example = conversation_example(MESSAGES, chat)
    full = list(chat.template.conversation([{"role": r, "content": c} for r, c in MESSAGES]).ids)
    ids = example.prompt + example.response
    # the whole dialogue, without the newline chatml puts after the last end token
    assert ids == full[:len(ids)] and chat.decode(full[len(ids):]) == "\n"
    assert example.prompt == chat.render_prompt(MESSAGES[:2])
    mask = np.asarray(example.mask)
    first = chat.encode(MESSAGES[2][1]) + list(chat.assistant_end_ids)
    followup = chat.render_followup("tool", "5")
    last = chat.encode(MESSAGES[4][1]) + list(chat.assistant_end_ids)
    assert example.response == first + followup + last
    np.testing.assert_array_equal(mask, [1] * len(first) + [0] * len(followup) + [1] * len(last))


def test_conversation_file_and_its_errors(chat, tmp_path):
    good = {"messages": [{"role": r, "content": c} for r, c in MESSAGES]}
    path = write_jsonl(tmp_path / "ok.jsonl", [good, "", good])
    examples = sft_data.conversation_examples(path, chat)
    assert len(examples) == 2 and examples[0] == conversation_example(MESSAGES, chat)
    cases = [
        ("not json", r"bad.jsonl:2: not valid JSON"),
        ({"text": "hi"}, r"bad.jsonl:2: missing the 'messages' field"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
        ({"messages": [{"role": "bot", "content": "q"}]}, "role 'bot'"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "must follow a user message"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                       {"role": "assistant", "content": "b"}]}, "must alternate"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                       {"role": "user", "content": "more?"}]}, "must end with an assistant message"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "content must be a string"),
    ]
    for bad, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
        with pytest.raises(ValueError, match=message):
            sft_data.conversation_examples(path, chat)
    with pytest.raises(ValueError, match="no conversations"):
        sft_data.conversation_examples(write_jsonl(tmp_path / "empty.jsonl", [""]), chat)


def test_solution_text_rewrites_gsm8k_solutions():
    with open(GSM8K) as f:
        record = json.loads(f.readline())
    assert solution_text(record["solution"]) == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer’s market.\n"
        "The answer is \\boxed{18}.")
    assert solution_text("So x = 4, \\boxed{4}.") == "So x = 4, \\boxed{4}."
    with pytest.raises(ValueError, match="#### answer"):
        solution_text("the answer is four")


def test_math_solution_file_in_gsm8k_train_layout(chat, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}])
    (example,) = sft_data.math_solution_examples(path, chat, "question", "answer")
    assert example.prompt == chat.render_prompt([("user", problem_text("Tom has 3 apples and buys 4. How many?"))])
    assert chat.decode(example.response) == "3 + 4 = 7\nThe answer is \\boxed{7}.<|im_end|>"
    assert all(m == 1.0 for m in example.mask)
    with pytest.raises(ValueError, match=r"train.jsonl:1: field 'problem' is missing"):
        sft_data.math_solution_examples(path, chat)
    bundled = sft_data.math_solution_examples(GSM8K, chat)
    assert len(bundled) == sum(1 for _ in open(GSM8K))


def test_pack_examples_and_minibatch_cut_only_padding():
    examples = [Example([5, 6, 7], [8, 9], [1.0, 0.0]), Example([1], [2, 3, 4], [1.0, 1.0, 1.0])]
    data = sft.pack_examples(examples, 8, pad_id=0)
    np.testing.assert_array_equal(data["tokens"], [[5, 6, 7, 8, 9, 0, 0, 0], [1, 2, 3, 4, 0, 0, 0, 0]])
    np.testing.assert_array_equal(data["loss_mask"], [[0, 0, 0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]])
    cut = sft.pack_examples(examples, 4, pad_id=0)  # the long prompt loses its first token
    np.testing.assert_array_equal(cut["tokens"][0], [6, 7, 8, 9])
    batch = micro_split(data, np.array([1, 0, 1, 0]), train_step.SFT_KEYS, micro=2, length=5)
    assert batch["tokens"].shape == (2, 2, 5) and batch["row_valid"].shape == (2, 2)
    np.testing.assert_array_equal(batch["tokens"][0, 1], [5, 6, 7, 8, 9])
    assert bucket_length(5, (4, 8, 16)) == 8 and bucket_length(40, (4, 8, 16)) == 16
    with pytest.raises(ValueError, match="does not fit"):
        sft.pack_examples(examples, 3, pad_id=0)


@pytest.mark.slow
def test_sft_on_conversations_lowers_the_loss_and_writes_a_checkpoint(tmp_path):
    import importlib

    from spear_jax import run_config
    from spear_jax.checkpoint import RunCheckpointer
    from spear_jax.policy import CHECKPOINT_SUBDIR

    record = {"messages": [{"role": r, "content": c} for r, c in MESSAGES]}
    c = importlib.import_module("configs.sft").get_config("math_tiny")
    c.unlock()
    c.sft.source, c.sft.data_path = "conversations", write_jsonl(tmp_path / "conv.jsonl", [record] * 3)
    c.sft.steps, c.sft.batch_size, c.sft.lr = 30, 8, 1e-2
    c.actor.ppo_micro_batch_size = 8
    run_config.validate(c, num_devices=8)
    sft.run_sft(c, str(tmp_path / "warm"))
    rows = [json.loads(line) for line in open(tmp_path / "warm" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["sft/nll"] < 0.5 * rows[0]["sft/nll"] and rows[0]["sft/examples"] == 3
    checkpointer = RunCheckpointer(str(tmp_path / "warm" / CHECKPOINT_SUBDIR), max_to_keep=1)
    assert checkpointer.latest_step() == 30
    checkpointer.close()
