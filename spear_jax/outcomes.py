"""Episode outcomes of a rollout: success, return, length, tool calls, success per task type.

One summary serves the rollout's own metrics, the training step's and the evaluation's (each
names the values its own way). Episodes whose environment failed are left out; per-trajectory
values (tool calls, success per task type) are read from each trajectory's last row, which
carries the episode's outcome.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Outcomes:
    """Means over the completed episodes (``episodes`` of them) and their trajectories.

    ``success_by_type`` maps each task type (in order of first appearance) to its success rate;
    ``tool_calls`` is None when no trajectory has a row.
    """

    episodes: int
    success_rate: float
    episode_return: float
    episode_length: float
    truncated_fraction: float
    tool_calls: float | None
    success_by_type: dict[str, float]


def last_rows(rows: Sequence) -> list:
    """The last row of each trajectory, in order of the trajectories' first rows."""
    by_traj = {}
    for row in rows:
        by_traj[row.traj_id] = row
    return list(by_traj.values())


def summarize(episodes: Sequence, rows: Sequence) -> Outcomes | None:
    """The outcomes of ``episodes`` (``rollout.EpisodeSummary``) and their ``rows``
    (``rollout.Row``); None when every episode failed."""
    completed = [e for e in episodes if e.error is None]
    if not completed:
        return None
    finals = last_rows(rows)
    by_type: dict[str, list[bool]] = {}
    for row in finals:
        by_type.setdefault(row.task_type, []).append(row.won)
    return Outcomes(
        episodes=len(completed),
        success_rate=float(np.mean([e.won for e in completed])),
        episode_return=float(np.mean([e.episode_return for e in completed])),
        episode_length=float(np.mean([e.length for e in completed])),
        truncated_fraction=float(np.mean([e.truncated for e in completed])),
        tool_calls=float(np.mean([r.num_tool_calls for r in finals])) if finals else None,
        success_by_type={name: float(np.mean(wins)) for name, wins in by_type.items()},
    )


def outcome_metrics(episodes: Sequence, rows: Sequence) -> dict[str, float]:
    """The training step's and the evaluation's outcome metrics: ``success_rate``,
    ``episode_return``, ``episode_length``, ``episodes``, ``tool_calls`` and ``success/<task
    type>`` (``success/all`` for rows without a type); ``{"episodes": 0}`` if every episode
    failed."""
    outcomes = summarize(episodes, rows)
    if outcomes is None:
        return {"episodes": 0.0}
    metrics = {"success_rate": outcomes.success_rate, "episode_return": outcomes.episode_return,
               "episode_length": outcomes.episode_length, "episodes": float(outcomes.episodes)}
    if outcomes.tool_calls is not None:
        metrics["tool_calls"] = outcomes.tool_calls
    for name, rate in outcomes.success_by_type.items():
        metrics[f"success/{name or 'all'}"] = rate
    return metrics
