"""Single-turn prompts for the agent domains (verl-agent's ALFWorld templates, generalised).

Every env step becomes one training row whose prompt is rendered afresh from the episode state;
the multi-turn dialogue is never replayed. Two templates, as in the reference:

* **first step** (no history yet)::

      {intro}
      [Your task is to: {task}]          <- only for domains whose first observation lacks it
      Your current observation is: {observation}
      Your admissible actions of the current situation are: ['a', 'b', ...].
      {instructions}

* **later steps** (step count ``t >= 1``; the last ``k`` (observation, action) pairs, ``k=2``)::

      {intro} Your task is to: {task}
      Prior to this step, you have already taken {t} step(s). Below are the most recent {m}
      observations and the corresponding actions you took: [Observation j: '...', Action j: '...']
      ...
      You are now at step {t+1} and your current observation is: {observation}
      Your admissible actions of the current situation are: ['a', 'b', ...].
      {instructions}

  where ``m = min(k, t)`` and ``j`` runs over the 1-based step numbers ``t-m+1 .. t``. A history
  pair is (the observation shown before step j, the action executed at step j), i.e. the
  projected action, not the raw response.

``instructions`` asks for reasoning inside ``<think> </think>`` and one admissible action inside
``<action> </action>``, matching ``environments.react.parse_react_action``. Admissible actions
render as a Python-style list of quoted strings; "help" is never shown (ALFWorld convention).
When an environment has no admissible list (``None``) the line is omitted.

The templates above are ``template="verl_agent"`` (the default). ``template="compact"`` carries
the same task, current observation and admissible actions in about half the tokens, for small
models on a CPU budget: the history is the last ``k`` *actions* only (the observations they
answered are dropped) and the instructions are one line::

      {intro} Your task is to: {task}
      Step {t+1}. Your last {m} action(s): 'a', 'b'.       <- only when t >= 1 and k >= 1
      Observation: {observation}
      Admissible actions: ['a', 'b', ...].
      {compact instructions}
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from environments.base import Observation

DEFAULT_HISTORY_LENGTH = 2

INSTRUCTIONS = (
    "Now it's your turn to take an action.\n"
    "You should first reason step-by-step about the current situation. This reasoning process "
    "MUST be enclosed within <think> </think> tags.\n"
    "Once you've finished your reasoning, you should choose an admissible action for current "
    "step and present it within <action> </action> tags."
)

COMPACT_INSTRUCTIONS = (
    "Think inside <think> </think>, then give one admissible action inside <action> </action>."
)

TEMPLATES = ("verl_agent", "compact")

HIDDEN_ACTIONS = frozenset({"help"})


@dataclasses.dataclass(frozen=True)
class AgentPromptStyle:
    """How one agent domain introduces itself in the prompt.

    Attributes:
      intro: the domain's opening sentence, e.g. "You are an expert agent operating in the ALFRED
        Embodied Environment."
      task_in_first_observation: the first observation already states the task (ALFWorld prints
        "Your task is to: ..."), so the first-step prompt does not repeat it.
      verl_agent_renderer: the domain's own layout of the ``verl_agent`` template, called as
        ``renderer(observation, history, history_length)`` (WebShop's page and action lists);
        None: the layout above.
    """

    intro: str
    task_in_first_observation: bool = False
    verl_agent_renderer: Callable[[Observation, Sequence[tuple[str, str]], int], str] | None = None

    def __post_init__(self):
        if not self.intro.strip():
            raise ValueError("AgentPromptStyle.intro must be a non-empty sentence")


def format_admissible_actions(actions: Sequence[str]) -> str:
    """``['a', 'b']`` without the hidden commands (``help``)."""
    shown = [a for a in actions if a not in HIDDEN_ACTIONS]
    return "[" + ", ".join(f"'{a}'" for a in shown) + "]"


def format_history(history: Sequence[tuple[str, str]], history_length: int) -> str:
    """The last ``history_length`` (observation, action) pairs, numbered by global step (1-based).

    Args:
      history: every (observation before step j, action at step j) pair of the episode so far.
      history_length: k, how many of the most recent pairs to show.
    """
    start = max(0, len(history) - history_length)
    lines = [
        f"[Observation {j + 1}: '{obs}', Action {j + 1}: '{act}']"
        for j, (obs, act) in enumerate(history[start:], start=start)
    ]
    return "\n".join(lines)


def render_agent_prompt(
    style: AgentPromptStyle,
    observation: Observation,
    history: Sequence[tuple[str, str]] = (),
    history_length: int = DEFAULT_HISTORY_LENGTH,
    template: str = "verl_agent",
) -> str:
    """Renders the user message for the current step (see the module docstring).

    Args:
      style: the domain's intro line.
      observation: the current observation (text, task, admissible actions).
      history: all (observation, action) pairs of the episode before this step; its length is
        the step count.
      history_length: k >= 0, the number of recent pairs (``"compact"``: actions) shown on later
        steps.
      template: one of ``TEMPLATES``.
    """
    if history_length < 0:
        raise ValueError(f"history_length must be >= 0, got {history_length}")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    for j, pair in enumerate(history):
        if len(pair) != 2:
            raise ValueError(f"history[{j}] must be an (observation, action) pair, got {pair!r}")
    if template == "compact":
        return _render_compact(style, observation, history, history_length)
    if style.verl_agent_renderer is not None:
        return style.verl_agent_renderer(observation, history, history_length)
    actions_line = (
        ""
        if observation.admissible_actions is None
        else "Your admissible actions of the current situation are: "
        f"{format_admissible_actions(observation.admissible_actions)}.\n"
    )
    step_count = len(history)
    if step_count == 0:
        task_line = "" if style.task_in_first_observation else f"Your task is to: {observation.task}\n"
        return (
            f"{style.intro}\n{task_line}"
            f"Your current observation is: {observation.text}\n"
            f"{actions_line}\n{INSTRUCTIONS}"
        )
    shown = min(history_length, step_count)
    return (
        f"{style.intro} Your task is to: {observation.task}\n"
        f"Prior to this step, you have already taken {step_count} step(s). Below are the most "
        f"recent {shown} observations and the corresponding actions you took: "
        f"{format_history(history, history_length)}\n"
        f"You are now at step {step_count + 1} and your current observation is: "
        f"{observation.text}\n"
        f"{actions_line}\n{INSTRUCTIONS}"
    )


def _render_compact(style: AgentPromptStyle, observation: Observation,
                    history: Sequence[tuple[str, str]], history_length: int) -> str:
    lines = [f"{style.intro} Your task is to: {observation.task}"]
    shown = [action for _, action in history[max(0, len(history) - history_length):]]
    if shown:
        actions = ", ".join(f"'{a}'" for a in shown)
        lines.append(f"Step {len(history) + 1}. Your last {len(shown)} action(s): {actions}.")
    lines.append(f"Observation: {observation.text}")
    if observation.admissible_actions is not None:
        lines.append(f"Admissible actions: {format_admissible_actions(observation.admissible_actions)}.")
    lines.append(COMPACT_INSTRUCTIONS)
    return "\n".join(lines)
