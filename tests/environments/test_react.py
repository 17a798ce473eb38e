"""The ReAct projection: hand cases from the reference and property tests on arbitrary text."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from environments.react import (
    FALLBACK_ACTION_CHARS, has_action_after_last_think, parse_react_action,
)


@pytest.mark.parametrize(
    "response, action, valid",
    [
        ("<think>go</think><action>Go To Desk 1</action>", "go to desk 1", True),
        ("<think>a</think>\n<action>  take mug 1 from desk 1 \n</action> tail", "take mug 1 from desk 1", True),
        # first <action>, first </action> after it
        ("<think>x</think><action>look</action><action>inventory</action>", "look", True),
        # no think tags: action extracted but invalid
        ("<action>look</action>", "look", False),
        ("<think>x<action>look</action>", "look", False),
        # CJK anywhere makes it invalid
        ("<think>思考</think><action>look</action>", "look", False),
        # empty action between tags is still a well-formed response
        ("<think>x</think><action></action>", "", True),
    ],
)
def test_hand_cases(response, action, valid):
    parsed = parse_react_action(response)
    assert parsed.action == action
    assert parsed.valid is valid
    assert (parsed.error is None) is valid


@pytest.mark.parametrize(
    "response",
    [
        "I think I should go to the desk and look around the room carefully",
        "<think>x</think><action>go to desk 1",  # unclosed
        "<think>x</think>go to desk 1</action>",  # no opening tag
        "<think>x</think></action>look<action>",  # closing before opening
    ],
)
def test_missing_action_tags_fall_back_to_last_30_chars(response):
    parsed = parse_react_action(response)
    assert not parsed.valid
    assert parsed.action == response.lower()[-FALLBACK_ACTION_CHARS:]


def test_non_text_is_invalid_not_an_exception():
    parsed = parse_react_action(None)  # type: ignore[arg-type]
    assert not parsed.valid and parsed.action == ""


def test_has_action_after_last_think():
    assert has_action_after_last_think("<think>a</think><action>x</action>")
    assert not has_action_after_last_think("<action>x</action><think>a</think>")
    assert has_action_after_last_think("<action>x</action>")  # no think: whole text searched
    assert not has_action_after_last_think("<think>a</think><action>x")


_tag_pieces = st.sampled_from(
    ["<think>", "</think>", "<action>", "</action>", "<ACTION>", "<act", "ion>", "思", "\x00", "\ud800", " "]
)
_response = st.lists(st.one_of(st.text(max_size=40), _tag_pieces), max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(_response)
def test_projection_properties_on_arbitrary_text(response):
    parsed = parse_react_action(response)
    lower = response.lower()
    assert isinstance(parsed.action, str)
    if parsed.valid:
        assert "<think>" in lower and "</think>" in lower
        assert not any("\u4e00" <= c <= "\u9fff" for c in lower)
        assert parsed.action in lower
    if "<action>" in lower and "</action>" in lower[lower.find("<action>") + 8:]:
        assert parsed.action == lower[lower.find("<action>") + 8:].split("</action>", 1)[0].strip()
    else:
        assert not parsed.valid and parsed.action == lower[-FALLBACK_ACTION_CHARS:]


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=10_000, max_value=2_000_000), st.booleans())
def test_huge_responses(n, tagged):
    body = "x" * n
    response = f"<think>{body}</think><action>look</action>" if tagged else body
    parsed = parse_react_action(response)
    assert parsed.valid is tagged
    assert parsed.action == ("look" if tagged else body[-FALLBACK_ACTION_CHARS:])
