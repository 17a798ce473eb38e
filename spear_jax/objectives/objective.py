"""The per-micro-batch training objective: policy loss + entropy bonus + optional KL, aggregated.

The train step calls :func:`policy_objective` (on-policy micro-batches) or :func:`sil_objective`
(replay micro-batches) once per micro-batch, sums the returned ``loss_sum`` values (and their
gradients) and the ``normaliser`` values over the micro-batches of a minibatch, and divides once
(:func:`spear_jax.objectives.aggregation.finalize`). Per token::

    l_t = pg_t - entropy_coef * H_t + kl_coef * KL_t        (pg_t from the configured policy loss)
    (loss_sum, normaliser) = aggregate(l, mask)              (aggregation is linear in l)

SIL (replay) term, per replay micro-batch (spec 3c)::

    (loss_sum, normaliser) = aggregate(pg^replay - entropy_coef * H, mask) scaled by lambda(t)
    loss_sum <- lambda(t) * loss_sum

where ``pg^replay`` is the same policy-loss family evaluated against the *stored* behaviour
log-probs and recalibrated advantages with the replay Clip-Cov / KL-Cov parameters, and no KL term;
``lambda(t)`` (the SIL weight) is computed by the host curriculum and passed in.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spear_jax.objectives import _checks
from spear_jax.objectives.aggregation import AggregationConfig, aggregate, finalize
from spear_jax.objectives.policy_losses import PolicyLossConfig, check_token_inputs, get_policy_loss
from spear_jax.objectives.regularizers import KL_PENALTIES, entropy_bonus, kl_penalty


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Everything :func:`policy_objective` needs besides arrays (validated at construction)."""

    policy: PolicyLossConfig = PolicyLossConfig()
    aggregation: AggregationConfig = AggregationConfig()
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_penalty: str = "low_var_kl"

    def __post_init__(self):
        if not isinstance(self.policy, PolicyLossConfig):
            raise TypeError(f"policy must be a PolicyLossConfig, got {type(self.policy).__name__}")
        if not isinstance(self.aggregation, AggregationConfig):
            raise TypeError(f"aggregation must be an AggregationConfig, got {type(self.aggregation).__name__}")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        _checks.check_choice("kl_penalty", self.kl_penalty, KL_PENALTIES)


def policy_objective(
    logp,
    old_logp,
    advantages,
    mask,
    config: ObjectiveConfig,
    key=None,
    *,
    entropy=None,
    ref_logp=None,
    row_valid=None,
    mesh=None,
):
    """One micro-batch's ``(loss_sum, normaliser, metrics)``.

    Args:
      logp: [B, T] float current-policy log-probs of the response tokens (differentiated).
      old_logp: [B, T] float behaviour-policy log-probs.
      advantages: [B, T] float token advantages (e.g. ``broadcast_to_tokens``).
      mask: [B, T] 0/1 loss mask.
      config: the objective's static options.
      key: PRNG key, required by ``clip_cov``.
      entropy: [B, T] float token entropies; required iff ``entropy_coef != 0`` (also logged).
      ref_logp: [B, T] float reference log-probs; required iff ``kl_coef != 0``.
      row_valid: optional [B] bool marking real (non-padding) rows for row-count normalisers.
      mesh: required for ``cov_selection_scope='per_device'``.

    Returns:
      loss_sum (float32 scalar, differentiable), normaliser (float32 scalar), metrics: the policy
      loss's metrics plus ``pg_loss``, ``entropy`` and ``kl`` (each aggregated like the loss, as the
      reference logs them), ``loss`` (= loss_sum / normaliser) and ``num_valid_tokens``.
    """
    check_token_inputs(logp, old_logp, advantages, mask)
    if config.entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy is required when entropy_coef != 0")
    if config.kl_coef != 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when kl_coef != 0")
    if entropy is not None:
        _checks.check_float("entropy", entropy, logp.shape)
    if ref_logp is not None:
        _checks.check_float("ref_logp", ref_logp, logp.shape)

    loss_fn = get_policy_loss(config.policy.loss_mode)
    pg, metrics = loss_fn(logp, old_logp, advantages, mask, config.policy, key, mesh)
    agg = config.aggregation

    def aggregated(per_token):
        return finalize(*aggregate(jax.lax.stop_gradient(per_token), mask, agg, row_valid))

    total = pg
    metrics = dict(metrics, pg_loss=aggregated(pg))
    if entropy is not None:
        metrics["entropy"] = aggregated(entropy.astype(jnp.float32))
        if config.entropy_coef != 0.0:
            total = total + entropy_bonus(entropy, config.entropy_coef)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, config.kl_penalty)
        metrics["kl"] = aggregated(kl)
        if config.kl_coef != 0.0:
            total = total + config.kl_coef * kl
    loss_sum, normaliser = aggregate(total, mask, agg, row_valid)
    metrics["loss"] = finalize(jax.lax.stop_gradient(loss_sum), normaliser)
    metrics["num_valid_tokens"] = jnp.sum(mask.astype(jnp.int32))
    return loss_sum, normaliser, metrics


