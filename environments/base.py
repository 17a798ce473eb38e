"""The contract every text environment implements (protocols, step results, task choice).

An environment is driven by the host rollout loop: ``reset`` starts an episode on a task (picked by
``task_id`` or drawn from ``seed``), ``step`` takes the model's raw response text for this turn,
parses it into an action (see ``environments.react``), executes it and reports what happened.
Model text is untrusted: ``step`` never raises on malformed text; it returns
``action_valid=False`` and an observation that tells the model what went wrong.

The contract, in three protocols (checked with ``isinstance``, never by probing attributes):

* ``Env``: every environment. ``name`` (its task type unless a step reports one), ``domain``
  (``"agent"``: ReAct actions, the rollout judges completeness from the response text;
  ``"math"``: answers and code-tool calls, the environment judges it), ``max_steps`` and the
  episode methods. ``domain`` is a class attribute, so a run config can be checked against the
  environment class before anything is built.
* ``AgentEnv``: an ``Env`` whose step prompts the rollout renders (step rows): it adds
  ``prompt_style``, the ``environments.prompts.AgentPromptStyle`` of its prompts.
* ``HasGoldActions``: an environment that knows a winning action sequence for the current
  episode (``gold_actions()``); the supervised warm start (``config.sft.source="gold"``) needs it.

What the rollout reads from a step travels in typed ``StepResult`` fields (``num_tool_calls``,
``incomplete``, ``task_type``); ``info`` holds the domain's own extras, which the rollout copies
onto the row without reading them.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # prompts imports this module
    from environments.prompts import AgentPromptStyle

# What an environment's ``domain`` may be (module docstring).
DOMAINS = ("agent", "math")


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
      info: the domain's own extras, for logs and analysis (e.g. ``task_score``, ``error``);
        nothing in training reads them.
      num_tool_calls: well-formed tool calls made so far in the episode (math: code-interpreter
        calls; 0 for environments without tools). The math reward's tool-call bonus reads the
        last step's count.
      incomplete: math: the environment's verdict that the final answer is missing (no
        extractable boxed answer); Dr.BoT masks such responses. Agent environments leave it
        False: the rollout judges their responses from the text (``environments.react``).
      task_type: the kind of task this episode plays (ALFWorld: one of its six task types), for
        per-type success rates; None = the environment's ``name``.
    """

    observation: Observation
    reward: float
    done: bool
    won: bool
    action_valid: bool
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_tool_calls: int = 0
    incomplete: bool = False
    task_type: str | None = None


@runtime_checkable
class Env(Protocol):
    """A text environment: reset to a task, then step with model text until done.

    Attributes:
      name: the registry name (and the task type of steps that report none).
      domain: ``"agent"`` or ``"math"`` (module docstring), a class attribute.
      max_steps: step limit per episode.
    """

    name: str
    domain: ClassVar[str]
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


@runtime_checkable
class AgentEnv(Env, Protocol):
    """An environment whose step-row prompts the rollout renders with
    ``environments.prompts.render_agent_prompt``."""

    prompt_style: AgentPromptStyle


@runtime_checkable
class HasGoldActions(Protocol):
    """An environment that knows a winning action sequence for its current episode."""

    def gold_actions(self) -> tuple[str, ...]:
        """The actions (projected action strings, e.g. ``"open door"``) that solve the episode
        started by the last ``reset``, from its start."""
        ...


def declared_domain(env_type: type) -> str:
    """The ``domain`` class attribute of an environment class, one of ``DOMAINS``.

    Raises ``TypeError`` naming the class when it declares none or another value.
    """
    domain = getattr(env_type, "domain", None)
    if domain not in DOMAINS:
        raise TypeError(f"environment class {env_type.__name__} must declare its domain as a class "
                        f"attribute, domain = one of {DOMAINS} (got {domain!r}); see docs/environments.md")
    return domain


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
