"""Group-relative advantage estimators (GRPO, RLOO, GiGPO), selected by name.

Rows are the training rows of a batch: one row per trajectory (math layout) or one row per
environment step (agent layout, many rows per trajectory). Groups are the rollouts of one
prompt/task (the reference's ``uid``), given as dense integer ids in ``[0, num_groups)`` with a
static ``num_groups``; all group statistics are segment reductions (no Python loop over groups),
so every estimator is jit-able and shape-static.

Statistics scope (``AdvantageConfig.stats_over``):

* ``"rows"`` (reference agent default, ``compute_mean_std_cross_all_data=True``): every valid row
  is one sample of its group, so a trajectory with 40 step rows counts 40 times.
* ``"trajectories"``: one sample per trajectory, the mean of its rows' scores. Requires
  ``traj_ids``.
* ``"trajectories_first_row"`` (reference, ``compute_mean_std_cross_all_data=False``): one sample
  per trajectory, the score of its first valid row in batch order. Requires ``traj_ids``.

Rows of one trajectory differ only by the per-step invalid-action penalty, so the two trajectory
rules differ only when a trajectory has an invalid action: the mean counts every step's penalty
once per trajectory, the first row only the first step's (and which step comes first depends on
the row order: the reference reorders rows for sequence-length balancing before this step).

Estimators (``s_i`` = row score, ``g`` = its group, ``n_g`` = number of samples in ``g``):

* ``grpo``: ``A_i = (s_i - mean_g) / (std_g + eps)`` with unbiased std (ddof=1), or
  ``A_i = s_i - mean_g`` when ``normalize_by_std=False`` (Dr.BoT). A singleton group
  (``n_g == 1``) uses mean 0 and std 1, so its advantage is the raw score (reference rule).
* ``rloo``: ``A_i = s_i - (sum_g - v_i) / (n_g - 1)``, the mean of the *other* samples of the group
  (``v_i`` = the sample the row belongs to: its own score, or its trajectory's value under ``stats_over``). A singleton
  group has baseline 0 (advantage = raw score), mirroring the GRPO rule. No std normalisation.
* ``gigpo``: ``A_i = A_episode_i + w * A_step_i``; the episode part is ``grpo`` above and the step
  part compares discounted step returns ``G_t = r_t + gamma * G_{t+1}`` (within a trajectory) among
  rows with an identical anchor observation in the same group (a *step group*, ids computed on the
  host with :func:`step_group_ids_from_anchors`): ``A_step = (G - mean_sg) [/ (std_sg + eps)]``;
  a singleton step group has step advantage 0. Both parts are std-normalised iff
  ``normalize_by_std`` (the reference's ``mean_std_norm`` vs ``mean_norm`` modes).

More estimators are added by registration (``register_advantage_estimator``): an entry declares
the extra per-row inputs it reads and how its options come from the run config, so the trainer
computes just those inputs and has no per-estimator code (docs/training.md shows the recipe).

Padding rows (``row_valid == False``) and rows with an id outside its range are excluded from
every statistic and get advantage 0.
Every estimator returns ``(advantages [N], metrics)``; metrics include the fraction of groups with
zero reward variance, the group-size range and the number of valid rows whose id lies outside
``[0, num_groups)`` (such rows are left out of the statistics), so a wrong grouping id is visible.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spear_jax.objectives import _checks
from spear_jax.objectives._sharding import replicate_if_explicit


class GroupedRewards(NamedTuple):
    """Per-row inputs of the advantage estimators (a pytree; absent fields are ``None``)."""

    scores: jax.Array  # [N] float: scalar reward of each row (sum of its token-level rewards)
    group_ids: jax.Array  # [N] int in [0, num_groups): the row's prompt/task group (uid)
    row_valid: jax.Array | None = None  # [N] bool: False marks padding rows
    traj_ids: jax.Array | None = None  # [N] int in [0, num_trajectories): the row's trajectory
    step_index: jax.Array | None = None  # [N] int: position of the row inside its trajectory
    step_rewards: jax.Array | None = None  # [N] float: per-step environment reward r_t (GiGPO)
    step_group_ids: jax.Array | None = None  # [N] int in [0, num_step_groups): (uid, anchor obs)
    step_return_offsets: jax.Array | None = None  # [N] float added to G_t (e.g. -0.1 invalid action)
    extra: dict[str, jax.Array] | None = None  # [N] inputs a registered estimator declares by other names


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """Static options of the advantage estimators (validated at construction)."""

    estimator: str = "grpo"
    num_groups: int = 1
    normalize_by_std: bool = True
    eps: float = 1e-6
    stats_over: str = "rows"
    num_trajectories: int | None = None
    expected_group_size: int | None = None
    gamma: float = 0.95
    step_advantage_weight: float = 1.0
    num_step_groups: int | None = None  # GiGPO; None: one per row (N, the most there can be)

    def __post_init__(self):
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"estimator must be one of {sorted(ADVANTAGE_ESTIMATORS)}, got {self.estimator!r}"
            )
        _checks.check_positive_int("num_groups", self.num_groups)
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        _checks.check_choice("stats_over", self.stats_over, STATS_SCOPES)
        if self.stats_over != "rows" and self.num_trajectories is None:
            raise ValueError(f"num_trajectories must be set when stats_over={self.stats_over!r}")
        if self.num_trajectories is not None:
            _checks.check_positive_int("num_trajectories", self.num_trajectories)
        if self.expected_group_size is not None:
            _checks.check_positive_int("expected_group_size", self.expected_group_size)
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.num_step_groups is not None:
            _checks.check_positive_int("num_step_groups", self.num_step_groups)


STATS_SCOPES = ("rows", "trajectories", "trajectories_first_row")


# ------------------------------------------------------------------------------------------------
# Segment statistics


class _GroupStats(NamedTuple):
    count: jax.Array  # [G] number of valid samples
    total: jax.Array  # [G] sum of sample values
    mean: jax.Array  # [G] (0 for singletons and empty groups)
    std: jax.Array  # [G] unbiased std (1 for singletons and empty groups)
    value_min: jax.Array  # [G]
    value_max: jax.Array  # [G]


def _group_stats(values, segment_ids, valid, num_segments) -> _GroupStats:
    """Masked per-segment mean / unbiased std with the reference's singleton rule.

    values [S] float, segment_ids [S] int, valid [S] bool -> per-segment [num_segments] arrays.
    """
    w = valid.astype(jnp.float32)
    seg = jnp.where(valid, segment_ids, num_segments)  # invalid samples fall out of range
    count = jax.ops.segment_sum(w, seg, num_segments)
    total = jax.ops.segment_sum(values * w, seg, num_segments)
    plain_mean = total / jnp.maximum(count, 1.0)
    dev = (values - plain_mean[jnp.clip(seg, 0, num_segments - 1)]) * w
    sq = jax.ops.segment_sum(dev * dev, seg, num_segments)
    plain_std = jnp.sqrt(sq / jnp.maximum(count - 1.0, 1.0))
    multi = count > 1.0
    mean = jnp.where(multi, plain_mean, 0.0)
    std = jnp.where(multi, plain_std, 1.0)
    value_min = jax.ops.segment_min(jnp.where(valid, values, jnp.inf), seg, num_segments)
    value_max = jax.ops.segment_max(jnp.where(valid, values, -jnp.inf), seg, num_segments)
    return _GroupStats(count, total, mean, std, value_min, value_max)


class _Samples(NamedTuple):
    """The samples group statistics are taken over, and how rows map to them."""

    values: jax.Array  # [S]
    group: jax.Array  # [S] group id of each sample
    valid: jax.Array  # [S] bool
    of_row: jax.Array  # [N] index of each row's sample in [0, S)


def _samples(batch: GroupedRewards, config: AdvantageConfig, row_valid) -> _Samples:
    n = batch.scores.shape[0]
    if config.stats_over == "rows":
        return _Samples(batch.scores, batch.group_ids, row_valid, jnp.arange(n))
    num_traj = config.num_trajectories
    traj = jnp.where(row_valid, batch.traj_ids, num_traj)  # invalid rows fall out of range
    w = row_valid.astype(jnp.float32)
    rows_per_traj = jax.ops.segment_sum(w, traj, num_traj)
    if config.stats_over == "trajectories":
        traj_value = jax.ops.segment_sum(batch.scores * w, traj, num_traj) / jnp.maximum(rows_per_traj, 1.0)
    else:
        first_row = jax.ops.segment_min(jnp.arange(n), traj, num_traj)  # int max if no valid row
        traj_value = batch.scores[jnp.clip(first_row, 0, n - 1)]
    traj_group = jax.ops.segment_max(jnp.where(row_valid, batch.group_ids, -1), traj, num_traj)
    return _Samples(traj_value, traj_group, rows_per_traj > 0, jnp.clip(batch.traj_ids, 0, num_traj - 1))


def _group_metrics(stats: _GroupStats, expected_group_size: int | None, row_valid, usable):
    """Group-size and zero-variance metrics; valid rows that are not ``usable`` [N] had an id out of
    range."""
    nonempty = stats.count > 0
    multi = stats.count > 1
    zero_var = multi & (stats.value_max == stats.value_min)
    n_nonempty = jnp.maximum(jnp.sum(nonempty), 1)
    metrics = {
        "num_groups_nonempty": jnp.sum(nonempty),
        "group_size_min": jnp.min(jnp.where(nonempty, stats.count, jnp.inf)),
        "group_size_max": jnp.max(jnp.where(nonempty, stats.count, -jnp.inf)),
        "singleton_group_fraction": jnp.sum(stats.count == 1) / n_nonempty,
        "zero_variance_group_fraction": jnp.sum(zero_var) / jnp.maximum(jnp.sum(multi), 1),
        "num_rows_with_out_of_range_id": jnp.sum(row_valid & ~usable),
    }
    if expected_group_size is not None:
        wrong = nonempty & (stats.count != expected_group_size)
        metrics["group_size_mismatch_fraction"] = jnp.sum(wrong) / n_nonempty
    return metrics


# ------------------------------------------------------------------------------------------------
# Input checks


def _check_batch(batch: GroupedRewards, config: AdvantageConfig) -> jax.Array:
    """Validate ``batch`` for ``config``; returns row_valid [N] bool."""
    _checks.check_float("scores", batch.scores)
    _checks.check_rank("scores", batch.scores, 1)
    n = batch.scores.shape
    _checks.check_int("group_ids", batch.group_ids, n)
    if batch.row_valid is not None:
        _checks.check_mask("row_valid", batch.row_valid, n)
    needs_traj = config.stats_over != "rows" or config.estimator == "gigpo"
    if needs_traj and batch.traj_ids is None:
        raise ValueError(
            f"traj_ids is required (estimator={config.estimator!r}, stats_over={config.stats_over!r})"
        )
    if batch.traj_ids is not None:
        _checks.check_int("traj_ids", batch.traj_ids, n)
    if config.estimator == "gigpo":
        for name in ("step_index", "step_rewards", "step_group_ids"):
            if getattr(batch, name) is None:
                raise ValueError(f"{name} is required for estimator='gigpo'")
        _checks.check_int("step_index", batch.step_index, n)
        _checks.check_float("step_rewards", batch.step_rewards, n)
        _checks.check_int("step_group_ids", batch.step_group_ids, n)
        if batch.step_return_offsets is not None:
            _checks.check_float("step_return_offsets", batch.step_return_offsets, n)
    if batch.row_valid is None:
        return jnp.ones(n, bool)
    return batch.row_valid.astype(bool)


def _in_range(ids, bound):
    return (ids >= 0) & (ids < bound)


def _usable_rows(batch: GroupedRewards, config: AdvantageConfig, row_valid):
    """Valid rows whose group (and, for trajectory statistics, trajectory) id is in range."""
    usable = row_valid & _in_range(batch.group_ids, config.num_groups)
    if config.stats_over != "rows":
        usable = usable & _in_range(batch.traj_ids, config.num_trajectories)
    return usable


# ------------------------------------------------------------------------------------------------
# Estimators


class _Outcomes(NamedTuple):
    """A checked batch's outcome-level group statistics, shared by the estimators."""

    batch: GroupedRewards  # replicated when the rows were sharded explicitly
    row_valid: jax.Array  # [N] bool
    usable: jax.Array  # [N] bool: valid with in-range ids
    scores: jax.Array  # [N] float32
    samples: _Samples
    stats: _GroupStats  # over samples, per group
    group: jax.Array  # [N] each row's group id, clipped into range


