"""ReAct response parsing for the agent domains: ``<think>...</think><action>...</action>``.

The projection follows the reference (verl-agent's ALFWorld / WebShop projection):

* the response is lower-cased;
* if ``<action>`` or a closing ``</action>`` after it is missing, the action is the last 30
  characters of the response and the step is invalid;
* otherwise the action is the stripped text between the first ``<action>`` and the first
  ``</action>`` after it;
* validity additionally requires both ``<think>`` and ``</think>`` and no CJK characters.

An invalid action is still executed by the environment (it usually answers "Nothing happens");
only the validity flag feeds the invalid-action penalty. Parsing never raises.
"""
from __future__ import annotations

import dataclasses
import re

ACTION_OPEN, ACTION_CLOSE = "<action>", "</action>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FALLBACK_ACTION_CHARS = 30
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclasses.dataclass(frozen=True)
class ParsedAction:
    """A projected action: the text to execute and whether the response was well-formed."""

    action: str
    valid: bool
    error: str | None = None


def parse_react_action(response: str) -> ParsedAction:
    """Projects a model response onto an environment action (see module docstring)."""
    if not isinstance(response, str):
        return ParsedAction(action="", valid=False, error="response is not text")
    text = response.lower()
    start = text.find(ACTION_OPEN)
    end = text.find(ACTION_CLOSE, start + len(ACTION_OPEN)) if start != -1 else -1
    if start == -1 or end == -1:
        return ParsedAction(
            action=text[-FALLBACK_ACTION_CHARS:],
            valid=False,
            error=f"missing {ACTION_OPEN}...{ACTION_CLOSE}",
        )
    action = text[start + len(ACTION_OPEN):end].strip()
    if THINK_OPEN not in text or THINK_CLOSE not in text:
        return ParsedAction(action=action, valid=False, error=f"missing {THINK_OPEN}...{THINK_CLOSE}")
    if _CJK.search(text):
        return ParsedAction(action=action, valid=False, error="response contains CJK characters")
    return ParsedAction(action=action, valid=True)


def has_action_after_last_think(response: str) -> bool:
    """Dr.BoT's agent completeness test: an ``<action>...</action>`` after the last ``</think>``.

    The think tags themselves are not required; without ``</think>`` the whole response is
    searched.
    """
    text = response.lower()
    tail = text[text.rfind(THINK_CLOSE) + len(THINK_CLOSE):] if THINK_CLOSE in text else text
    start = tail.find(ACTION_OPEN)
    return start != -1 and tail.find(ACTION_CLOSE, start + len(ACTION_OPEN)) != -1
