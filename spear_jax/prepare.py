"""Batch preparation of one RL step (steps 2-5 of ``spear_jax.trainer``), as pure stages:

    shape rewards -> filter groups -> mask low-quality rows -> pack -> old log-probs
    -> penalties -> advantages

Each stage takes plain values (rows, arrays, a small config) and returns arrays and metrics; only
``old_logprobs`` needs the model, through the log-prob functions it is given. The configs are
translated from the run config in ``spear_jax.run_config`` (``preparation_config``).

* ``shape_rewards``: ``R = outcome + tool-call bonus * kappa(t)`` per row (``rewards``).
* ``filter_groups``: the low-variance group filter on R (``filters``); returns the kept rows.
* ``mask_low_quality``: which kept rows an enabled Dr.BoT quality flag excludes from the loss (their
  R still enters every group statistic).
* ``pack``: the rows as one padded batch (``batching``, ``batch_schema``), excluded rows' loss
  masks zeroed.
* ``old_logprobs``: the pre-update policy's (and the reference's) log-probs of the batch.
* ``penalties``: the invalid-action penalty (agent) and KL in the reward, giving ``scores`` and
  GiGPO's ``step_return_offsets``.
* ``advantages``: the configured estimator (``objectives.advantages``) on the inputs it declares,
  each computed by the provider registered under its name (``ADVANTAGE_INPUTS``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from spear_jax import filters, rewards
from spear_jax.batching import BatchingConfig, bucket_length, pack_rows
from spear_jax.objectives.advantages import (ADVANTAGE_ESTIMATORS, AdvantageConfig, GroupedRewards,
                                             compute_advantages, step_group_ids_from_anchors,
                                             validate_group_sizes)
from spear_jax.rollout import Row

Batch = dict[str, np.ndarray]
Metrics = dict[str, float]


@dataclasses.dataclass(frozen=True)
class GroupFilterConfig:
    """Options of ``filters.low_variance_group_filter`` (its docstring gives their meaning)."""

    ratio: float = 1.0
    filter_type: str = "std"
    ddof: int = 0
    truncation: str = "none"
    grouping: str = "uid"
    group_size: int | None = None


@dataclasses.dataclass(frozen=True)
class QualityFilterConfig:
    """``enabled``: the ``filters.QUALITY_FLAGS`` that exclude a row from the loss."""

    enabled: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """The batch length is the smallest of ``length_buckets`` holding the longest row; rows are
    padded to a multiple of ``row_multiple`` (the minibatch size) with ``pad_id`` tokens."""

    length_buckets: tuple[int, ...]
    pad_id: int
    row_multiple: int = 1


@dataclasses.dataclass(frozen=True)
class PenaltyConfig:
    """``invalid_action_coef``: subtracted from a row's score when its action was malformed (None:
    off); ``kl_coef`` / ``kl_penalty``: KL in the reward (None: off)."""

    invalid_action_coef: float | None = None
    kl_coef: float | None = None
    kl_penalty: str = "kl"


@dataclasses.dataclass(frozen=True)
class AdvantageSetup:
    """The estimator's config, and whether every group must hold ``expected_group_size``
    trajectories (checked when every episode ran)."""

    config: AdvantageConfig
    check_group_sizes: bool = True


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Every stage's options (``run_config.preparation_config`` builds it from the run config)."""

    reward_recipe: str
    group_filter: GroupFilterConfig
    quality: QualityFilterConfig
    pack: PackConfig
    penalties: PenaltyConfig
    advantages: AdvantageSetup


# -------------------------------------------------------------------------------------- stages


def shape_rewards(rows: Sequence[Row], kappa: float, recipe: str) -> tuple[np.ndarray, Metrics]:
    """Shaped rewards R [n] float32 with tool-call factor ``kappa`` (``rewards.shaped_scores``)."""
    if not rows:
        raise RuntimeError("the rollout produced no rows (every episode failed?)")
    scores = rewards.shaped_scores(rows, kappa, recipe=recipe)
    return scores, {"reward/toolcall_factor": kappa, "reward/shaped_mean": float(scores.mean())}