def _outcomes(batch: GroupedRewards, config: AdvantageConfig) -> _Outcomes:
    row_valid = _check_batch(batch, config)
    batch, row_valid = replicate_if_explicit((batch, row_valid))  # rows are few: gather them
    usable = _usable_rows(batch, config, row_valid)
    scores = batch.scores.astype(jnp.float32)
    samples = _samples(batch._replace(scores=scores), config, usable)
    stats = _group_stats(samples.values, samples.group, samples.valid, config.num_groups)
    group = jnp.clip(batch.group_ids, 0, config.num_groups - 1)
    return _Outcomes(batch, row_valid, usable, scores, samples, stats, group)


def _grpo(o: _Outcomes, config: AdvantageConfig):
    centred = o.scores - o.stats.mean[o.group]
    adv = centred / (o.stats.std[o.group] + config.eps) if config.normalize_by_std else centred
    metrics = _group_metrics(o.stats, config.expected_group_size, o.row_valid, o.usable)
    return jnp.where(o.usable, adv, 0.0), metrics


def grpo_advantages(batch: GroupedRewards, config: AdvantageConfig):
    """GRPO outcome advantage ``A_i = (s_i - mean_g) / (std_g + eps)`` (or ``s_i - mean_g``).

    Returns (advantages [N] float32, metrics). See the module docstring for the singleton rule and
    the statistics scope.
    """
    return _grpo(_outcomes(batch, config), config)


