"""The warm-start data of one seed, recorded once as a ``conversations`` jsonl and reused.

A study trains each seed's warm start from a file (``config.sft.source = "conversations"``)
instead of asking the environment again, because TextWorldExpress's gold path for a game is not
a function of its seed: the Java simulator returns different winning paths for the same game in
different processes. Recording the data once per seed (``<workdir>/warm_start_data/seed<k>.jsonl``)
makes the warm start a function of that file and the seed.

Two recorders (``study.warm_start.data``):

* ``"gold"`` (``record_gold``): the supervised examples ``spear_jax.sft_data.gold_examples``
  builds for the warm start's config (the same tasks ``config.sft.source = "gold"`` would draw),
  each written as ``[user: the step prompt's text, assistant: the gold turn]``. Every recorded
  conversation is checked to render to exactly the token row ``gold_examples`` made, so training
  on the file is training on the gold source.
* ``"math_tool"`` (``record_math_tool``): worked solutions of the procedural math problems that
  call the code tool: ``[user: the problem as the math env shows it, assistant: a fenced
  ``print(<the problem's arithmetic expression>)`` block, tool: the sandbox's output, assistant:
  "The answer is \\boxed{<that output>}."]``. Each is played through the environment (the real
  sandbox output, the generator's grader) and kept only when graded correct.

Both draw ``min(config.sft.episodes, tasks)`` tasks of the train split without replacement with
``numpy.random.default_rng([config.seed, 17])``.
"""
from __future__ import annotations

import ast
import json
import os
import re
from typing import Sequence

import ml_collections
import numpy as np

from environments.registry import make_env
from spear_jax import sft_data
from spear_jax.model.chat_template import ChatTemplate
from spear_jax.policy import load_tokenizer_of
from spear_jax.rollout import TemplateChatTokenizer

_ARITHMETIC = re.compile(r"[-+*/().\d\s]*\d[-+*/().\d\s]*")
_ARITHMETIC_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult,
                     ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd)


class _RecordingChat:
    """A chat tokenizer that remembers the text of each step row ``gold_examples`` renders: the
    user message of the last ``render_prompt`` call (the one that fitted) and the response
    passed to ``encode`` after it."""

    def __init__(self, chat: TemplateChatTokenizer):
        self.chat, self.conversations, self._messages = chat, [], None

    def render_prompt(self, messages):
        self._messages = list(messages)
        return self.chat.render_prompt(messages)

    def encode(self, text: str) -> list[int]:
        self.conversations.append(self._messages + [("assistant", text)])
        return self.chat.encode(text)

    def __getattr__(self, name):
        return getattr(self.chat, name)


def chat_of(config: ml_collections.ConfigDict) -> TemplateChatTokenizer:
    """The chat tokenizer of run config ``config`` (no weights are loaded)."""
    return TemplateChatTokenizer(ChatTemplate(load_tokenizer_of(config), config.model.chat_format))


def _train_env(config: ml_collections.ConfigDict):
    return make_env(config.env.name, split="train", seed=config.seed, max_steps=config.env.max_steps,
                    **config.env.kwargs.to_dict())


def _draw_tasks(config: ml_collections.ConfigDict, available: Sequence) -> list:
    rng = np.random.default_rng([config.seed, 17])
    picked = rng.choice(len(available), size=min(config.sft.episodes, len(available)), replace=False)
    return [available[i] for i in picked]