def filter_groups(rows: Sequence[Row], scores: np.ndarray, config: GroupFilterConfig,
                  rng: np.random.Generator) -> tuple[list[Row], np.ndarray, Metrics]:
    """The rows (and their R [k]) of the groups the low-variance filter keeps, in rollout order;
    ``rng`` draws the power-of-two truncation."""
    kept = filters.low_variance_group_filter(
        scores, np.array([r.group_id for r in rows]), np.array([r.traj_id for r in rows]),
        rng=rng, **dataclasses.asdict(config))
    index = kept.kept_rows
    metrics = {f"filter/{k}": float(v) for k, v in kept.metrics.items()}
    return [rows[i] for i in index], scores[index], metrics


def mask_low_quality(rows: Sequence[Row], config: QualityFilterConfig
                     ) -> tuple[np.ndarray, dict[str, np.ndarray], Metrics]:
    """(rows excluded from the loss [n] bool, every quality flag [n] bool by name, metrics)."""
    flags = rewards.quality_flags(rows)
    masked, metrics = filters.low_quality_rows(flags, config.enabled)
    return masked, flags.as_dict(), metrics


def pack(rows: Sequence[Row], masked: np.ndarray, config: PackConfig) -> Batch:
    """The rows as one batch of ``batch_schema.PACKED`` arrays, the loss mask of the ``masked``
    [n] rows zeroed; rows [n:] are padding."""
    longest = max(r.prompt_ids.shape[0] + r.response_ids.shape[0] for r in rows)
    length = bucket_length(longest, config.length_buckets)
    (packed,) = pack_rows(rows, BatchingConfig(buckets=(length,), pad_id=config.pad_id,
                                               row_multiple=config.row_multiple))
    batch = dict(packed.arrays)
    n = len(rows)
    loss_mask = batch["loss_mask"][:n]
    batch["loss_mask"][:n] = np.where(masked[:, None], np.zeros_like(loss_mask), loss_mask)
    return batch


# (tokens [B, L] int32, valid [B, L] bool, selected [B, L] bool) -> (log-probs [B, L], entropies
# [B, L]), needed at the selected positions only; the reference function returns the log-probs alone.
PolicyLogProbs = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
ReferenceLogProbs = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def old_logprobs(batch: Batch, policy: PolicyLogProbs,
                 reference: ReferenceLogProbs | None = None) -> tuple[Batch, Metrics]:
    """``old_logprobs`` (and with ``reference``, ``ref_logprobs``) [B, L] float32, 0 off the loss
    mask; metrics: the mean entropy and mean |old - sampler| log-prob gap over trained tokens."""
    trained = batch["loss_mask"] > 0
    logprobs, entropy = policy(batch["tokens"], batch["valid"], trained)
    arrays = {"old_logprobs": np.where(trained, logprobs, 0.0).astype(np.float32)}
    if reference is not None:
        ref = reference(batch["tokens"], batch["valid"], trained)
        arrays["ref_logprobs"] = np.where(trained, ref, 0.0).astype(np.float32)
    if not trained.any():
        return arrays, {"actor/entropy": 0.0, "actor/behaviour_logprob_gap": 0.0}
    gap = np.abs(arrays["old_logprobs"] - batch["logprobs"])[trained].mean()
    return arrays, {"actor/entropy": float(entropy[trained].mean()), "actor/behaviour_logprob_gap": float(gap)}


def penalties(batch: Batch, shaped: np.ndarray, config: PenaltyConfig) -> tuple[Batch, Metrics]:
    """``scores`` [B]: R [n] minus the invalid-action penalty and, with KL in the reward, minus
    ``kl_coef * sum_t KL_t(old || ref)``; ``step_return_offsets`` [B]: the invalid-action
    penalty alone (GiGPO's step returns keep the environment rewards). Padding rows get 0."""
    n, size = shaped.shape[0], batch["row_valid"].shape[0]
    scores, metrics = shaped, {}
    offsets = np.zeros(n, np.float32)
    if config.invalid_action_coef is not None:
        scores, _ = filters.apply_invalid_action_penalty(shaped, batch["action_valid"][:n],
                                                         config.invalid_action_coef)
        offsets = (scores - shaped).astype(np.float32)
    if config.kl_coef is not None:
        scores, metrics = rewards.kl_penalised_scores(
            scores, batch["old_logprobs"][:n], batch["ref_logprobs"][:n], batch["loss_mask"][:n],
            config.kl_coef, config.kl_penalty)
    arrays = {"scores": pad_rows(scores.astype(np.float32), size), "step_return_offsets": pad_rows(offsets, size)}
    return arrays, metrics


