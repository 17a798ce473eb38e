"""TextWorldExpress (TWX) games as agent environments.

TWX (``textworld_express`` 1.1.0, a Java simulator driven over py4j) generates eight procedural
text games; each game has three disjoint seed folds (``train``, ``dev``, ``test``; 1000 seeds
each in TWX 1.1.0), an admissible-action list at every step and a gold action sequence.
``twc`` (put household objects away) and ``cookingworld`` (find ingredients, cook, eat) are the
ALFWorld-like household tasks; the others (``coin``, ``mapreader``, ``arithmetic``, ``sorting``,
``simonsays``, ``peckingorder``) are smaller skill games.

Episode semantics (same as the ALFWorld domain):

* ``reset(task_id)`` plays the ``task_id``-th seed of the fold (``0 <= task_id < len(fold)``);
  ``reset(seed=s)`` draws a task uniformly from the fold with ``numpy.random.default_rng(s)``;
  ``reset()`` draws from the env's own generator (seeded by the constructor's ``seed``).
* ``step(text)`` projects the response with ``parse_react_action`` and executes the projected
  action even when the response was malformed (the game answers "Unknown action ..."); only
  ``action_valid`` records the malformation. The projection lower-cases the response (ALFWorld's
  actions are all lower case) while a few TWX actions are not (``take dirty green T-shirt``), and
  TWX matches actions case-sensitively; so an action equal to an admissible action up to case
  is executed in the admissible spelling.
* reward = ``reward_scale * won`` on the winning step, else 0 (the paper's ``10 * won`` with the
  default ``reward_scale=10``). TWX's own partial score (0..1) is reported as
  ``info["task_score"]``.
* done = won, or the game declared failure (e.g. a wrong move in ``simonsays``), or
  ``max_steps`` steps were taken (``info["truncated"]``).

One JVM serves every env of a process: each env owns its own simulator object
(``PythonInterface``) inside the shared JVM, so 16-64 envs in lockstep cost one JVM start
(about 1 s) and one JVM's memory; the simulator objects are independent (tested).

Game parameters (``game_params``) are passed to TWX verbatim after validation, e.g. for a tiny
household task ``{"numLocations": 1, "numItemsToPutAway": 1}`` (twc) or ``{"numLocations": 1,
"numIngredients": 1, "numDistractorItems": 0, "includeDoors": 0}`` (cookingworld); see
``SMALL_GAME_PARAMS``. Unknown parameter names and out-of-range values are rejected by TWX
with a message listing the known names; this module re-raises it naming ``game_params``.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import shutil
import threading
from typing import Any, Mapping

import numpy as np

from environments.base import IndexedTasks, Observation, StepResult, choose_task_index
from environments.prompts import AgentPromptStyle
from environments.react import parse_react_action

GAMES = (
    "twc", "cookingworld", "coin", "mapreader", "arithmetic", "sorting", "simonsays",
    "peckingorder",
)
HOUSEHOLD_GAMES = ("twc", "cookingworld")
SPLITS = ("train", "dev", "test")
DEFAULT_MAX_STEPS = 50
DEFAULT_REWARD_SCALE = 10.0
# Longer actions are never admissible; cutting them keeps a runaway response from being shipped
# to the JVM. Lone UTF-16 surrogates (which py4j cannot encode) are replaced by "?".
MAX_ACTION_CHARS = 1000

SMALL_GAME_PARAMS: Mapping[str, Mapping[str, int]] = {
    "twc": {"numLocations": 1, "numItemsToPutAway": 1},
    "cookingworld": {
        "numLocations": 1, "numIngredients": 1, "numDistractorItems": 0, "includeDoors": 0,
    },
    "coin": {"numLocations": 2, "numDistractorItems": 0, "includeDoors": 0},
}


def prompt_style(game: str) -> AgentPromptStyle:
    """The prompt intro for a TWX game (the first observation does not state the task)."""
    return AgentPromptStyle(
        intro=f"You are an expert agent playing the text game '{game}' of TextWorldExpress.",
        task_in_first_observation=False,
    )


def sanitize_action(action: str) -> str:
    """Makes any projected action safe to send to the JVM (see ``MAX_ACTION_CHARS``)."""
    action = action[:MAX_ACTION_CHARS]
    return action.encode("utf-8", "replace").decode("utf-8")


def format_game_params(game_params: Mapping[str, int | bool] | None) -> str:
    """``{"numLocations": 2, "includeDoors": False}`` -> ``"numLocations=2,includeDoors=0"``."""
    if game_params is None:
        return ""
    if not isinstance(game_params, Mapping):
        raise TypeError(f"game_params must be a mapping name -> int, got {type(game_params).__name__}")
    parts = []
    for key, value in game_params.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"game_params key {key!r} is not a parameter name")
        if isinstance(value, (bool, np.bool_)):
            value = int(value)
        if not isinstance(value, (int, np.integer)):
            raise ValueError(f"game_params[{key!r}] must be an int (or bool), got {value!r}")
        parts.append(f"{key}={int(value)}")
    return ",".join(parts)


class TextWorldExpressJVM:
    """One Java process running the TWX simulator; hands out independent simulator objects."""

    def __init__(self):
        if shutil.which("java") is None:
            raise RuntimeError(
                "TextWorldExpress needs a Java runtime (>= 11) on PATH; install one "
                "(e.g. apt-get install openjdk-17-jre-headless)"
            )
        from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
        from textworld_express.constants import BASEPATH, JAR_PATH

        port, process = launch_gateway(
            classpath=JAR_PATH, die_on_exit=True, cwd=BASEPATH, javaopts=["-Xverify:none"],
            return_proc=True,
        )
        self._gateway = JavaGateway(
            gateway_parameters=GatewayParameters(auto_field=True, port=port), java_process=process
        )
        self._closed = False

    def new_simulator(self):
        """A fresh ``textworldexpress.runtime.PythonInterface`` living in this JVM."""
        if self._closed:
            raise RuntimeError("this TextWorldExpressJVM was closed")
        return self._gateway.jvm.textworldexpress.runtime.PythonInterface()

    def running(self) -> bool:
        """Whether the Java process is still alive (Ctrl-C in a terminal reaches it too)."""
        process = self._gateway.java_process
        return process is None or process.poll() is None

    def release(self, simulator) -> None:
        """Lets the JVM garbage-collect a simulator that is no longer used. Nothing is sent to a
        JVM that has exited, and a JVM exiting meanwhile only makes the release a no-op (py4j's
        connection-error log is muted: its garbage collection is best effort anyway)."""
        if self._closed or not self.running():
            return
        with _py4j_errors_muted():
            self._gateway.detach(simulator)

    def close(self) -> None:
        """Shuts the JVM down; with a JVM that already exited, only closes the connections."""
        if self._closed:
            return
        self._closed = True
        if not self.running():
            self._gateway.close()
            return
        process = self._gateway.java_process
        with _py4j_errors_muted():
            self._gateway.shutdown()
        if process is not None and process.poll() is None:
            with contextlib.suppress(BrokenPipeError):  # the JVM exited meanwhile
                process.stdin.write(b"\n")  # py4j's launched JVM exits when its stdin says so
                process.stdin.flush()
            process.wait(timeout=10)


@contextlib.contextmanager
def _py4j_errors_muted():
    """Silences py4j's error log (a traceback per failed connection) inside the block."""
    logger = logging.getLogger("py4j")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


