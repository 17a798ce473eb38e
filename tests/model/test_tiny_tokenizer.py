"""The committed tiny SentencePiece model: exact round trips (whitespace kept), atomic markers,
vocabulary size of the tiny preset, ChatML rendering turn by turn."""
import pytest

from spear_jax.model import get_model_config
from spear_jax.model.chat_template import ChatTemplate
from spear_jax.model.tokenizer import TINY_SPM_PATH, load_tokenizer, tiny_tokenizer

MARKERS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<action>", "</action>",
           "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_vocabulary_matches_tiny_preset(tok):
    assert tok.vocab_size == get_model_config("tiny").vocab_size
    assert tok.eos_id == tok.token_to_id("<|im_end|>")
    assert load_tokenizer(TINY_SPM_PATH).vocab_size == tok.vocab_size


@pytest.mark.parametrize("text", [
    "def f(x):\n    if x:\n        return x  +  1\n\n\n",
    "  two leading spaces\tand a tab\r\n",
    "You see a closed fridge. Valid actions: open fridge, move north",
    "Ünïcödé 你好 🎉 $\\frac{1}{2}$ 12345",
    "",
])
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_markers_are_single_tokens_and_skippable(tok):
    for marker in MARKERS:
        ids = tok.encode(marker)
        assert len(ids) == 1 and tok.id_to_token(ids[0]) == marker
    text = "<think>open it</think><action>open fridge</action>"
    assert tok.decode(tok.encode(text), skip_special=True) == "open itopen fridge"
    indented = tok.encode("\n    return")
    assert tok.id_to_token(indented[1]) == "\u2581" * 4  # indentation is one piece


def test_chatml_turn_by_turn_with_tiny_tokenizer(tok):
    template = ChatTemplate(tok, "chatml")
    messages = [{"role": "user", "content": "Task: cook a meal.\nYou are in the kitchen."},
                {"role": "assistant", "content": "<think>Read the cookbook.</think>\n<action>read cookbook</action>"},
                {"role": "tool", "content": "Recipe: red potato, sliced."}]
    whole = template.conversation(messages, add_generation_prompt=True)
    stream = template.start()
    for m in messages:
        stream = stream + template.message(m["role"], m["content"])
    assert stream + template.generation_prompt() == whole
    assert list(whole.ids) == tok.encode(template.render_text(messages, add_generation_prompt=True))
