"""Loss terms: the per-token pieces of the objectives, registered by name.

An objective is a list of ``(term, coefficient)`` pairs. Per token, in list order::

    l_t = sum_k c_k * term_k(t)        (a term with c_k = 0 is evaluated and logged, not added)
    (loss_sum, normaliser) = aggregate(l, mask)

Aggregation is linear in ``l``, so every term is aggregated with the same mask and normaliser;
each term's own aggregated value is logged under its ``metric`` name.

Built-in terms (``LOSS_TERMS``):

========================  =====================  ==========================  ======================
name                      per-token loss          coefficient (bare name)     extra batch inputs
========================  =====================  ==========================  ======================
``pg``                    policy loss, mode from  1                           --
                          ``PolicyLossConfig``
``pg_vanilla`` /          the policy loss in that 1                           --
``pg_clip_cov`` /         mode, whatever the
``pg_kl_cov``             configured mode
``entropy``               ``-H_t`` (bonus)        ``actor.entropy_coeff``     (``entropy``)
``kl``                    ``KL_t(pi || pi_ref)``  ``actor.kl_loss_coef``, on  ``ref_logprobs``
                                                  iff ``actor.use_kl_loss``
========================  =====================  ==========================  ======================

Every term sees the standard inputs (``STANDARD_INPUTS``: current and behaviour log-probs,
advantages, loss mask, token entropies, row validity; see :class:`TermInputs`) and the extra
arrays it declares in ``inputs``: names of arrays of the packed training batch, ``[B]`` per row or
``[B, T]`` per token. The train step puts exactly the declared arrays into each micro-batch, and
the replay buffer stores those declared by replay terms, so a new term needs no other change:

    register_loss_term(LossTerm("my_term", my_fn, metric="my_metric", inputs=("reward",)))

and ``config.actor.loss_terms`` / ``config.replay.loss_terms`` name it (``docs/objectives.md``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from spear_jax.objectives.policy_losses import POLICY_LOSSES, get_policy_loss
from spear_jax.objectives.regularizers import entropy_bonus, kl_penalty

STANDARD_INPUTS = ("logp", "old_logp", "advantages", "mask", "entropy", "row_valid")
REFERENCE_INPUT = "ref_logprobs"  # the frozen reference policy's log-probs, [B, T]
# Metric names the objectives write themselves.
RESERVED_METRICS = ("loss", "num_valid_tokens", "sil_weight")


class TermInputs(NamedTuple):
    """What a term's function reads.

    Attributes:
      logp: [B, T] float current-policy log-probs (differentiated).
      old_logp: [B, T] float behaviour log-probs.
      advantages: [B, T] float token advantages.
      mask: [B, T] 0/1 loss mask.
      entropy: [B, T] float token entropies, or None when the caller passed none.
      row_valid: [B] bool real rows, or None (every row is real).
      key: PRNG key of the micro-batch, or None.
      mesh: the device mesh, or None.
      batch: the declared extra arrays by batch name, [B] or [B, T] each.
    """

    logp: jax.Array
    old_logp: jax.Array
    advantages: jax.Array
    mask: jax.Array
    entropy: jax.Array | None
    row_valid: jax.Array | None
    key: jax.Array | None
    mesh: Any
    batch: Mapping[str, jax.Array]


class TermValue(NamedTuple):
    """What a term's function returns.

    Attributes:
      loss: [B, T] float32 per-token loss, before the coefficient.
      logged: [B, T] float per-token value aggregated like the loss and logged as the term's metric.
      metrics: further metrics: scalars (logged every step) or [B, T] token arrays (returned to
        direct callers of the objectives; the train step logs only scalars).
    """

    loss: jax.Array
    logged: jax.Array
    metrics: Mapping[str, jax.Array] = {}


# fn(config, inputs) -> TermValue; ``config`` is the ObjectiveConfig being evaluated (its
# ``policy`` already holds the replay parameters for replay rows).
TermFn = Callable[[Any, TermInputs], TermValue]


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """A registered loss term and what it needs.

    Attributes:
      name: the name configs use.
      fn: ``fn(config, inputs) -> TermValue``.
      metric: the name its aggregated ``logged`` value is reported under.
      inputs: packed-batch arrays it reads beyond ``STANDARD_INPUTS`` ([B] or [B, T] each).
      coefficient_field: run-config field of its coefficient when a list names it bare
        (None: coefficient 1).
      switch_field: run-config bool that must be True for a bare name to take effect (else the
        term is left out); an explicit ``(name, coefficient)`` pair is always on.
      option_fields: run-config fields of its other options (for docs and start-up checks).
      needs_entropy: it reads ``inputs.entropy``.
    """

    name: str
    fn: TermFn
    metric: str
    inputs: tuple[str, ...] = ()
    coefficient_field: str | None = None
    switch_field: str | None = None
    option_fields: tuple[str, ...] = ()
    needs_entropy: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a loss term needs a non-empty name, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"loss term {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if self.metric in RESERVED_METRICS:
            raise ValueError(f"loss term {self.name!r}: metric {self.metric!r} is reserved "
                             f"({RESERVED_METRICS}); pick another name")
        clashes = [name for name in self.inputs if name in STANDARD_INPUTS]
        if clashes:
            raise ValueError(f"loss term {self.name!r}: inputs {clashes} are standard inputs, "
                             f"always passed; declare only extra batch arrays")


LOSS_TERMS: dict[str, LossTerm] = {}


def register_loss_term(term: LossTerm, *, replace: bool = False) -> LossTerm:
    """Adds ``term`` to ``LOSS_TERMS`` (``replace=True`` to redefine a registered name)."""
    if not isinstance(term, LossTerm):
        raise TypeError(f"register_loss_term takes a LossTerm, got {type(term).__name__}")
    if term.name in LOSS_TERMS and not replace:
        raise ValueError(f"loss term {term.name!r} is already registered; pass replace=True to redefine it")
    LOSS_TERMS[term.name] = term
    return term


def get_loss_term(name: str) -> LossTerm:
    """The term registered under ``name``; unknown names raise listing the registered ones."""
    if name not in LOSS_TERMS:
        raise ValueError(f"unknown loss term {name!r}; registered: {sorted(LOSS_TERMS)}")
    return LOSS_TERMS[name]


TermList = tuple[tuple[str, float], ...]


def check_terms(terms) -> TermList:
    """Validated ``((name, coefficient), ...)``: registered names, finite coefficients, at least
    one term, and no two terms reporting the same metric."""
    if isinstance(terms, (str, bytes)) or not isinstance(terms, (tuple, list)) or not terms:
        raise ValueError(f"terms must be a non-empty sequence of (name, coefficient) pairs, got {terms!r}")
    checked, metric_owner = [], {}
    for entry in terms:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"terms entry {entry!r} must be a (name, coefficient) pair")
        name, coef = entry
        term = get_loss_term(name)
        if isinstance(coef, bool) or not isinstance(coef, numbers.Real) or not math.isfinite(coef):
            raise ValueError(f"terms entry {entry!r}: the coefficient must be a finite number")
        if term.metric in metric_owner:
            raise ValueError(f"loss terms {metric_owner[term.metric]!r} and {name!r} both report "
                             f"{term.metric!r}; keep one of them")
        metric_owner[term.metric] = name
        checked.append((name, float(coef)))
    return tuple(checked)


def declared_inputs(terms: TermList) -> tuple[str, ...]:
    """The extra batch arrays ``terms`` read, in first-use order, each once."""
    names: list[str] = []
    for name, _ in terms:
        names += [key for key in get_loss_term(name).inputs if key not in names]
    return tuple(names)


# ------------------------------------------------------------------------------------------------
# Built-in terms


def _policy_gradient(mode: str | None) -> TermFn:
    """The policy loss of ``config.policy`` (in loss mode ``mode`` when given)."""

    def term(config, inputs: TermInputs) -> TermValue:
        policy = config.policy if mode is None else dataclasses.replace(config.policy, loss_mode=mode)
        loss, metrics = get_policy_loss(policy.loss_mode)(
            policy, logp=inputs.logp, old_logp=inputs.old_logp, advantages=inputs.advantages,
            mask=inputs.mask, key=inputs.key, mesh=inputs.mesh)
        return TermValue(loss, loss, metrics)

    return term


def entropy_term(config, inputs: TermInputs) -> TermValue:
    """Entropy bonus: loss ``-H_t`` (``entropy_bonus`` at coefficient 1), logged ``H_t``."""
    del config
    return TermValue(entropy_bonus(inputs.entropy, 1.0), inputs.entropy.astype(jnp.float32))


def kl_term(config, inputs: TermInputs) -> TermValue:
    """``KL_t(pi || pi_ref)`` by the estimator ``config.kl_penalty``."""
    kl = kl_penalty(inputs.logp, inputs.batch[REFERENCE_INPUT], config.kl_penalty)
    return TermValue(kl, kl)


_POLICY_OPTIONS = (
    "actor.clip_ratio_low", "actor.clip_ratio_high", "actor.clip_ratio_c", "actor.log_ratio_clamp",
    "actor.clip_cov_clamp_log_ratio", "actor.clip_cov_ratio", "actor.clip_cov_lb", "actor.clip_cov_ub",
    "actor.kl_cov_ratio", "actor.ppo_kl_coef", "actor.clip_cov_scope",
    # replay rows use these in place of their actor.* counterparts
    "replay.clip_cov_ratio", "replay.clip_cov_lb", "replay.clip_cov_ub", "replay.kl_cov_ratio",
    "replay.clip_cov_ignores_replay_params",
)

register_loss_term(LossTerm("pg", _policy_gradient(None), metric="pg_loss",
                            option_fields=("actor.loss_mode",) + _POLICY_OPTIONS))
for _mode in POLICY_LOSSES:
    register_loss_term(LossTerm(f"pg_{_mode}", _policy_gradient(_mode), metric="pg_loss",
                                option_fields=_POLICY_OPTIONS))
register_loss_term(LossTerm("entropy", entropy_term, metric="entropy",
                            coefficient_field="actor.entropy_coeff", needs_entropy=True))
register_loss_term(LossTerm("kl", kl_term, metric="kl", inputs=(REFERENCE_INPUT,),
                            coefficient_field="actor.kl_loss_coef", switch_field="actor.use_kl_loss",
                            option_fields=("actor.kl_loss_type",)))
