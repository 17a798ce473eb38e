"""ALFWorld (text) as an agent environment, on the ``alfworld`` package's TextWorld engine.

The real ALFWorld games (``data/alfworld/``, unpacked by ``environments.alfworld_data``) are
played by TextWorld's PDDL backend with ALFWorld's own name demangler, exactly the engine behind
``alfworld.agents.environment.AlfredTWEnv`` (which needs a config file and ``traj_data.json``;
this module loads the game files directly and reads the task type from the folder name).
Requires ``pip install -r requirements-alfworld.txt``.

Episode semantics (the paper's setting):

* splits: ``train`` (3553 games), ``valid_seen`` (140, evaluation in distribution),
  ``valid_unseen`` (134, out of distribution), ``valid_train`` (200);
* ``reset(task_id)`` plays the ``task_id``-th game of the split (sorted by name; an int index or
  the game's name ``<task folder>/<trial folder>``); ``reset(seed=s)`` draws a game uniformly
  with ``numpy.random.default_rng(s)``; ``reset()`` draws from the env's own generator;
* reward = ``reward_scale * won`` (default ``10 * won``), paid on the winning step;
* done = won, or ``max_steps`` (default 50) steps taken (``info["truncated"]``);
* admissible actions exclude "help"; the projected action is executed even when the response was
  malformed (ALFWorld answers "Nothing happens."), ``action_valid`` records the malformation;
* ``StepResult.task_type`` is one of the six ALFWorld task types; ``success_by_task_type`` turns
  finished episodes into the per-type success rates of the paper's tables.

A reset loads and compiles the game (0.4-1 s on an idle CPU core); a step takes 40-80 ms
(admissible-command generation dominates). See docs/environments.md for measured throughput.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np

from environments import alfworld_data
from environments.alfworld_data import TASK_TYPES
from environments.base import IndexedTasks, Observation, StepResult, choose_task_index
from environments.prompts import AgentPromptStyle
from environments.react import parse_react_action

DEFAULT_MAX_STEPS = 50
DEFAULT_REWARD_SCALE = 10.0
TASK_MARKER = "Your task is to: "
HIDDEN_COMMANDS = frozenset({"help"})

PROMPT_STYLE = AgentPromptStyle(
    intro="You are an expert agent operating in the ALFRED Embodied Environment.",
    task_in_first_observation=True,
)


def task_from_observation(text: str) -> str:
    """The goal sentence after "Your task is to: " in ALFWorld's first observation."""
    start = text.find(TASK_MARKER)
    if start == -1:
        raise ValueError(f"ALFWorld observation has no {TASK_MARKER!r}: {text[:200]!r}")
    return text[start + len(TASK_MARKER):].strip()