def rloo_advantages(batch: GroupedRewards, config: AdvantageConfig):
    """RLOO advantage ``A_i = s_i - (sum_g - v_i) / (n_g - 1)``; singleton group: baseline 0.

    Returns (advantages [N] float32, metrics).
    """
    o = _outcomes(batch, config)
    count = o.stats.count[o.group]
    own = o.samples.values[o.samples.of_row]
    baseline = jnp.where(count > 1, (o.stats.total[o.group] - own) / jnp.maximum(count - 1.0, 1.0), 0.0)
    metrics = _group_metrics(o.stats, config.expected_group_size, o.row_valid, o.usable)
    return jnp.where(o.usable, o.scores - baseline, 0.0), metrics


def discounted_step_returns(step_rewards, traj_ids, step_index, gamma: float, row_valid=None):
    """``G_t = r_t + gamma * G_{t+1}`` inside each trajectory, in ``step_index`` order.

    Args:
      step_rewards: [N] float per-row environment reward r_t.
      traj_ids: [N] int trajectory of each row (any order of rows).
      step_index: [N] int position of the row inside its trajectory.
      gamma: discount in [0, 1].
      row_valid: optional [N] bool; invalid rows neither receive nor pass on return.

    The recurrence runs over the valid rows of a trajectory sorted by ``step_index`` (a dropped row
    is skipped, not treated as a zero reward). Returns [N] float32 (0 on invalid rows).
    """
    step_rewards, traj_ids, step_index, row_valid = replicate_if_explicit(
        (step_rewards, traj_ids, step_index, row_valid)
    )
    n = step_rewards.shape[0]
    valid = jnp.ones(n, bool) if row_valid is None else row_valid.astype(bool)
    traj_key = jnp.where(valid, traj_ids, jnp.iinfo(jnp.int32).max).astype(jnp.int32)
    order = jnp.lexsort((step_index, traj_key))
    r = jnp.where(valid, step_rewards, 0.0).astype(jnp.float32)[order]
    key_sorted = traj_key[order]
    valid_sorted = valid[order]
    continues = jnp.concatenate([(key_sorted[1:] == key_sorted[:-1]) & valid_sorted[1:], jnp.zeros(1, bool)])
    decay = jnp.where(continues, jnp.float32(gamma), 0.0)
    # Reverse scan of G_p = r_p + decay_p * G_{p+1}: flip, then a forward linear recurrence whose
    # elements (a, b) map G_prev -> b + a * G_prev and compose associatively.
    def compose(earlier, later):
        a1, b1 = earlier
        a2, b2 = later
        return a1 * a2, b2 + a2 * b1

    _, g_flipped = jax.lax.associative_scan(compose, (decay[::-1], r[::-1]))
    returns_sorted = g_flipped[::-1]
    returns = jnp.zeros(n, jnp.float32).at[order].set(returns_sorted)
    return jnp.where(valid, returns, 0.0)