def advantages(batch: Batch, rows: Sequence[Row], setup: AdvantageSetup,
               all_episodes_ran: bool) -> tuple[Batch, Metrics]:
    """``row_advantage`` [B] (0 on padding) and ``advantages`` [B, L] (it times the loss mask)
    from ``batch["scores"]``, by the configured estimator on the inputs it declares."""
    config, n = setup.config, len(rows)
    group_ids, traj_ids = batch["group_id"].astype(np.int32), batch["traj_id"].astype(np.int32)
    if setup.check_group_sizes and all_episodes_ran:
        validate_group_sizes(group_ids[:n], config.expected_group_size, traj_ids=traj_ids[:n])
    fields = dict(scores=batch["scores"], group_ids=group_ids, row_valid=batch["row_valid"], traj_ids=traj_ids)
    extra = {}
    for name in ADVANTAGE_ESTIMATORS[config.estimator].inputs:
        value = advantage_input(name)(batch, rows)
        (fields if name in GroupedRewards._fields else extra)[name] = value
    inputs = GroupedRewards(**{k: jnp.asarray(v) for k, v in fields.items()},
                            extra={k: jnp.asarray(v) for k, v in extra.items()} or None)
    row_adv, adv_metrics = compute_advantages(inputs, config)
    row_adv = np.where(batch["row_valid"], np.asarray(row_adv), 0.0).astype(np.float32)
    metrics = {f"advantage/{k}": float(v) for k, v in adv_metrics.items()}
    metrics["advantage/mean_abs"] = float(np.abs(row_adv[:n]).mean())
    return {"row_advantage": row_adv, "advantages": row_adv[:, None] * batch["loss_mask"]}, metrics


# ------------------------------------------------------------------------ advantage inputs

# (packed batch, its rows [n]) -> one [B] input of an advantage estimator.
InputProvider = Callable[[Batch, Sequence[Row]], np.ndarray]


def _step_group_ids(batch: Batch, rows: Sequence[Row]) -> np.ndarray:
    """[B] int32: rows of one group with the same anchor observation share an id."""
    group_ids = batch["group_id"].astype(np.int32)[:len(rows)]
    ids, _ = step_group_ids_from_anchors(group_ids, [r.anchor_obs for r in rows])
    return pad_rows(ids.astype(np.int32), batch["row_valid"].shape[0])


ADVANTAGE_INPUTS: dict[str, InputProvider] = {
    "step_index": lambda batch, rows: batch["step_index"],
    "step_rewards": lambda batch, rows: batch["reward"],
    "step_group_ids": _step_group_ids,
    "step_return_offsets": lambda batch, rows: batch["step_return_offsets"],
}


def register_advantage_input(name: str, provider: InputProvider) -> None:
    """Makes ``name`` an input an advantage estimator can declare; a taken name raises."""
    if name in ADVANTAGE_INPUTS:
        raise ValueError(f"advantage input {name!r} is already registered")
    ADVANTAGE_INPUTS[name] = provider


def advantage_input(name: str) -> InputProvider:
    """The provider of input ``name``; an unregistered name raises listing the known ones."""
    if name not in ADVANTAGE_INPUTS:
        raise KeyError(f"no provider for the advantage input {name!r}; registered: {sorted(ADVANTAGE_INPUTS)} "
                       "(spear_jax.prepare.register_advantage_input)")
    return ADVANTAGE_INPUTS[name]


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """Zero-pads the leading axis of ``array`` to ``rows``."""
    pad = rows - array.shape[0]
    return np.pad(array, [(0, pad)] + [(0, 0)] * (array.ndim - 1)) if pad > 0 else array
