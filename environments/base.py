"""The one protocol every text environment implements.

An environment is driven by the host rollout loop: ``reset`` starts an episode on a task (picked by
``task_id`` or drawn from ``seed``), ``step`` takes the model's raw response text for this turn,
parses it into an action (see ``environments.react``), executes it and reports what happened.
Model text is untrusted: ``step`` never raises on malformed text; it returns
``action_valid=False`` and an observation that tells the model what went wrong.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the agent sees at one point of an episode.

    Attributes:
      text: the raw observation of this turn as the environment printed it (no prompt, no
        history). GiGPO groups steps by equality of this string (the "anchor observation").
      task: the task / goal description of the episode.
      admissible_actions: the actions the environment accepts now, or None when it has no
        such list (math, free-form tools).
    """

    text: str
    task: str
    admissible_actions: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class StepResult:
    """The outcome of one ``Env.step``.

    Attributes:
      observation: the observation after the action.
      reward: the environment's reward for this step (domain scale, e.g. 10 x won).
      done: the episode is over (won, lost, or step limit reached).
      won: the episode ended in success (only meaningful when done).
      action_valid: the model's text parsed into a well-formed action (the invalid-action flag
        of the reference is ``not action_valid``).
      info: domain extras (e.g. ``task_type``, ``task_score``, ``tool_calls``, ``error``).
    """

    observation: Observation
    reward: float
    done: bool
    won: bool
    action_valid: bool
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """A text environment: reset to a task, then step with model text until done."""

    name: str
    max_steps: int

    @property
    def task_ids(self) -> Sequence[int]:
        """The task ids ``reset(task_id=...)`` accepts for this env's split, in a fixed order
        (trainers draw training tasks from it and evaluate on a prefix of it)."""
        ...

    def reset(self, task_id: int | str | None = None, seed: int | None = None) -> Observation:
        """Starts an episode on ``task_id`` (or one drawn from ``seed``) and returns its first
        observation."""
        ...

    def step(self, response_text: str) -> StepResult:
        """Parses the model's response for this turn, executes it and reports the result."""
        ...

    def close(self) -> None:
        """Releases external resources (JVMs, subprocesses, sandboxes)."""
        ...
