"""Per-group reward statistics over trajectories, in numpy (host side).

The one place that turns row rewards into group statistics for the low-variance group filter
(``filters.low_variance_group_filter``), the replay buffer's reward-baseline history
(``replay.ReplayBuffer``) and the per-step reward metrics.

A *group* is the set of rows sharing a group id (the prompt / task ``uid``); a *trajectory* is
the set of rows sharing a (group id, trajectory id) pair (one episode: with step rows an
episode has several rows, with trajectory rows exactly one). For a group g with trajectories
j = 1..n_g whose rows carry rewards R:

    traj_mean_j = mean of R over the rows of trajectory j
    mean_g      = (1 / n_g) * sum_j traj_mean_j
    std_g       = sqrt( sum_j (traj_mean_j - mean_g)^2 / (n_g - ddof) )

``ddof=0`` is the population std (agent rollout filter and agent baseline history), ``ddof=1``
the unbiased std (math filter and math baseline history). A group with a single trajectory has
std 0 under either convention (the unbiased estimate is undefined there; 0 keeps sorting and
percentiles finite).

Grouping is by id value, so it is robust to row order. The reference math trainer instead
reshapes the batch positionally into ``[num_groups, group_size]`` after rows were reordered,
which mixes prompts; ``positional_group_ids`` reproduces that (named option ``"positional"`` of
``resolve_group_ids``) for faithful comparisons only.
"""
from __future__ import annotations

import dataclasses

import numpy as np

GROUPINGS = ("uid", "positional")


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Statistics of G groups found in a batch of B rows.

    Attributes:
      group_keys: [G] the distinct group ids, sorted.
      row_group: [B] int64 index into ``group_keys`` of each row's group.
      means: [G] float64 mean over trajectories of the per-trajectory mean reward.
      stds: [G] float64 std over trajectories (convention ``ddof``).
      num_trajectories: [G] int64 trajectories per group.
      num_rows: [G] int64 rows per group.
      ddof: the std convention used.
    """

    group_keys: np.ndarray
    row_group: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    num_trajectories: np.ndarray
    num_rows: np.ndarray
    ddof: int

    @property
    def num_groups(self) -> int:
        return int(self.group_keys.shape[0])


def positional_group_ids(num_rows: int, group_size: int) -> np.ndarray:
    """Group ids of the reference math trainer's ``view(-1, group_size)``: row i -> i // size."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if num_rows % group_size:
        raise ValueError(f"num_rows={num_rows} is not a multiple of group_size={group_size}")
    return np.arange(num_rows, dtype=np.int64) // group_size


def resolve_group_ids(group_ids: np.ndarray, grouping: str, group_size: int | None = None) -> np.ndarray:
    """Group ids to use: the given ids (``"uid"``, default) or positional ones (faithful math)."""
    if grouping == "uid":
        return group_ids
    if grouping == "positional":
        if group_size is None:
            raise ValueError("grouping='positional' needs group_size")
        return positional_group_ids(len(group_ids), group_size)
    raise ValueError(f"unknown grouping {grouping!r}; expected one of {GROUPINGS}")


def _check_1d(name: str, array: np.ndarray, num_rows: int | None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {array.shape}")
    if num_rows is not None and array.shape[0] != num_rows:
        raise ValueError(f"{name} has {array.shape[0]} rows, expected {num_rows}")
    return array


def group_trajectory_stats(
    scores: np.ndarray,
    group_ids: np.ndarray,
    traj_ids: np.ndarray | None = None,
    ddof: int = 0,
) -> GroupStats:
    """Per-group mean / std of per-trajectory mean rewards (see module docstring).

    Args:
      scores: [B] row rewards (float).
      group_ids: [B] group id of each row (any sortable dtype, usually int).
      traj_ids: [B] trajectory id of each row, or None when every row is its own trajectory.
      ddof: 0 (population std) or 1 (unbiased std).
    """
    scores = _check_1d("scores", scores, None)
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}")
    num_rows = scores.shape[0]
    group_ids = _check_1d("group_ids", group_ids, num_rows)
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof}")
    scores = scores.astype(np.float64)
    group_keys, row_group = np.unique(group_ids, return_inverse=True)
    row_group = row_group.astype(np.int64).reshape(-1)
    num_groups = group_keys.shape[0]
    if traj_ids is None:
        row_traj = np.arange(num_rows, dtype=np.int64)
    else:
        traj_ids = _check_1d("traj_ids", traj_ids, num_rows)
        _, traj_local = np.unique(traj_ids, return_inverse=True)
        pair = row_group * (int(traj_local.max(initial=0)) + 1) + traj_local.reshape(-1)
        _, row_traj = np.unique(pair, return_inverse=True)
        row_traj = row_traj.astype(np.int64).reshape(-1)
    num_trajs = int(row_traj.max(initial=-1)) + 1
    rows_per_traj = np.bincount(row_traj, minlength=num_trajs)
    traj_mean = np.bincount(row_traj, weights=scores, minlength=num_trajs) / np.maximum(rows_per_traj, 1)
    traj_group = np.zeros(num_trajs, dtype=np.int64)
    traj_group[row_traj] = row_group
    trajs_per_group = np.bincount(traj_group, minlength=num_groups)
    means = np.bincount(traj_group, weights=traj_mean, minlength=num_groups) / np.maximum(trajs_per_group, 1)
    sq_dev = (traj_mean - means[traj_group]) ** 2
    denom = trajs_per_group - ddof
    sums = np.bincount(traj_group, weights=sq_dev, minlength=num_groups)
    stds = np.sqrt(np.divide(sums, denom, out=np.zeros(num_groups), where=denom > 0))
    return GroupStats(
        group_keys=group_keys,
        row_group=row_group,
        means=means,
        stds=stds,
        num_trajectories=trajs_per_group.astype(np.int64),
        num_rows=np.bincount(row_group, minlength=num_groups).astype(np.int64),
        ddof=ddof,
    )


def group_reward_metrics(stats: GroupStats, prefix: str = "reward_groups/") -> dict[str, float]:
    """Scalar metrics of a batch's groups: count, zero-variance fraction, mean/std summaries."""
    if stats.num_groups == 0:
        return {f"{prefix}num_groups": 0.0}
    return {
        f"{prefix}num_groups": float(stats.num_groups),
        f"{prefix}frac_zero_std": float(np.mean(stats.stds == 0.0)),
        f"{prefix}mean_of_means": float(np.mean(stats.means)),
        f"{prefix}mean_of_stds": float(np.mean(stats.stds)),
        f"{prefix}max_std": float(np.max(stats.stds)),
        f"{prefix}mean_trajectories": float(np.mean(stats.num_trajectories)),
        f"{prefix}mean_rows": float(np.mean(stats.num_rows)),
    }
