"""The WebShop step prompt (verl-agent's layout): task, short history, observation, actions.

Every step row's prompt is rendered afresh from:

* the task (the goal instruction);
* the current observation, reformatted as verl-agent does: the page text is split on
  `` [SEP] ``, everything up to and including the instruction is dropped, and the remaining parts
  are quoted and re-joined (``'Back to Search' [SEP] 'Page 1 (Total results: 50)' [SEP] ...``);
  a page without the instruction is shown unchanged;
* the admissible actions, one per line as ``'<action>',`` inside ``[`` ... ``]``;
* from the second step on, the step count and the last ``history_length`` (2) pairs
  ``[Observation k: '<obs>', Action k: '<action>']`` (k counts steps from 1);
* the ``<think>`` / ``<action>`` answer instructions.

If the prompt with history exceeds ``max_chars`` (13,000) characters, the no-history prompt is
used instead (verl-agent's fallback). ``PROMPT_STYLE`` hands this layout to the trainer's step
rows (``env.prompt_template = "verl_agent"``; ``"compact"`` uses the shared compact layout).
"""
from __future__ import annotations

from typing import Sequence

from environments.base import Observation
from environments.prompts import AgentPromptStyle
from environments.webshop.engine import SEP

HISTORY_LENGTH = 2
MAX_PROMPT_CHARS = 13_000

_ANSWER_INSTRUCTIONS = (
    "Now it's your turn to take one action for the current step.\n"
    "First reason step by step about the current situation and about which admissible action "
    "best advances the shopping goal; this reasoning MUST be enclosed within <think> </think> "
    "tags.\n"
    "Then choose one admissible action for the current step and present it within "
    "<action> </action> tags.")

NO_HISTORY_TEMPLATE = (
    "You are an expert shopping agent working in the WebShop online store.\n"
    "Your task is to: {task}.\n"
    "Your current observation is: {observation}.\n"
    "Your admissible actions in the current situation are:\n[\n{actions}\n].\n\n"
    + _ANSWER_INSTRUCTIONS)

HISTORY_TEMPLATE = (
    "You are an expert shopping agent working in the WebShop online store.\n"
    "Your task is to: {task}.\n"
    "Prior to this step, you have already taken {step_count} step(s). Below are the most recent "
    "{history_length} observations and the corresponding actions you took: {history}\n"
    "You are now at step {current_step} and your current observation is: {observation}.\n"
    "Your admissible actions in the current situation are:\n[\n{actions}\n].\n\n"
    + _ANSWER_INSTRUCTIONS)


def format_observation(page_text: str, task: str) -> str:
    """The page without its instruction header, each remaining part quoted (see module doc)."""
    parts = page_text.split(SEP)
    if task not in parts:
        return page_text
    return SEP.join(f"'{part}'" for part in parts[parts.index(task) + 1:])


def format_actions(actions: Sequence[str]) -> str:
    return "\n".join(f"'{action}'," for action in actions)


def format_history(history: Sequence[tuple[str, str]], task: str, first_step: int) -> str:
    """``[Observation k: '...', Action k: '...']`` lines for (page text, action) pairs."""
    return "".join(
        f"\n[Observation {first_step + i}: '{format_observation(page, task)}', "
        f"Action {first_step + i}: '{action}']"
        for i, (page, action) in enumerate(history))


def render_prompt(task: str, page_text: str, actions: Sequence[str],
                  history: Sequence[tuple[str, str]] = (), history_length: int = HISTORY_LENGTH,
                  max_chars: int = MAX_PROMPT_CHARS) -> str:
    """The prompt of one step.

    Args:
      task: the goal instruction.
      page_text: the current raw page text (``Observation.text``).
      actions: the admissible actions now.
      history: every earlier (raw page text, action taken on it) pair of the episode, oldest
        first; only the last ``history_length`` are shown.
      history_length: pairs shown (0 disables history).
      max_chars: longest prompt with history before falling back to the no-history prompt.
    """
    if history_length < 0:
        raise ValueError(f"history_length must be >= 0, got {history_length}")
    no_history = NO_HISTORY_TEMPLATE.format(
        task=task, observation=format_observation(page_text, task), actions=format_actions(actions))
    if not history or history_length == 0:
        return no_history
    shown = list(history)[-history_length:]
    prompt = HISTORY_TEMPLATE.format(
        task=task, step_count=len(history), history_length=len(shown),
        history=format_history(shown, task, first_step=len(history) - len(shown) + 1),
        current_step=len(history) + 1, observation=format_observation(page_text, task),
        actions=format_actions(actions))
    return no_history if len(prompt) > max_chars else prompt


def render_step_prompt(observation: Observation, history: Sequence[tuple[str, str]],
                       history_length: int) -> str:
    """``render_prompt`` for an ``Observation`` (the trainer's ``verl_agent`` step prompt)."""
    return render_prompt(observation.task, observation.text, observation.admissible_actions,
                         history, history_length)


PROMPT_STYLE = AgentPromptStyle(
    intro="You are an expert shopping agent working in the WebShop online store.",
    verl_agent_renderer=render_step_prompt)