def success_by_task_type(episodes: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """Success rate per task type and overall (key ``"all"``) from (task_type, won) pairs.

    Task types without episodes are left out; raises on an unknown task type or no episodes.
    """
    wins: dict[str, list[bool]] = {}
    for task_type, won in episodes:
        if task_type not in TASK_TYPES:
            raise ValueError(f"unknown ALFWorld task type {task_type!r}; expected one of {TASK_TYPES}")
        wins.setdefault(task_type, []).append(bool(won))
    if not wins:
        raise ValueError("success_by_task_type needs at least one episode")
    rates = {t: float(np.mean(wins[t])) for t in TASK_TYPES if t in wins}
    rates["all"] = float(np.mean([w for ws in wins.values() for w in ws]))
    return rates


def _start_engine(game_path: str):
    """A TextWorld env with ALFWorld's wrappers, loaded with ``game_path``."""
    try:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    except ImportError as error:
        raise ImportError(
            "the ALFWorld environment needs the alfworld engine: "
            "pip install -r requirements-alfworld.txt"
        ) from error
    request_infos = textworld.EnvInfos(
        won=True, lost=True, admissible_commands=True, extras=["gamefile", "walkthrough"]
    )
    return textworld.start(
        game_path, request_infos=request_infos, wrappers=[AlfredDemangler(shuffle=False), AlfredInfos]
    )


class ALFWorldEnv(IndexedTasks):
    """One ALFWorld split; implements ``environments.base.Env``.

    Args:
      split: one of ``alfworld_data.SPLITS``.
      max_steps: step limit per episode (default 50).
      reward_scale: reward paid on the winning step (default 10: reward = 10 * won).
      seed: seeds the generator used by ``reset()`` without arguments.
      task_types: restrict the split to these task types (default all six).
      cache_dir: where the games are unpacked (see ``alfworld_data.resolve_cache_dir``).
    """

    name = "alfworld"
    domain = "agent"
    prompt_style = PROMPT_STYLE

    def __init__(
        self,
        split: str = "train",
        max_steps: int = DEFAULT_MAX_STEPS,
        reward_scale: float = DEFAULT_REWARD_SCALE,
        seed: int = 0,
        task_types: tuple[str, ...] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        self.split = split
        self.max_steps = int(max_steps)
        self.reward_scale = float(reward_scale)
        self.games = alfworld_data.list_games(split, cache_dir, task_types)
        self._index_by_name = {game.name: i for i, game in enumerate(self.games)}
        self._rng = np.random.default_rng(seed)
        self._engine = None
        self._episode: dict[str, Any] | None = None
        self._closed = False

    @property
    def num_tasks(self) -> int:
        return len(self.games)

    def reset(self, task_id: int | str | None = None, seed: int | None = None) -> Observation:
        self._check_open()
        index = choose_task_index(task_id, seed, self.num_tasks, self._rng,
                                  f"ALFWorld split {self.split!r}", self._index_by_name)
        game = self.games[index]
        if self._engine is None:
            self._engine = _start_engine(str(game.path))
        else:
            self._engine.load(str(game.path))
        state = self._engine.reset()
        text = str(state["feedback"])
        self._episode = {
            "task_id": index,
            "game": game,
            "task": task_from_observation(text),
            "gold": tuple(state["extra.walkthrough"]),
            "steps": 0,
            "done": False,
        }
        return self._observation(text, state)

    def step(self, response_text: str) -> StepResult:
        parsed = parse_react_action(response_text)
        return self.step_action(parsed.action, action_valid=parsed.valid, parse_error=parsed.error)

    def step_action(self, action: str, action_valid: bool = True, parse_error: str | None = None) -> StepResult:
        """Executes an already-projected action (used by ``step``, gold and random policies)."""
        self._check_open()
        episode = self._episode
        if episode is None or episode["done"]:
            raise RuntimeError("step called before reset() or after the episode ended")
        state, _, _ = self._engine.step(action)
        episode["steps"] += 1
        won = bool(state["won"])
        lost = bool(state["lost"]) and not won
        truncated = not (won or lost) and episode["steps"] >= self.max_steps
        done = won or lost or truncated
        episode["done"] = done
        game = episode["game"]
        info = {
            "split": self.split,
            "task_id": episode["task_id"],
            "game": game.name,
            "action": action,
            "steps": episode["steps"],
            "truncated": truncated,
            "error": parse_error,
        }
        return StepResult(
            observation=self._observation(str(state["feedback"]), state),
            reward=self.reward_scale * float(won),
            done=done,
            won=won,
            action_valid=action_valid,
            info=info,
            task_type=game.task_type,
        )

    def gold_actions(self) -> tuple[str, ...]:
        """The game's expert walkthrough (from the episode start)."""
        if self._episode is None:
            raise RuntimeError("gold_actions() needs an episode: call reset() first")
        return self._episode["gold"]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def _observation(self, text: str, state: Mapping[str, Any]) -> Observation:
        actions = tuple(a for a in state["admissible_commands"] if a not in HIDDEN_COMMANDS)
        return Observation(text=text, task=self._episode["task"], admissible_actions=actions)

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this ALFWorldEnv was closed")
