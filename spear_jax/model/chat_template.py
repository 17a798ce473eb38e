"""Chat templates rendered straight to token ids, with a role per token.

Formats (``name`` -> text of one message):

* ``chatml`` (Qwen, SmolLM2):  ``<|im_start|>{role}\\n{content}<|im_end|>\\n``;
  generation prompt ``<|im_start|>assistant\\n``; stop token ``<|im_end|>``.
* ``llama3``: conversation starts with ``<|begin_of_text|>``; message
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``; generation prompt
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``; stop token ``<|eot_id|>``; the tool
  role is written ``ipython``.

A message renders as header ids + ``encode(content)`` + end ids, so a conversation rendered turn
by turn (``start()`` then ``message(...)`` per message) is the concatenation of its parts and
equals ``conversation(...)``; a sampled reply appended after ``generation_prompt()`` has exactly
the layout of a rendered assistant message. This also equals tokenising the template's text
whenever the content does not begin with whitespace that would merge with the header's newline.
Content is taken verbatim (no default system prompt is inserted, and Llama-3's ``trim`` is not
applied).

Per-token roles (``ROLE_IDS``): header and separator tokens are ``template``; content tokens and
the end-of-message token carry the message's role, so an assistant loss mask covers exactly the
tokens a model generates (its reply and the stop token).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from spear_jax.model.tokenizer import Tokenizer

ROLE_IDS = {"template": 0, "system": 1, "user": 2, "assistant": 3, "tool": 4}


@dataclasses.dataclass(frozen=True)
class RenderedTokens:
    """ids [n] and roles [n] (values of ``ROLE_IDS``)."""

    ids: tuple[int, ...] = ()
    roles: tuple[int, ...] = ()

    def __add__(self, other: "RenderedTokens") -> "RenderedTokens":
        return RenderedTokens(self.ids + other.ids, self.roles + other.roles)

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, role: str = "assistant") -> tuple[bool, ...]:
        """True on the tokens of ``role`` (e.g. the loss mask of assistant replies)."""
        target = ROLE_IDS[role]
        return tuple(r == target for r in self.roles)


def _piece(ids: Sequence[int], role: str) -> RenderedTokens:
    return RenderedTokens(tuple(int(i) for i in ids), (ROLE_IDS[role],) * len(ids))


@dataclasses.dataclass(frozen=True)
class _FormatSpec:
    conversation_prefix: tuple[str, ...]  # special tokens at the very start
    header_open: str  # special token before the role name
    header_close: str | None  # special token after the role name (llama3)
    header_text_after_role: str  # plain text after the role name / header_close
    end_token: str  # special token closing a message (the stop token)
    text_after_end: str  # plain text after the end token
    role_names: dict


FORMATS = {
    "chatml": _FormatSpec((), "<|im_start|>", None, "\n", "<|im_end|>", "\n",
                          {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}),
    "llama3": _FormatSpec(("<|begin_of_text|>",), "<|start_header_id|>", "<|end_header_id|>", "\n\n",
                          "<|eot_id|>", "",
                          {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}),
}


class ChatTemplate:
    """Renders messages of a ``format`` (``"chatml"`` or ``"llama3"``) with ``tokenizer``."""

    def __init__(self, tokenizer: Tokenizer, format: str = "chatml"):
        if format not in FORMATS:
            raise ValueError(f"unknown chat format {format!r}; available: {sorted(FORMATS)}")
        self.tokenizer = tokenizer
        self.format = format
        self._spec = spec = FORMATS[format]
        for token in (*spec.conversation_prefix, spec.header_open, spec.header_close, spec.end_token):
            if token is not None and not tokenizer.has_token(token):
                raise ValueError(f"tokenizer has no {token!r} token required by chat format {format!r}")

    @property
    def stop_id(self) -> int:
        """Id that ends an assistant reply."""
        return self.tokenizer.token_to_id(self._spec.end_token)

    def _special(self, token: str | None) -> list[int]:
        return [] if token is None else [self.tokenizer.token_to_id(token)]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []

    def start(self) -> RenderedTokens:
        """Tokens that open a conversation (BOS for llama3, nothing for chatml)."""
        return _piece([self.tokenizer.token_to_id(t) for t in self._spec.conversation_prefix], "template")

    def header(self, role: str) -> RenderedTokens:
        """Role header, e.g. ``<|im_start|>assistant\\n``."""
        if role not in ROLE_IDS or role == "template":
            raise ValueError(f"role must be one of system/user/assistant/tool, got {role!r}")
        spec = self._spec
        if spec.header_close is None:
            ids = self._special(spec.header_open) + self._encode(spec.role_names[role] + spec.header_text_after_role)
        else:
            ids = (self._special(spec.header_open) + self._encode(spec.role_names[role])
                   + self._special(spec.header_close) + self._encode(spec.header_text_after_role))
        return _piece(ids, "template")

    def generation_prompt(self) -> RenderedTokens:
        """The assistant header that precedes a sampled reply."""
        return self.header("assistant")

    def message(self, role: str, content: str) -> RenderedTokens:
        """One complete message: header, content, end token (role-labelled), separator."""
        header = self.header(role)
        body = _piece(self._encode(content) + self._special(self._spec.end_token), role)
        return header + body + _piece(self._encode(self._spec.text_after_end), "template")

    def conversation(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> RenderedTokens:
        """``start()`` + each ``{"role", "content"}`` message (+ the generation prompt)."""
        out = self.start()
        for i, m in enumerate(messages):
            if set(m) - {"role", "content"} or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must have exactly 'role' and 'content', got {sorted(m)}")
            out = out + self.message(m["role"], m["content"])
        return out + self.generation_prompt() if add_generation_prompt else out

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The template as text (what a Jinja chat template without defaults produces)."""
        spec = self._spec

        def head(role):
            name = spec.role_names[role]
            if spec.header_close is None:
                return spec.header_open + name + spec.header_text_after_role
            return spec.header_open + name + spec.header_close + spec.header_text_after_role

        text = "".join(spec.conversation_prefix)
        for m in messages:
            text += head(m["role"]) + m["content"] + spec.end_token + spec.text_after_end
        return text + (head("assistant") if add_generation_prompt else "")
