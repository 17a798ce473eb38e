"""The per-micro-batch training objective: a list of weighted loss terms, aggregated once.

The train step calls :func:`policy_objective` (on-policy micro-batches) or :func:`sil_objective`
(replay micro-batches) once per micro-batch, sums the returned ``loss_sum`` values (and their
gradients) and the ``normaliser`` values over the micro-batches of a minibatch, and divides once
(:func:`spear_jax.objectives.aggregation.finalize`). Per token, with the configured terms
``(term_k, c_k)`` (:mod:`spear_jax.objectives.terms`)::

    l_t = sum_k c_k * term_k(t)        e.g. pg_t - entropy_coef * H_t + kl_coef * KL_t
    (loss_sum, normaliser) = aggregate(l, mask)              (aggregation is linear in l)

SIL (replay) objective, per replay micro-batch (spec 3c)::

    (loss_sum, normaliser) = aggregate(sum_k c'_k * term'_k, mask)   (the replay term list)
    loss_sum <- lambda(t) * loss_sum

where the policy-gradient terms are evaluated against the *stored* behaviour log-probs and
recalibrated advantages with the replay Clip-Cov / KL-Cov parameters (default replay terms: the
policy loss and the entropy bonus, no KL); ``lambda(t)`` (the SIL weight) is computed by the host
curriculum and passed in.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from spear_jax.objectives import _checks
from spear_jax.objectives.aggregation import AggregationConfig, aggregate, finalize
from spear_jax.objectives.policy_losses import PolicyLossConfig, check_token_inputs
from spear_jax.objectives.regularizers import KL_PENALTIES
from spear_jax.objectives.terms import TermInputs, check_terms, declared_inputs, get_loss_term


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Everything :func:`policy_objective` needs besides arrays (validated at construction).

    ``terms``: ``((name, coefficient), ...)`` of registered loss terms, summed per token in this
    order. ``kl_penalty``: the estimator of the ``kl`` term.
    """

    policy: PolicyLossConfig = PolicyLossConfig()
    aggregation: AggregationConfig = AggregationConfig()
    terms: tuple[tuple[str, float], ...] = (("pg", 1.0),)
    kl_penalty: str = "low_var_kl"

    def __post_init__(self):
        if not isinstance(self.policy, PolicyLossConfig):
            raise TypeError(f"policy must be a PolicyLossConfig, got {type(self.policy).__name__}")
        if not isinstance(self.aggregation, AggregationConfig):
            raise TypeError(f"aggregation must be an AggregationConfig, got {type(self.aggregation).__name__}")
        object.__setattr__(self, "terms", check_terms(self.terms))
        _checks.check_choice("kl_penalty", self.kl_penalty, KL_PENALTIES)


def _check_inputs(config: ObjectiveConfig, inputs: TermInputs) -> None:
    """Trace-time checks of the arrays against the terms that read them; errors name both."""
    check_token_inputs(inputs.logp, inputs.old_logp, inputs.advantages, inputs.mask)
    shape = inputs.logp.shape
    if inputs.entropy is not None:
        _checks.check_float("entropy", inputs.entropy, shape)
    for name, _ in config.terms:
        if get_loss_term(name).needs_entropy and inputs.entropy is None:
            raise ValueError(f"loss term {name!r} needs entropy= (the [B, T] token entropies)")
    for key in declared_inputs(config.terms):
        if key not in inputs.batch:
            users = [n for n, _ in config.terms if key in get_loss_term(n).inputs]
            raise ValueError(f"loss terms {users} need inputs[{key!r}] (a [B] or [B, T] batch array)")
        if tuple(jnp.shape(inputs.batch[key])) not in (shape, shape[:1]):
            raise ValueError(f"inputs[{key!r}] must have shape {shape[:1]} or {shape}, "
                             f"got {tuple(jnp.shape(inputs.batch[key]))}")