def gigpo_advantages(batch: GroupedRewards, config: AdvantageConfig):
    """GiGPO ``A = A_episode + w * A_step`` (episode part = :func:`grpo_advantages`).

    ``A_step_i = (G_i - mean_sg) / (std_sg + eps)`` (or ``G_i - mean_sg``) over the rows of the
    row's step group ``sg`` (same group, identical anchor observation); ``G`` are the discounted
    step returns plus ``step_return_offsets``; a singleton step group gives ``A_step = 0``.

    Returns (advantages [N] float32, metrics) with step-group metrics prefixed ``step_``.
    """
    outcomes = _outcomes(batch, config)
    batch, usable = outcomes.batch, outcomes.usable
    episode_adv, metrics = _grpo(outcomes, config)
    returns = discounted_step_returns(
        batch.step_rewards, batch.traj_ids, batch.step_index, config.gamma, usable
    )
    if batch.step_return_offsets is not None:
        returns = returns + batch.step_return_offsets.astype(jnp.float32)
    num_sg = config.num_step_groups or batch.scores.shape[0]
    step_usable = usable & _in_range(batch.step_group_ids, num_sg)
    stats = _group_stats(returns, batch.step_group_ids, step_usable, num_sg)
    sg = jnp.clip(batch.step_group_ids, 0, num_sg - 1)
    centred = returns - stats.mean[sg]
    step_adv = centred / (stats.std[sg] + config.eps) if config.normalize_by_std else centred
    step_adv = jnp.where(stats.count[sg] > 1, step_adv, 0.0)
    adv = episode_adv + config.step_advantage_weight * step_adv
    step_metrics = _group_metrics(stats, None, usable, step_usable)
    metrics.update({f"step_{k}": v for k, v in step_metrics.items()})
    return jnp.where(usable, adv, 0.0), metrics


