"""Loss aggregation over tokens and rows, as (sum, normaliser) pairs for exact accumulation.

With per-token loss ``L [B, T]``, mask ``M [B, T]``, ``n_rows`` rows (all rows, or those marked by
``row_valid``) and a fixed length ``T_norm`` (``norm_length``, default the padded ``T``):

===========================  ===============================================  =====================
mode                          sum                                              normaliser
===========================  ===============================================  =====================
``token-mean``                ``sum_{i,t} L M``                                ``sum_{i,t} M``
``seq-mean-token-sum``        ``sum_{i,t} L M``                                ``n_rows``
``seq-mean-token-mean``       ``sum_{i: M_i != 0} (sum_t L M / sum_t M)``      ``#{i: M_i != 0}``
``seq-mean-token-sum-norm``   ``sum_{i,t} L M``                                ``n_rows * T_norm``
===========================  ===============================================  =====================

``accumulation="exact"`` (default): the objective of a minibatch split into micro-batches ``j`` is
``sum_j sum_j / sum_j normaliser_j`` (:func:`finalize`), identical in value and gradient to the
full minibatch (all normalisers are additive; ``seq-mean-token-sum-norm`` is the Dr.GRPO mean over
rows of ``sum_t L M / T_norm``; pass the configured maximum response length as ``norm_length`` so
length buckets do not change it).

Reference per-micro-batch semantics (SPEAR's ``agg_loss`` + ``dp_actor`` scaling):
each micro-batch is aggregated on its own into ``v_j`` --
``token-mean``: ``sum L M / (sum M + 1e-8)``; ``seq-mean-token-sum``: ``sum L M / n_rows``;
``seq-mean-token-mean``: mean over rows of the row token-means; ``seq-mean-token-sum-norm``:
``sum L M / T_norm`` (a *sum* over the micro-batch's rows) -- and scaled by ``s_j``:
``accumulation="reference_fixed"``: ``s_j = 1 / grad_accum_steps``;
``accumulation="reference_dynamic"``: ``s_j = n_rows_j / mini_batch_rows``.
The pair returned is ``(v_j * s_j, s_j)``, so summing sums over the micro-batches of a minibatch
gives the reference objective ``sum_j s_j v_j`` and the normalisers sum to 1.

Rows whose mask is all zero never produce NaN: in ``seq-mean-token-mean`` they are left out of
both the sum and the row count (the reference would return NaN), in the other modes they add 0 to
the sum and, for the row-count normalisers, count as rows (as in the reference).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spear_jax.objectives import _checks

AGGREGATION_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ACCUMULATION_MODES = ("exact", "reference_fixed", "reference_dynamic")


@dataclasses.dataclass(frozen=True)
class AggregationConfig:
    """How per-token losses become a scalar, and how micro-batches combine."""

    mode: str = "token-mean"
    norm_length: int | None = None
    accumulation: str = "exact"
    grad_accum_steps: int = 1
    mini_batch_rows: int | None = None

    def __post_init__(self):
        _checks.check_choice("mode", self.mode, AGGREGATION_MODES)
        _checks.check_choice("accumulation", self.accumulation, ACCUMULATION_MODES)
        if self.norm_length is not None:
            _checks.check_positive_int("norm_length", self.norm_length)
        _checks.check_positive_int("grad_accum_steps", self.grad_accum_steps)
        if self.accumulation == "reference_dynamic" and self.mini_batch_rows is None:
            raise ValueError("mini_batch_rows must be set when accumulation='reference_dynamic'")
        if self.mini_batch_rows is not None:
            _checks.check_positive_int("mini_batch_rows", self.mini_batch_rows)


def aggregate(loss, mask, config: AggregationConfig, row_valid=None) -> tuple[jax.Array, jax.Array]:
    """Aggregate a per-token loss into ``(sum, normaliser)`` (see the module docstring).

    Args:
      loss: [B, T] float per-token loss (values at masked tokens are ignored, NaN included).
      mask: [B, T] 0/1 loss mask.
      config: aggregation mode and accumulation semantics.
      row_valid: optional [B] bool; rows marked False (padding) are not counted as rows.

    Returns:
      (sum, normaliser): float32 scalars; the micro-batch objective is ``sum / normaliser``.
    """
    _checks.check_float("loss", loss)
    _checks.check_rank("loss", loss, 2)
    _checks.check_mask("mask", mask, loss.shape)
    if row_valid is not None:
        _checks.check_mask("row_valid", row_valid, loss.shape[:1])
    m = mask.astype(jnp.float32)
    masked = jnp.where(m > 0, loss.astype(jnp.float32), 0.0) * m
    rows = jnp.float32(loss.shape[0]) if row_valid is None else jnp.sum(row_valid.astype(jnp.float32))
    t_norm = jnp.float32(config.norm_length or loss.shape[1])

    row_tokens = jnp.sum(m, axis=1)
    nonempty = row_tokens > 0
    row_token_mean = jnp.where(nonempty, jnp.sum(masked, axis=1) / jnp.where(nonempty, row_tokens, 1.0), 0.0)
    n_nonempty = jnp.sum(nonempty.astype(jnp.float32))
    total = jnp.sum(masked)

    if config.accumulation == "exact":
        return {
            "token-mean": (total, jnp.sum(m)),
            "seq-mean-token-sum": (total, rows),
            "seq-mean-token-mean": (jnp.sum(row_token_mean), n_nonempty),
            "seq-mean-token-sum-norm": (total, rows * t_norm),
        }[config.mode]

    value = {
        "token-mean": total / (jnp.sum(m) + 1e-8),
        "seq-mean-token-sum": total / jnp.maximum(rows, 1.0),
        "seq-mean-token-mean": jnp.sum(row_token_mean) / jnp.maximum(n_nonempty, 1.0),
        "seq-mean-token-sum-norm": total / t_norm,
    }[config.mode]
    if config.accumulation == "reference_fixed":
        scale = jnp.float32(1.0 / config.grad_accum_steps)
    else:
        scale = rows / config.mini_batch_rows
    return value * scale, scale


def finalize(loss_sum, normaliser) -> jax.Array:
    """``loss_sum / normaliser``, and 0 (with zero gradient) when the normaliser is 0."""
    safe = jnp.where(normaliser > 0, normaliser, 1.0)
    return jnp.where(normaliser > 0, loss_sum / safe, 0.0)
