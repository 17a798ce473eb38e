"""Parsing one model turn of the code-interpreter math agent.

A turn is one of:

* a **tool call**, Hermes / Qwen style::

      <tool_call>{"name": "code_interpreter", "arguments": {"code": "print(1+1)"}}</tool_call>

  ``arguments`` may also be a JSON string holding that object (some chat templates emit it so).
  If the ``code`` argument contains ```` ```python ```` fences, the code is the fenced part
  (all fenced blocks joined by newlines), as in the reference;
* a **bare fenced block** (```` ```python ... ``` ````, no ``<tool_call>``), accepted as a call
  when ``accept_bare_fences`` is on and no ``\\boxed{}`` answer follows the last fence (a final
  answer that shows its code is an answer, not a call);
* a **final answer**: anything else (graded by its last ``\\boxed{}``).

At most ``MAX_CALLS_PER_TURN`` = 1 call per turn (as the reference). Malformed JSON, a wrong tool name, missing
or extra arguments, non-string code, an unclosed ``<tool_call>``, or too many calls give a
``ParsedTurn`` with ``error`` set (the message is shown to the model) and no call. Parsing never
raises.
"""
from __future__ import annotations

import dataclasses
import json
import re

from environments.math_grading import last_boxed_content

TOOL_NAME = "code_interpreter"
MAX_CALLS_PER_TURN = 1  # the reference allows at most one (parallel) call per turn
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_DECODER = json.JSONDecoder()
_PY_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """One parsed assistant turn.

    Attributes:
      code: the code to run when the turn is a well-formed tool call, else None.
      error: why the turn's tool call is malformed (shown to the model), else None.
      attempted_call: the turn tried to call a tool (well-formed or not).
    """

    code: str | None
    error: str | None
    attempted_call: bool

    @property
    def is_call(self) -> bool:
        return self.code is not None

    @property
    def valid(self) -> bool:
        return self.error is None


def fenced_python(text: str) -> list[str]:
    """The contents of all ```` ```python ```` (or ```` ```py ````) blocks of ``text``."""
    return [m.group(1) for m in _PY_FENCE.finditer(text)]


def _code_from_argument(code: str) -> str:
    blocks = fenced_python(code)
    return "\n".join(blocks) if blocks else code


def _call_payloads(text: str) -> tuple[list[str], bool]:
    """The payloads between ``<tool_call>`` and ``</tool_call>``, and whether one is unclosed.

    A payload that starts with a JSON value followed by the closing tag is taken whole, so code
    strings that contain the tags themselves do not split a call.
    """
    payloads, pos = [], text.find(CALL_OPEN)
    while pos != -1:
        start = pos + len(CALL_OPEN)
        value_start = len(text) - len(text[start:].lstrip())
        end = -1
        try:
            _, value_end = _DECODER.raw_decode(text, value_start)
            tail = len(text) - len(text[value_end:].lstrip())
            if text.startswith(CALL_CLOSE, tail):
                end = tail
        except (json.JSONDecodeError, RecursionError):
            pass
        if end == -1:
            end = text.find(CALL_CLOSE, start)
            if end == -1:
                return payloads, True
        payloads.append(text[start:end])
        pos = text.find(CALL_OPEN, end + len(CALL_CLOSE))
    return payloads, False


def _error(message: str) -> ParsedTurn:
    return ParsedTurn(code=None, error=message, attempted_call=True)


def _parse_call_json(payload: str, tool_name: str) -> ParsedTurn:
    try:
        call = json.loads(payload)
    except (json.JSONDecodeError, RecursionError) as err:
        return _error(f"Error: the tool call is not valid JSON ({err}). Expected "
                      f'{{"name": "{tool_name}", "arguments": {{"code": "..."}}}}.')
    if not isinstance(call, dict):
        return _error(f"Error: the tool call must be a JSON object, got {type(call).__name__}.")
    name = call.get("name")
    if name != tool_name:
        return _error(f"Error: unknown tool {name!r}; the only tool is {tool_name!r}.")
    unexpected = sorted(set(call) - {"name", "arguments"})
    if unexpected:
        return _error(f"Error: unexpected fields {unexpected} in the tool call; use 'name' and 'arguments'.")
    arguments = call.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            return _error("Error: 'arguments' is a string that is not a JSON object.")
    if not isinstance(arguments, dict):
        return _error(f"Error: 'arguments' must be an object with a 'code' string, got "
                      f"{type(arguments).__name__}.")
    if "code" not in arguments:
        return _error(f"Error: missing argument 'code' for {tool_name}.")
    extra = sorted(set(arguments) - {"code"})
    if extra:
        return _error(f"Error: unexpected arguments {extra}; {tool_name} takes only 'code'.")
    code = arguments["code"]
    if not isinstance(code, str):
        return _error(f"Error: argument 'code' must be a string, got {type(code).__name__}.")
    code = _code_from_argument(code)
    if not code.strip():
        return _error("Error: argument 'code' is empty.")
    return ParsedTurn(code=code, error=None, attempted_call=True)


def parse_turn(text: str, tool_name: str = TOOL_NAME, accept_bare_fences: bool = True) -> ParsedTurn:
    """Classifies and parses one assistant turn (see module docstring). Never raises."""
    if not isinstance(text, str):
        return _error(f"Error: the response must be text, got {type(text).__name__}.")
    blocks, unclosed = _call_payloads(text)
    if len(blocks) > MAX_CALLS_PER_TURN:
        return _error(f"Error: {len(blocks)} tool calls in one turn; at most "
                      f"{MAX_CALLS_PER_TURN} is allowed.")
    if unclosed:
        return _error(f"Error: {CALL_OPEN} without a matching {CALL_CLOSE}.")
    if blocks:
        return _parse_call_json(blocks[0].strip(), tool_name)
    if accept_bare_fences:
        fences = list(_PY_FENCE.finditer(text))
        if fences and last_boxed_content(text[fences[-1].end():]) is None:
            code = "\n".join(m.group(1) for m in fences)
            if code.strip():
                return ParsedTurn(code=code, error=None, attempted_call=True)
    return ParsedTurn(code=None, error=None, attempted_call=False)