def record_gold(config: ml_collections.ConfigDict) -> tuple[list[list[tuple[str, str]]], dict]:
    """(conversations, stats) of the gold examples of ``config`` (module docstring)."""
    chat = chat_of(config)
    recorder = _RecordingChat(chat)
    env = _train_env(config)
    try:
        tasks = _draw_tasks(config, env.task_ids)
        examples, win_rate = sft_data.gold_examples(env, tasks, recorder, config.env.history_length,
                                                    config.env.prompt_template, config.rollout.max_prompt_length)
    finally:
        env.close()
    if len(examples) != len(recorder.conversations):
        raise RuntimeError(f"recorded {len(recorder.conversations)} conversations for {len(examples)} gold rows")
    for number, (example, messages) in enumerate(zip(examples, recorder.conversations)):
        if sft_data.conversation_example(messages, chat) != example:
            raise ValueError(f"gold row {number} does not render back to its tokens from text (its prompt "
                             f"was cut to config.rollout.max_prompt_length): raise that length in the "
                             f"study's overrides")
    return recorder.conversations, {"episodes": len(tasks), "rows": len(examples), "gold_win_rate": win_rate}


def arithmetic_expression(question: str) -> str | None:
    """The longest arithmetic expression in ``question`` (digits, ``+ - * / ( ) .``), without a
    sentence's final period; None when there is none that parses as arithmetic."""
    candidates = sorted((m.group(0).strip() for m in _ARITHMETIC.finditer(question)), key=len, reverse=True)
    for candidate in candidates:
        candidate = candidate.rstrip(".").strip()
        try:
            tree = ast.parse(candidate, mode="eval")
        except SyntaxError:
            continue
        if all(isinstance(node, _ARITHMETIC_NODES) for node in ast.walk(tree)):
            return candidate
    return None


def printed_number(output: str) -> str:
    """The tool's printed result as an answer: ``"12.0"`` -> ``"12"``, others unchanged."""
    text = output.strip()
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else text


def _tool_solution(env, task) -> list[tuple[str, str]] | None:
    """The tool-calling solution of one task, or None when it is not graded correct."""
    observation = env.reset(task_id=task)
    expression = arithmetic_expression(env.problem.problem)
    if expression is None:
        return None
    call = f"```python\nprint({expression})\n```"
    tool = env.step(call)
    if tool.done or not tool.num_tool_calls:
        return None
    final = f"The answer is \\boxed{{{printed_number(tool.observation.text)}}}."
    if not env.step(final).won:
        return None
    return [("user", observation.text), ("assistant", call), ("tool", tool.observation.text), ("assistant", final)]


def record_math_tool(config: ml_collections.ConfigDict) -> tuple[list[list[tuple[str, str]]], dict]:
    """(conversations, stats) of tool-calling solutions of ``config``'s math problems."""
    env = _train_env(config)
    try:
        tasks = _draw_tasks(config, list(range(env.num_tasks)))
        solutions = [_tool_solution(env, int(task)) for task in tasks]
    finally:
        env.close()
    conversations = [s for s in solutions if s is not None]
    if not conversations:
        raise ValueError(f"no problem of {config.env.kwargs.to_dict()} was solved by printing its arithmetic "
                         f"expression: warm_start.data 'math_tool' needs arithmetic problems")
    return conversations, {"episodes": len(tasks), "rows": len(conversations),
                           "solved_fraction": len(conversations) / len(tasks)}


RECORDERS = {"gold": record_gold, "math_tool": record_math_tool}


def write_conversations(path: str, conversations: Sequence[Sequence[tuple[str, str]]], stats: dict) -> None:
    """``path`` (one ``{"messages": [...]}`` per line) and ``<path minus .jsonl>.json`` (stats),
    each written to a temporary file and renamed, the data last (its presence means done)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stats_path = path[: -len(".jsonl")] + ".json"
    with open(stats_path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(stats, handle, indent=2, sort_keys=True)
    os.replace(stats_path + ".tmp", stats_path)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        for messages in conversations:
            record = {"messages": [{"role": role, "content": content} for role, content in messages]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def record(kind: str, config: ml_collections.ConfigDict, path: str) -> dict:
    """Records the ``kind`` warm-start data of ``config`` into ``path``; returns its stats."""
    conversations, stats = RECORDERS[kind](config)
    write_conversations(path, conversations, stats)
    return stats
