"""Tool-call parsing: Hermes JSON calls, fenced code, and every malformed form, fuzzed."""
import json

from hypothesis import given, settings, strategies as st

from environments.tool_calls import parse_turn


def call(payload) -> str:
    return f"<tool_call>{payload if isinstance(payload, str) else json.dumps(payload)}</tool_call>"


def test_hermes_call_with_surrounding_text():
    text = "I will compute.\n" + call({"name": "code_interpreter", "arguments": {"code": "print(2**10)"}}) + "\n"
    turn = parse_turn(text)
    assert turn.is_call and turn.valid and turn.code == "print(2**10)"


def test_arguments_given_as_json_string():
    turn = parse_turn(call({"name": "code_interpreter", "arguments": json.dumps({"code": "x = 1"})}))
    assert turn.code == "x = 1"


def test_python_fences_inside_the_code_argument_are_extracted():
    code = "Here:\n```python\na = 1\n```\ntext\n```py\nprint(a)\n```"
    turn = parse_turn(call({"name": "code_interpreter", "arguments": {"code": code}}))
    assert turn.code == "a = 1\n\nprint(a)\n"


def test_bare_fence_is_a_call_unless_an_answer_follows():
    assert parse_turn("Let me check.\n```python\nprint(7)\n```").code == "print(7)\n"
    final = parse_turn("```python\nprint(7)\n```\nSo the answer is \\boxed{7}.")
    assert not final.attempted_call and final.valid
    assert not parse_turn("```python\nprint(7)\n```", accept_bare_fences=False).attempted_call


def test_final_answer_and_plain_text_are_not_calls():
    for text in ("The answer is \\boxed{25}.", "I am not sure.", ""):
        turn = parse_turn(text)
        assert not turn.attempted_call and turn.valid and turn.code is None


def test_malformed_calls_give_clear_errors():
    cases = {
        call("{not json"): "not valid JSON",
        call("[1, 2]"): "must be a JSON object",
        call({"name": "python", "arguments": {"code": "1"}}): "unknown tool 'python'",
        call({"arguments": {"code": "1"}}): "unknown tool None",
        call({"name": "code_interpreter"}): "'arguments' must be an object",
        call({"name": "code_interpreter", "arguments": {}}): "missing argument 'code'",
        call({"name": "code_interpreter", "arguments": {"code": 5}}): "'code' must be a string",
        call({"name": "code_interpreter", "arguments": {"code": "1", "lang": "py"}}): "unexpected arguments",
        call({"name": "code_interpreter", "arguments": {"code": "  "}}): "'code' is empty",
        call({"name": "code_interpreter", "arguments": "{bad"}): "string that is not a JSON object",
        call({"name": "code_interpreter", "arguments": {"code": "1"}, "id": 3}): "unexpected fields",
        "<tool_call>{\"name\": \"code_interpreter\"": "without a matching",
        call({"name": "code_interpreter", "arguments": {"code": "1"}}) * 2: "2 tool calls in one turn",
    }
    for text, message in cases.items():
        turn = parse_turn(text)
        assert turn.attempted_call and not turn.valid and not turn.is_call, text
        assert message in turn.error and turn.error.startswith("Error:"), (text, turn.error)


def test_non_text_response():
    turn = parse_turn(None)
    assert not turn.valid and "must be text" in turn.error


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                            lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                            max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text_never_raises(text):
    turn = parse_turn(text)
    assert turn.is_call == (turn.code is not None)
    assert turn.valid == (turn.error is None)
    assert not (turn.is_call and turn.error)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100), _json_values, st.text(max_size=100))
def test_fuzz_json_payloads(prefix, payload, suffix):
    text = prefix.replace("<tool_call>", "") + call(payload) + suffix.replace("<tool_call>", "")
    turn = parse_turn(text)
    assert turn.attempted_call
    if turn.is_call:  # only the one well-formed shape is accepted
        assert payload["name"] == "code_interpreter" and isinstance(payload["arguments"]["code"], str)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200).filter(lambda c: c.strip() and "```" not in c))
def test_fuzz_roundtrip_any_code(code):
    turn = parse_turn("thinking\n" + call({"name": "code_interpreter", "arguments": {"code": code}}))
    assert turn.is_call and turn.code == code


def test_code_containing_the_tags_is_not_split():
    code = "s = '</tool_call><tool_call>'\nprint(s)"
    turn = parse_turn(call({"name": "code_interpreter", "arguments": {"code": code}}))
    assert turn.is_call and turn.code == code