Estimator = Callable[[GroupedRewards, AdvantageConfig], tuple[jax.Array, dict[str, jax.Array]]]
# Input fields every estimator receives; the others are declared by the estimators that need them.
BASE_INPUTS = ("scores", "group_ids", "row_valid", "traj_ids")


def outcome_options(algorithm) -> dict[str, Any]:
    """AdvantageConfig options of the outcome estimators from the run config's ``algorithm``."""
    return {"normalize_by_std": algorithm.norm_adv_by_std_in_grpo}


def gigpo_options(algorithm) -> dict[str, Any]:
    """GiGPO's options: both parts std-normalised iff ``gigpo_mode == "mean_std_norm"``."""
    return {"normalize_by_std": algorithm.gigpo_mode == "mean_std_norm", "gamma": algorithm.gigpo_gamma,
            "step_advantage_weight": algorithm.gigpo_step_advantage_w}


@dataclasses.dataclass(frozen=True)
class RegisteredEstimator:
    """An advantage estimator and what it needs.

    Attributes:
      fn: ``(GroupedRewards, AdvantageConfig) -> (advantages [N], metrics)``.
      inputs: the [N] inputs it reads besides ``BASE_INPUTS``: ``GroupedRewards`` field names, or
        any other name, delivered in ``GroupedRewards.extra``. The trainer computes exactly these,
        each by the provider registered under its name (``spear_jax.prepare.ADVANTAGE_INPUTS``).
      options: the run config's ``algorithm`` section -> ``AdvantageConfig`` keyword arguments
        (its normalisation, discount, ...).
      row_layouts: the row layouts it works on (GiGPO: step rows, whose anchors make step groups).
    """

    fn: Estimator
    inputs: tuple[str, ...] = ()
    options: Callable[[Any], dict[str, Any]] = outcome_options
    row_layouts: tuple[str, ...] = ("step", "trajectory")


