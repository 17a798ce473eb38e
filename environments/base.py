"""The one protocol every text environment implements.

An environment is driven by the host rollout loop: ``reset`` starts an episode on a task (picked by
``task_id`` or drawn from ``seed``), ``step`` takes the model's raw response text for this turn,
parses it into an action (see ``environments.react``), executes it and reports what happened.
Model text is untrusted: ``step`` never raises on malformed text; it returns
``action_valid=False`` and an observation that tells the model what went wrong.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np


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


class IndexedTasks(abc.ABC):
    """Base of the envs whose tasks form a list: ``task_ids`` is ``0 .. num_tasks - 1``."""

    @property
    @abc.abstractmethod
    def num_tasks(self) -> int:
        """Number of tasks in this env's split."""

    @property
    def task_ids(self) -> range:
        """Task ids accepted by ``reset``: ``0 .. num_tasks - 1``."""
        return range(self.num_tasks)


def choose_task_index(task_id: Any, seed: int | None, num_tasks: int, rng: np.random.Generator,
                      what: str, names: Mapping[str, int] | None = None) -> int:
    """The task index an indexed env's ``reset(task_id, seed)`` plays.

    ``task_id`` an int in ``[0, num_tasks)`` (or, with ``names``, one of its keys) selects that
    task; else one is drawn uniformly, from ``numpy.random.default_rng(seed)`` when ``seed`` is
    given, otherwise from the env's own ``rng``. ``what`` names the task list in errors (e.g.
    ``"coin/train"``).
    """
    if task_id is not None and seed is not None:
        raise ValueError("pass either task_id or seed to reset, not both")
    if task_id is None:
        return int((rng if seed is None else np.random.default_rng(seed)).integers(num_tasks))
    if isinstance(task_id, str) and names is not None:
        if task_id not in names:
            raise KeyError(f"task_id {task_id!r} is not a task name of {what}")
        return names[task_id]
    if isinstance(task_id, (bool, np.bool_)) or not isinstance(task_id, (int, np.integer)):
        kinds = "an int index or a task name" if names is not None else "an int index"
        raise TypeError(f"task_id must be {kinds} of {what}, got {task_id!r}")
    if not 0 <= task_id < num_tasks:
        raise IndexError(f"task_id {task_id} out of range for {what} ({num_tasks} tasks: 0..{num_tasks - 1})")
    return int(task_id)