_shared_jvm: TextWorldExpressJVM | None = None
_shared_jvm_lock = threading.Lock()


def shared_jvm() -> TextWorldExpressJVM:
    """The process-wide JVM, started on first use and shut down at interpreter exit."""
    global _shared_jvm
    with _shared_jvm_lock:
        if _shared_jvm is None:
            _shared_jvm = TextWorldExpressJVM()
            atexit.register(_shared_jvm.close)
        return _shared_jvm


class TextWorldExpressEnv(IndexedTasks):
    """One TWX game on one seed fold; implements ``environments.base.Env``.

    Args:
      game: one of ``GAMES``.
      split: seed fold, one of ``SPLITS``.
      game_params: TWX generation parameters (see module docstring); None for TWX defaults.
      max_steps: step limit per episode (default 50, as ALFWorld).
      reward_scale: reward paid on the winning step (default 10: reward = 10 * won).
      seed: seeds the generator used by ``reset()`` without arguments.
      generate_gold: ask TWX for the gold action sequence at every reset (``gold_actions``).
      jvm: the JVM to run in; default the process-wide shared one.
    """

    name = "textworld_express"
    domain = "agent"

    def __init__(
        self,
        game: str = "twc",
        split: str = "train",
        game_params: Mapping[str, int | bool] | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        reward_scale: float = DEFAULT_REWARD_SCALE,
        seed: int = 0,
        generate_gold: bool = True,
        jvm: TextWorldExpressJVM | None = None,
    ):
        if game not in GAMES:
            raise ValueError(f"unknown TextWorldExpress game {game!r}; choose one of {GAMES}")
        if split not in SPLITS:
            raise ValueError(f"unknown TextWorldExpress split {split!r}; choose one of {SPLITS}")
        if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        params_text = format_game_params(game_params)
        self.game = game
        self.split = split
        self.game_params = dict(game_params or {})
        self.max_steps = int(max_steps)
        self.reward_scale = float(reward_scale)
        self.generate_gold = generate_gold
        self.prompt_style = prompt_style(game)
        self._rng = np.random.default_rng(seed)
        self._jvm = jvm or shared_jvm()
        self._sim = self._jvm.new_simulator()
        error = self._sim.load(game, params_text)
        if error:
            raise ValueError(f"game_params {self.game_params} rejected for game {game!r}: {error.strip()}")
        fold_getter = {
            "train": self._sim.getSeedsTrain, "dev": self._sim.getSeedsDev,
            "test": self._sim.getSeedsTest,
        }[split]
        self.fold_seeds: tuple[int, ...] = tuple(int(s) for s in fold_getter())  # TWX seeds of the fold
        self._closed = False
        self._episode: dict[str, Any] | None = None

    # -- task selection ---------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        """Number of tasks (seeds) in this fold."""
        return len(self.fold_seeds)

    # -- Env protocol -----------------------------------------------------------------------

    def reset(self, task_id: int | None = None, seed: int | None = None) -> Observation:
        self._check_open()
        index = choose_task_index(task_id, seed, self.num_tasks, self._rng, f"{self.game}/{self.split}")
        game_seed = self.fold_seeds[index]
        state = json.loads(self._sim.generateNewGameJSON(game_seed, self.split, self.generate_gold))
        properties = json.loads(self._sim.getGenerationPropertiesJSON())
        if not properties:
            raise RuntimeError(f"TextWorldExpress did not generate {self.game} seed {game_seed}")
        self._episode = {
            "task_id": index,
            "game_seed": game_seed,
            "task": str(self._sim.getTaskDescription()),
            "steps": 0,
            "done": False,
            "gold": tuple(self._sim.getGoldActionSequence()) if self.generate_gold else None,
            "properties": properties,
            "admissible_by_lower": {},
        }
        return self._observation(state)

    def step(self, response_text: str) -> StepResult:
        parsed = parse_react_action(response_text)
        return self.step_action(parsed.action, action_valid=parsed.valid, parse_error=parsed.error)

    def step_action(self, action: str, action_valid: bool = True, parse_error: str | None = None) -> StepResult:
        """Executes an already-projected action (used by ``step``, gold and random policies)."""
        self._check_open()
        episode = self._episode
        if episode is None or episode["done"]:
            raise RuntimeError("step_action() called before reset() or after the episode ended")
        action = episode["admissible_by_lower"].get(action.lower(), action)
        state = json.loads(self._sim.stepJSON(sanitize_action(action)))
        episode["steps"] += 1
        won = bool(state["tasksuccess"])
        lost = bool(state["taskfailure"]) and not won
        truncated = not (won or lost) and episode["steps"] >= self.max_steps
        done = won or lost or truncated
        episode["done"] = done
        info = {
            "game": self.game,
            "split": self.split,
            "task_id": episode["task_id"],
            "game_seed": episode["game_seed"],
            "task_score": float(state["score"]),
            "action": action,
            "steps": episode["steps"],
            "truncated": truncated,
            "task_failed": lost,
            "error": parse_error,
        }
        return StepResult(
            observation=self._observation(state),
            reward=self.reward_scale * float(won),
            done=done,
            won=won,
            action_valid=action_valid,
            info=info,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._jvm.release(self._sim)
            self._sim = None

    # -- extras -----------------------------------------------------------------------------

    def gold_actions(self) -> tuple[str, ...]:
        """TWX's gold action sequence for the current episode (from its start).

        Following it wins the game, possibly before its last action (twc's ends with a move
        after the win). The game of a seed is deterministic but TWX's gold path for it is not:
        exploration games (coin, cookingworld, ...) get a different winning path at each reset.
        """
        if self._episode is None:
            raise RuntimeError("gold_actions() needs an episode: call reset() first")
        if self._episode["gold"] is None:
            raise RuntimeError("gold actions were not generated: construct with generate_gold=True")
        return self._episode["gold"]

    def generation_properties(self) -> dict[str, int]:
        """The parameters TWX used for the current episode (incl. defaults and the seed)."""
        if self._episode is None:
            raise RuntimeError("generation_properties() needs an episode: call reset() first")
        return dict(self._episode["properties"])

    def _observation(self, state: Mapping[str, Any]) -> Observation:
        actions = tuple(sorted(str(a) for a in state["validActions"]))
        self._episode["admissible_by_lower"] = {a.lower(): a for a in actions}
        return Observation(text=str(state["observation"]), task=self._episode["task"], admissible_actions=actions)

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this TextWorldExpressEnv was closed")