ADVANTAGE_ESTIMATORS: dict[str, RegisteredEstimator] = {
    "grpo": RegisteredEstimator(grpo_advantages),
    "rloo": RegisteredEstimator(rloo_advantages),
    "gigpo": RegisteredEstimator(
        gigpo_advantages, inputs=("step_index", "step_rewards", "step_group_ids", "step_return_offsets"),
        options=gigpo_options, row_layouts=("step",)),
}


def register_advantage_estimator(name: str, fn: Estimator, *, inputs: tuple[str, ...] = (),
                                 options: Callable[[Any], dict[str, Any]] = outcome_options,
                                 row_layouts: tuple[str, ...] = ("step", "trajectory")) -> None:
    """Makes ``fn`` selectable as ``algorithm.adv_estimator = name`` (``RegisteredEstimator``
    gives the meaning of ``inputs``, ``options`` and ``row_layouts``); a taken name raises."""
    if name in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r} is already registered")
    overlap = [key for key in inputs if key in BASE_INPUTS]
    if overlap:
        raise ValueError(f"inputs {overlap} are given to every estimator; declare only extra inputs")
    ADVANTAGE_ESTIMATORS[name] = RegisteredEstimator(fn, tuple(inputs), options, tuple(row_layouts))


def get_advantage_estimator(name: str) -> Estimator:
    """The estimator registered under ``name``; unknown names raise listing the valid ones."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name].fn


def compute_advantages(batch: GroupedRewards, config: AdvantageConfig):
    """Dispatch to ``config.estimator``: returns (advantages [N], metrics)."""
    return get_advantage_estimator(config.estimator)(batch, config)


def broadcast_to_tokens(row_advantages, mask):
    """``advantage[i, t] = A_i * mask[i, t]``: [N] x [N, T] -> [N, T] float32."""
    _checks.check_float("row_advantages", row_advantages)
    _checks.check_rank("mask", mask, 2)
    _checks.check_mask("mask", mask)
    _checks.check_shape("row_advantages", row_advantages, mask.shape[:1])
    return row_advantages.astype(jnp.float32)[:, None] * mask.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Host-side helpers (numpy): dense ids and group-size validation


def step_group_ids_from_anchors(group_ids, anchors) -> tuple[np.ndarray, int]:
    """Dense ids of the (group, anchor observation) pairs: rows share an id iff both are equal.

    Args:
      group_ids: [N] int group of each row.
      anchors: length-N sequence of hashable anchor observations (e.g. the raw env text).

    Returns (ids [N] int32 in [0, K), K).
    """
    if len(anchors) != len(group_ids):
        raise ValueError(f"anchors has {len(anchors)} entries but group_ids has {len(group_ids)}")
    table: dict = {}
    ids = np.array([table.setdefault((int(g), a), len(table)) for g, a in zip(group_ids, anchors)], np.int32)
    return ids, len(table)


def validate_group_sizes(group_ids, expected_size: int, traj_ids=None, row_valid=None) -> None:
    """Raise ``ValueError`` unless every non-empty group has ``expected_size`` members.

    Members are trajectories when ``traj_ids`` is given (agent step rows), else rows. This catches
    grouping by the wrong id, which silently yields singleton groups and raw-score advantages.
    """
    group_ids = np.asarray(group_ids)
    keep = np.ones(len(group_ids), bool) if row_valid is None else np.asarray(row_valid, bool)
    if traj_ids is None:
        members = {(int(g), i) for i, g in enumerate(group_ids) if keep[i]}
    else:
        traj_ids = np.asarray(traj_ids)
        if traj_ids.shape != group_ids.shape:
            raise ValueError(f"traj_ids must have shape {group_ids.shape}, got {traj_ids.shape}")
        members = {(int(g), int(t)) for g, t, k in zip(group_ids, traj_ids, keep) if k}
    sizes: dict[int, int] = {}
    for g, _ in members:
        sizes[g] = sizes.get(g, 0) + 1
    wrong = {g: s for g, s in sorted(sizes.items()) if s != expected_size}
    if wrong:
        shown = dict(list(wrong.items())[:10])
        raise ValueError(
            f"{len(wrong)} of {len(sizes)} groups do not have the expected group size {expected_size} "
            f"(group id: size, first 10: {shown}); check that rows are grouped by the prompt/task id"
        )
