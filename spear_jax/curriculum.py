"""Step-dependent coefficients of SPEAR: the tool-call reward decay and the SIL weight ascent.

All functions are pure functions of the training step ``t`` (``global_steps``, starting at 1;
0 is accepted) and vectorise over numpy arrays (scalars in, Python floats out).

Tool-call reward factor (cosine *descending*, T = ``max_toolcall_steps``):

    kappa(t) = (cos(pi * t / T) + 1) / 2   if t <= T      ("cosine")
             = 0                           if t >  T
    kappa(t) = 1                                          ("constant")
    kappa(t) = 0                                          ("none")

    kappa(0) = 1, kappa(T/2) = 0.5, kappa(T) = 0.

SIL (replay) loss weight (cosine *ascending*, T = ``max_replay_loss_steps``):

    lambda(t) = coef * (1 - cos(pi * t / T)) / 2   if t <= T
              = coef                               if t >  T

    T = 100, coef = 1: lambda(1) ~ 2.467e-4, lambda(50) = 0.5, lambda(100) = lambda(150) = 1.

Intrinsic tool-call rewards (added to on-policy rewards only; the shaped reward is what enters
advantages, filters, the baseline history and the replay buffer):

* agent: ``bonus = clip(0.1 * episode_length, 0, 1) * kappa(t)``, added to every step-row of
  the episode, successful or not;
* math, Qwen2.5 recipe: ``score = verifier (+-1) + min(0.1 * n_tc, 1) * kappa(t)``;
* math, Qwen3 recipe: wrong (verifier <= 0) -> ``verifier + min(0.1 * n_tc, 1) * kappa(t)``,
  correct -> ``verifier + 1[n_tc > 0] * kappa(t)``;

where ``n_tc`` is the number of assistant turns that issued a tool call.

The trainer computes a step's values once, at the top of the step (``step_schedule``: kappa(t),
lambda(t) and the learning rate lr(t - 1)), and hands them down as values.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

TOOLCALL_REWARD_MODES = ("none", "constant", "cosine")
MATH_RECIPES = ("qwen2.5", "qwen3")
BONUS_PER_TOOL_CALL = 0.1
MAX_BONUS = 1.0


def _as_float_result(value: np.ndarray, scalar: bool):
    return float(value) if scalar else value


def _check_steps(step, name: str = "step") -> tuple[np.ndarray, bool]:
    array = np.asarray(step, dtype=np.float64)
    if np.any(~np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {step}")
    return array, array.ndim == 0


def _check_horizon(max_steps, name: str) -> float:
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {max_steps!r}")
    return float(max_steps)


def check_toolcall_reward_mode(mode: str) -> str:
    """Returns ``mode`` if it is a known tool-call reward mode, else raises ValueError."""
    if mode not in TOOLCALL_REWARD_MODES:
        raise ValueError(
            f"unknown toolcall reward mode {mode!r}; expected one of {TOOLCALL_REWARD_MODES}"
        )
    return mode


def toolcall_reward_factor(step, mode: str, max_toolcall_steps: int):
    """kappa(t): the decaying weight of the intrinsic tool-call reward (module docstring)."""
    check_toolcall_reward_mode(mode)
    horizon = _check_horizon(max_toolcall_steps, "max_toolcall_steps")
    t, scalar = _check_steps(step)
    if mode == "none":
        kappa = np.zeros_like(t)
    elif mode == "constant":
        kappa = np.ones_like(t)
    else:
        kappa = np.where(t <= horizon, (np.cos(np.pi * t / horizon) + 1.0) / 2.0, 0.0)
    return _as_float_result(kappa, scalar)


def sil_loss_weight(step, replay_loss_coef: float, max_replay_loss_steps: int):
    """lambda(t): the weight of the replay (SIL) loss, rising from 0 to ``replay_loss_coef``."""
    horizon = _check_horizon(max_replay_loss_steps, "max_replay_loss_steps")
    if not np.isfinite(replay_loss_coef):
        raise ValueError(f"replay_loss_coef must be finite, got {replay_loss_coef}")
    t, scalar = _check_steps(step)
    weight = np.where(
        t <= horizon, replay_loss_coef * (1.0 - np.cos(np.pi * t / horizon)) / 2.0, replay_loss_coef
    )
    return _as_float_result(weight, scalar)


def _check_counts(counts, name: str) -> np.ndarray:
    array = np.asarray(counts)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"{name} must be numeric, got dtype {array.dtype}")
    if np.any(array < 0):
        raise ValueError(f"{name} must be >= 0")
    return array.astype(np.float64)


def agent_toolcall_bonus(episode_length, kappa: float):
    """Agent bonus ``clip(0.1 * episode_length, 0, 1) * kappa`` (every env step is a call).

    Args:
      episode_length: [...] environment steps the episode took.
      kappa: the step's tool-call factor kappa(t) (``toolcall_reward_factor``).
    """
    lengths = _check_counts(episode_length, "episode_length")
    bonus = np.clip(BONUS_PER_TOOL_CALL * lengths, 0.0, MAX_BONUS) * kappa
    return _as_float_result(bonus, np.ndim(bonus) == 0)


def math_toolcall_score(verifier_score, num_tool_calls, kappa: float, recipe: str = "qwen2.5"):
    """Shaped math reward: verifier score plus the recipe's tool-call bonus (module docstring).

    Args:
      verifier_score: [...] +1 (correct) / -1 (wrong) from the boxed-answer verifier.
      num_tool_calls: [...] assistant turns that issued a tool call.
      kappa: the step's tool-call factor kappa(t) (``toolcall_reward_factor``).
      recipe: "qwen2.5" (bonus for all answers) or "qwen3" (flat kappa for correct tool users).
    """
    if recipe not in MATH_RECIPES:
        raise ValueError(f"unknown math recipe {recipe!r}; expected one of {MATH_RECIPES}")
    verifier = np.asarray(verifier_score, dtype=np.float64)
    calls = _check_counts(num_tool_calls, "num_tool_calls")
    graded_bonus = np.minimum(BONUS_PER_TOOL_CALL * calls, MAX_BONUS) * kappa
    if recipe == "qwen2.5":
        score = verifier + graded_bonus
    else:
        flat_bonus = (calls > 0).astype(np.float64) * kappa
        score = verifier + np.where(verifier <= 0, graded_bonus, flat_bonus)
    return _as_float_result(score, np.ndim(score) == 0)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """What a step's schedule values depend on besides the step.

    Attributes:
      toolcall_mode, max_toolcall_steps: kappa(t) (``toolcall_reward_factor``).
      replay_loss_coef, max_replay_loss_steps: lambda(t) (``sil_loss_weight``); a coefficient of
        None (no replay buffer) gives lambda(t) = 0.
      learning_rate: lr(s) of the optimizer's schedule; step t trains at lr(t - 1).
    """

    toolcall_mode: str
    max_toolcall_steps: int
    replay_loss_coef: float | None
    max_replay_loss_steps: int
    learning_rate: Callable[[int], float]


@dataclasses.dataclass(frozen=True)
class StepSchedule:
    """The step-dependent values of training step ``step``, computed once per step."""

    step: int
    toolcall_factor: float  # kappa(t)
    sil_weight: float  # lambda(t), 0 without replay
    learning_rate: float  # lr(t - 1)


def step_schedule(step: int, config: ScheduleConfig) -> StepSchedule:
    """kappa(t), lambda(t) and lr(t - 1) of training step ``step``."""
    sil_weight = (0.0 if config.replay_loss_coef is None else
                  float(sil_loss_weight(step, config.replay_loss_coef, config.max_replay_loss_steps)))
    return StepSchedule(
        step=step,
        toolcall_factor=float(toolcall_reward_factor(step, config.toolcall_mode, config.max_toolcall_steps)),
        sil_weight=sil_weight,
        learning_rate=float(config.learning_rate(step - 1)),
    )
