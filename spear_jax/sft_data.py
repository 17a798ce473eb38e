"""Supervised warm-start examples, token level: (prompt ids, response ids, response loss mask).

Three sources (``config.sft.source``):

* ``"gold"``: step rows of the environment's gold action sequences (TextWorldExpress and
  ALFWorld expose ``gold_actions()``), rendered exactly as the rollout engine renders them
  (``spear_jax.rollout.render_step_prompt``); the response is the gold turn

      <think>{think}</think><action>{gold action}</action><end of turn>

* ``"conversations"``: a user's jsonl file, one conversation per line,
  ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}``.
  The prompt is the chat-rendered messages before the first assistant message (with the
  generation prompt); after it, assistant messages are trained on (mask 1, ending with the
  template's end-of-turn) and every other message is context (mask 0), joined exactly as the
  engine joins trajectory rows (``TemplateChatTokenizer.render_followup``). So a multi-turn
  tool-use conversation trains like a trajectory row.
* ``"math_solutions"``: a jsonl file of worked solutions, e.g. GSM8K's
  ``{"question": ..., "answer": "... #### 18"}`` or ``{"problem": ..., "solution": ...}``
  (``problem_field`` / ``solution_field``). The prompt is the problem as the math environment
  shows it (``environments.math_env.problem_text``); the response is the solution with GSM8K's
  calculator annotations ``<<3*4=12>>`` removed and a final ``#### X`` line written as
  ``The answer is \\boxed{X}.`` (solutions that already box their answer are kept as they are).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Iterator, Sequence

from environments.math_env import problem_text
from spear_jax.rollout import TemplateChatTokenizer, render_step_prompt

SOURCES = ("gold", "conversations", "math_solutions")
ROLES = ("system", "user", "assistant", "tool")
GOLD_THINK = "next step"

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL_LINE = re.compile(r"\n?####\s*(.+?)\s*$", re.S)


@dataclasses.dataclass(frozen=True)
class Example:
    """prompt: ids before the first trained token; response: the ids after it; mask: [len(response)]
    1.0 where the token is trained on (assistant turns), 0.0 for context (observations)."""

    prompt: list[int]
    response: list[int]
    mask: list[float]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response)


def gold_examples(env, task_ids, chat: TemplateChatTokenizer, history_length: int,
                  template: str = "verl_agent", max_prompt_length: int | None = None,
                  think: str = GOLD_THINK) -> tuple[list[Example], float]:
    """The step rows of every gold step of ``task_ids``, and the fraction of gold episodes the
    environment scored as won (a check of the gold paths themselves)."""
    examples, wins = [], 0
    for task in task_ids:
        observation = env.reset(task_id=int(task))
        history: list[tuple[str, str]] = []
        for action in env.gold_actions():
            prompt = render_step_prompt(chat, env.prompt_style, observation, history, history_length,
                                        template, max_prompt_length)
            response_text = f"<think>{think}</think><action>{action}</action>"
            response = chat.encode(response_text) + list(chat.assistant_end_ids)
            examples.append(Example(prompt, response, [1.0] * len(response)))
            result = env.step(response_text)
            history.append((observation.text, action))
            observation = result.observation
            if result.done:
                wins += int(result.won)
                break
    return examples, wins / max(len(task_ids), 1)


def _jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def _check_messages(messages, where: str) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    pairs = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise ValueError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = message["role"], message.get("content", "")
        if role not in ROLES:
            raise ValueError(f"{where}: messages[{i}] has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: messages[{i}].content must be a string")
        if role == "system" and i != 0:
            raise ValueError(f"{where}: a system message may only come first (messages[{i}])")
        pairs.append((role, content))
    roles = [role for role, _ in pairs]
    if "assistant" not in roles:
        raise ValueError(f"{where}: no assistant message to train on")
    first = roles.index("assistant")
    if first == 0 or roles[first - 1] == "system":
        raise ValueError(f"{where}: the first assistant message must follow a user message")
    for i in range(first + 1, len(roles)):
        if (roles[i] == "assistant") == (roles[i - 1] == "assistant"):
            raise ValueError(f"{where}: after the first assistant message, assistant and other "
                             f"messages must alternate (messages[{i - 1}], messages[{i}])")
    if roles[-1] != "assistant":
        raise ValueError(f"{where}: the conversation must end with an assistant message")
    return pairs


def conversation_example(messages: Sequence[tuple[str, str]], chat: TemplateChatTokenizer) -> Example:
    """The token row of a checked conversation (module docstring)."""
    first = [role for role, _ in messages].index("assistant")
    prompt = chat.render_prompt(list(messages[:first]))
    response: list[int] = []
    mask: list[float] = []
    for role, content in messages[first:]:
        ids = (chat.encode(content) + list(chat.assistant_end_ids) if role == "assistant"
               else chat.render_followup(role, content))
        response += ids
        mask += [1.0 if role == "assistant" else 0.0] * len(ids)
    return Example(prompt, response, mask)


def conversation_examples(path: str, chat: TemplateChatTokenizer) -> list[Example]:
    """Every conversation of a jsonl file; a malformed line raises naming the file and line."""
    examples = []
    for number, record in _jsonl_records(path):
        if "messages" not in record:
            raise ValueError(f"{path}:{number}: missing the 'messages' field")
        examples.append(conversation_example(_check_messages(record["messages"], f"{path}:{number}"), chat))
    if not examples:
        raise ValueError(f"{path}: no conversations")
    return examples


def solution_text(solution: str) -> str:
    """A worked solution as an assistant answer: GSM8K calculator annotations removed, a final
    ``#### X`` line rewritten as ``The answer is \\boxed{X}.``"""
    text = _CALCULATOR.sub("", solution).strip()
    if "\\boxed{" in text:
        return text
    final = _FINAL_LINE.search(text)
    if final is None:
        raise ValueError("the solution neither boxes its answer nor ends with a '#### answer' line")
    return f"{text[:final.start()].rstrip()}\nThe answer is \\boxed{{{final.group(1)}}}.".lstrip()


def math_solution_examples(path: str, chat: TemplateChatTokenizer, problem_field: str = "problem",
                           solution_field: str = "solution",
                           append_instruction: bool = True) -> list[Example]:
    """(problem as the math env shows it, worked solution) pairs of a jsonl file."""
    examples = []
    for number, record in _jsonl_records(path):
        for field in (problem_field, solution_field):
            if not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{number}: field {field!r} is missing or not a string "
                                 f"(config.sft.problem_field / solution_field)")
        try:
            answer = solution_text(record[solution_field])
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        messages = [("user", problem_text(record[problem_field], append_instruction)), ("assistant", answer)]
        examples.append(conversation_example(messages, chat))
    if not examples:
        raise ValueError(f"{path}: no problems")
    return examples