def policy_objective(
    config: ObjectiveConfig,
    *,
    logp,
    old_logp,
    advantages,
    mask,
    key=None,
    entropy=None,
    row_valid=None,
    inputs: Mapping[str, jax.Array] | None = None,
    mesh=None,
):
    """One micro-batch's ``(loss_sum, normaliser, metrics)`` (arrays keyword-only).

    Args:
      config: the objective's static options and term list.
      logp: [B, T] float current-policy log-probs of the response tokens (differentiated).
      old_logp: [B, T] float behaviour-policy log-probs.
      advantages: [B, T] float token advantages (e.g. ``broadcast_to_tokens``).
      mask: [B, T] 0/1 loss mask.
      key: PRNG key, required by ``clip_cov``.
      entropy: [B, T] float token entropies; required by the ``entropy`` term.
      row_valid: optional [B] bool marking real (non-padding) rows for row-count normalisers.
      inputs: the extra batch arrays the terms declare, by name, [B] or [B, T] each
        (``ref_logprobs`` for ``kl``).
      mesh: required for ``cov_selection_scope='per_device'``.

    Returns:
      loss_sum (float32 scalar, differentiable), normaliser (float32 scalar), metrics: each term's
      aggregated value under its metric name (``pg_loss``, ``entropy``, ``kl``, aggregated like
      the loss as the reference logs them) and its own metrics (the policy loss's clip fractions;
      Clip-Cov / KL-Cov also ``cov_selected``, a [B, T] bool mask), ``loss`` (= loss_sum /
      normaliser) and ``num_valid_tokens``.
    """
    token_inputs = TermInputs(logp, old_logp, advantages, mask, entropy, row_valid, key, mesh, inputs or {})
    _check_inputs(config, token_inputs)
    agg = config.aggregation
    total, metrics = None, {}
    for name, coefficient in config.terms:
        term = get_loss_term(name)
        value = term.fn(config, token_inputs)
        metrics.update(value.metrics)
        metrics[term.metric] = finalize(*aggregate(jax.lax.stop_gradient(value.logged), mask, agg, row_valid))
        if coefficient != 0.0:
            weighted = coefficient * value.loss
            total = weighted if total is None else total + weighted
    if total is None:  # every coefficient is 0
        total = jnp.zeros(logp.shape, jnp.float32)
    loss_sum, normaliser = aggregate(total, mask, agg, row_valid)
    metrics["loss"] = finalize(jax.lax.stop_gradient(loss_sum), normaliser)
    metrics["num_valid_tokens"] = jnp.sum(mask.astype(jnp.int32))
    return loss_sum, normaliser, metrics


@dataclasses.dataclass(frozen=True)
class SILConfig:
    """Replay (self-imitation) loss parameters (agent defaults 0.02 / 2 / 60).

    ``ignore_replay_clip_cov=True`` reproduces the reference math tree (spec 5.2), whose Clip-Cov
    ignores ``is_replay`` so replay rows use the on-policy triple; KL-Cov honours the replay ratio
    in both trees. ``terms``: the replay objective's ``((name, coefficient), ...)`` (registered
    loss terms; the policy-gradient ones use the replay parameters below).
    """

    terms: tuple[tuple[str, float], ...] = (("pg", 1.0),)
    clip_cov_ratio: float = 0.02
    clip_cov_lb: float = 2.0
    clip_cov_ub: float = 60.0
    kl_cov_ratio: float = 0.02
    ignore_replay_clip_cov: bool = False

    def __post_init__(self):
        object.__setattr__(self, "terms", check_terms(self.terms))
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
    config: ObjectiveConfig,
    sil: SILConfig,
    sil_weight,
    *,
    logp,
    old_logp,
    advantages,
    mask,
    key=None,
    entropy=None,
    row_valid=None,
    inputs: Mapping[str, jax.Array] | None = None,
    mesh=None,
):
    """One replay micro-batch's ``(lambda * loss_sum, normaliser, metrics)`` (arrays keyword-only).

    Args:
      config: the on-policy objective config (same clip range, aggregation, KL estimator).
      sil: replay loss parameters, with the replay term list ``sil.terms``.
      sil_weight: scalar lambda(t) (float or traced), from the host curriculum.
      logp: [B, T] float current-policy log-probs of the replayed responses.
      old_logp: [B, T] float *stored* behaviour log-probs (from the collection step).
      advantages: [B, T] float recalibrated advantages, broadcast over the mask.
      mask: [B, T] 0/1 loss mask.
      key, entropy, row_valid, inputs, mesh: as in :func:`policy_objective`.

    Returns (sil_weight * loss_sum, normaliser, metrics with ``sil_weight`` added); the other
    metrics (``loss``, ``pg_loss``, ...) are the unweighted replay values.
    """
    replay_config = dataclasses.replace(
        config, policy=replay_policy_config(config.policy, sil), terms=sil.terms
    )
    loss_sum, normaliser, metrics = policy_objective(
        replay_config, logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, key=key,
        entropy=entropy, row_valid=row_valid, inputs=inputs, mesh=mesh,
    )
    weight = jnp.asarray(sil_weight, jnp.float32)
    metrics = dict(metrics, sil_weight=weight)
    return weight * loss_sum, normaliser, metrics