@dataclasses.dataclass(frozen=True)
class SILConfig:
    """Replay (self-imitation) loss parameters (agent defaults 0.02 / 2 / 60).

    ``ignore_replay_clip_cov=True`` reproduces the reference math tree (spec 5.2), whose Clip-Cov
    ignores ``is_replay`` so replay rows use the on-policy triple; KL-Cov honours the replay ratio
    in both trees.
    """

    clip_cov_ratio: float = 0.02
    clip_cov_lb: float = 2.0
    clip_cov_ub: float = 60.0
    kl_cov_ratio: float = 0.02
    ignore_replay_clip_cov: bool = False

    def __post_init__(self):
        # Validate the triple by building a loss config from it.
        replay_policy_config(PolicyLossConfig(), self)


def replay_policy_config(on_policy: PolicyLossConfig, sil: SILConfig) -> PolicyLossConfig:
    """The policy-loss config of replay rows: the on-policy one with the replay parameters."""
    replay = dataclasses.replace(on_policy, kl_cov_ratio=sil.kl_cov_ratio)
    if sil.ignore_replay_clip_cov:
        return replay
    return dataclasses.replace(
        replay, clip_cov_ratio=sil.clip_cov_ratio, clip_cov_lb=sil.clip_cov_lb, clip_cov_ub=sil.clip_cov_ub
    )


def sil_objective(
    logp,
    old_logp,
    advantages,
    mask,
    config: ObjectiveConfig,
    sil: SILConfig,
    sil_weight,
    key=None,
    *,
    entropy=None,
    row_valid=None,
    mesh=None,
):
    """One replay micro-batch's ``(lambda * loss_sum, normaliser, metrics)``; no KL term.

    Args:
      logp: [B, T] float current-policy log-probs of the replayed responses.
      old_logp: [B, T] float *stored* behaviour log-probs (from the collection step).
      advantages: [B, T] float recalibrated advantages, broadcast over the mask.
      mask: [B, T] 0/1 loss mask.
      config: the on-policy objective config (same clip range, aggregation, entropy bonus).
      sil: replay loss parameters.
      sil_weight: scalar lambda(t) (float or traced), from the host curriculum.
      key, entropy, row_valid, mesh: as in :func:`policy_objective`.

    Returns (sil_weight * loss_sum, normaliser, metrics with ``sil_weight`` added); the other
    metrics (``loss``, ``pg_loss``, ...) are the unweighted replay values.
    """
    replay_config = dataclasses.replace(
        config, policy=replay_policy_config(config.policy, sil), kl_coef=0.0
    )
    loss_sum, normaliser, metrics = policy_objective(
        logp, old_logp, advantages, mask, replay_config, key,
        entropy=entropy, row_valid=row_valid, mesh=mesh,
    )
    weight = jnp.asarray(sil_weight, jnp.float32)
    metrics = dict(metrics, sil_weight=weight)
    return weight * loss_sum, normaliser, metrics
