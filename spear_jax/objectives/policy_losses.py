"""Per-token policy-gradient losses (vanilla PPO, Clip-Cov, KL-Cov), selected by name.

Every loss has the signature ``loss_fn(config, *, logp, old_logp, advantages, mask, key=None,
mesh=None)`` (the arrays keyword-only: ``logp`` and ``old_logp`` are both [B, T] floats, and a swap
would silently invert the ratio) and returns ``(loss [B, T], metrics)``; the per-token loss is 0 at
masked tokens and is aggregated by :mod:`spear_jax.objectives.aggregation`. The metrics are
scalars, except the covariance losses' ``cov_selected`` [B, T] bool mask of the selected tokens. Notation per token:
``lr = logp - old_logp`` (clamped to ``+-log_ratio_clamp``), ``r = exp(lr)``, ``A`` the advantage,
``l1 = -A r``, ``l2 = -A clip(r, 1 - eps_low, 1 + eps_high)``.

* ``vanilla`` (PPO with clip-higher and dual clip):
  ``lc = max(l1, l2)``; ``loss = min(lc, -A c)`` if ``A < 0`` else ``lc`` (``c = dual_clip_c``).
* ``clip_cov`` (Entropy-Mechanism Clip-Cov): ``cov = (A - mean_V A)(logp - mean_V logp)`` over the
  valid tokens ``V``; among the eligible tokens (valid, not PPO-clipped, ``lb < cov < ub``) a
  uniformly random subset of size ``min(max(floor(rho |V|), 1), #eligible)`` is drawn with ``key``;
  ``loss = max(l1, l2) * (1 - selected)`` (no dual clip). Selected tokens have zero value and zero
  gradient but stay in the aggregation denominators.
* ``kl_cov``: ``loss = -A r`` (no PPO clipping) plus ``kl_cov_coef * |lr|`` on the
  ``max(floor(rho_kl |V|), 1)`` valid tokens with the largest ``cov``.

Log-ratio clamp: the reference clamps ``lr`` to +-20 in ``vanilla`` only; its Clip-Cov / KL-Cov
do not, so a stale replay token overflows ``r`` to inf and ``A = 0`` then gives NaN. Here the clamp
applies to every mode by default; ``clamp_cov_log_ratio=False`` is the faithful reference option.

Gradients at kinks follow the reference's torch semantics (:mod:`._elementwise`): the log-ratio
and ratio clamps pass the full gradient at their bounds (``torch.clamp``), ``|lr|`` has derivative
0 at ``lr = 0`` (``torch.abs``; so KL-Cov's penalty is inert on the first on-policy minibatch,
where ``logp == old_logp``), and the dual clip's ``min(lc, -A c)`` passes half of ``lc``'s
gradient at an exact tie (``torch.min``). ``max(l1, l2)`` is a select of ``l2`` where ``l2 > l1``;
at a tie torch splits the gradient between ``l1`` and the clamp's ``l2``, whose derivatives are
equal there, so the select gives the same gradient.

Selection scope (``cov_selection_scope``): ``"global"`` takes the covariance means and the token
pool over the whole arrays passed in (one device's micro-batch, as in the reference, or -- when
the arrays are sharded over a mesh under ``jit`` -- the global batch); ``"per_device"`` runs the
whole Clip-Cov/KL-Cov statistics and selection separately on each shard of the batch axis
(``jax.shard_map`` over ``cov_selection_axis`` of ``mesh``, key folded with the shard index).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from spear_jax.objectives import _checks
from spear_jax.objectives._elementwise import abs_, clamp, tie_split_min
from spear_jax.objectives._sharding import replicate_if_explicit

COV_SELECTION_SCOPES = ("global", "per_device")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Static options of the policy losses (validated at construction).

    Defaults are plain GRPO's (``eps_high=0.2``); Dr.BoT uses ``eps_high=0.28``.
    """

    loss_mode: str = "vanilla"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float | None = 10.0
    log_ratio_clamp: float = 20.0
    clamp_cov_log_ratio: bool = True
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    kl_cov_coef: float = 0.1
    cov_selection_scope: str = "global"
    cov_selection_axis: str = "data"

    def __post_init__(self):
        if self.loss_mode not in POLICY_LOSSES:
            raise ValueError(f"loss_mode must be one of {sorted(POLICY_LOSSES)}, got {self.loss_mode!r}")
        if not 0.0 < self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in (0, 1), got {self.eps_low}")
        if not self.eps_high > 0.0:
            raise ValueError(f"eps_high must be > 0, got {self.eps_high}")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1.0:
            raise ValueError(
                f"dual_clip_c must be > 1 (or None to disable dual clip), got {self.dual_clip_c}"
            )
        if not self.log_ratio_clamp > 0.0:
            raise ValueError(f"log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(
                f"clip_cov_lb must be < clip_cov_ub, got lb={self.clip_cov_lb}, ub={self.clip_cov_ub}"
            )
        if not self.kl_cov_coef >= 0.0:
            raise ValueError(f"kl_cov_coef must be >= 0, got {self.kl_cov_coef}")
        _checks.check_choice("cov_selection_scope", self.cov_selection_scope, COV_SELECTION_SCOPES)


# ------------------------------------------------------------------------------------------------
# Shared pieces


def check_token_inputs(logp, old_logp, advantages, mask) -> None:
    """Trace-time check that the four [B, T] token arrays agree; errors name the argument."""
    _checks.check_float("logp", logp)
    _checks.check_rank("logp", logp, 2)
    _checks.check_float("old_logp", old_logp, logp.shape)
    _checks.check_float("advantages", advantages, logp.shape)
    _checks.check_mask("mask", mask, logp.shape)


def _masked_mean(x, m):
    return jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def _clean_inputs(logp, old_logp, advantages, mask, clamp_bound: float | None):
    """float32 copies with masked positions zeroed (so no NaN/inf leaks into values or gradients)."""
    m = mask.astype(jnp.float32)
    valid = m > 0
    log_ratio = jnp.where(valid, logp.astype(jnp.float32) - old_logp.astype(jnp.float32), 0.0)
    if clamp_bound is not None:
        log_ratio = clamp(log_ratio, -clamp_bound, clamp_bound)
    adv = jnp.where(valid, advantages.astype(jnp.float32), 0.0)
    return log_ratio, adv, m, valid


def _ppo_surrogate(log_ratio, adv, config: PolicyLossConfig):
    """``max(l1, l2)`` written as a select, so a clipped token's loss is the constant ``l2``."""
    ratio = jnp.exp(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * clamp(ratio, 1.0 - config.eps_low, 1.0 + config.eps_high)
    clipped = l2 > l1
    return jnp.where(clipped, l2, l1), clipped


def _count_thresholds(ratio: float, max_count: int) -> np.ndarray:
    """``thresholds[j-1]`` = the smallest n with ``int(n * ratio) >= j`` (float64, as the reference
    computes ``int(len(valid) * ratio)``), for ``j = 1 .. int(max_count * ratio)``."""
    j = np.arange(1, int(max_count * ratio) + 1, dtype=np.int64)
    n = np.ceil(j / ratio).astype(np.int64)
    for _ in range(4):  # float rounding can put ceil(j / ratio) off by one in either direction
        n = np.where((n * ratio).astype(np.int64) < j, n + 1, n)
        n = np.where(((n - 1) * ratio).astype(np.int64) >= j, n - 1, n)
    return n


def _floor_count(ratio: float, n_valid, max_count: int):
    """``max(int(n_valid * ratio), 1)`` for a traced ``n_valid`` in ``[0, max_count]``, exact in
    float64 semantics without float64 on device (a search in host-computed thresholds)."""
    thresholds = jnp.asarray(_count_thresholds(ratio, max_count), jnp.int32)
    return jnp.maximum(jnp.searchsorted(thresholds, n_valid, side="right"), 1).astype(jnp.int32)


def _covariance(adv, logp, valid):
    """``(A - mean_V A) (logp - mean_V logp)`` with means over valid tokens; [B, T] (0 if invalid)."""
    m = valid.astype(jnp.float32)
    centred_a = adv - _masked_mean(adv, m)
    centred_logp = logp - _masked_mean(logp, m)
    return jnp.where(valid, centred_a * centred_logp, 0.0)


def _select_random(eligible, count, key):
    """Bool [B, T]: a uniformly random subset of ``eligible`` of size ``min(count, #eligible)``.

    The subset is the ``count`` smallest uniform keys among eligible tokens: ``lax.top_k`` with the
    static bound ``count.k_max``, then entries beyond the traced ``count.value`` are dropped.
    """
    flat = eligible.reshape(-1)
    u = jax.random.uniform(key, flat.shape)
    return _take_first(jnp.where(flat, -u, -2.0), flat, count).reshape(eligible.shape)


def _select_largest(values, eligible, count):
    """Bool [B, T]: the ``min(count, #eligible)`` eligible tokens with the largest ``values``."""
    flat = eligible.reshape(-1)
    return _take_first(jnp.where(flat, values.reshape(-1), -jnp.inf), flat, count).reshape(values.shape)


def _take_first(priority, eligible, count):
    """Mark the ``count`` eligible entries of highest ``priority`` ([S] arrays, S static)."""
    priority, eligible = replicate_if_explicit((priority, eligible))  # top_k over the whole pool
    k_max = int(count.k_max)
    _, idx = jax.lax.top_k(priority, k_max)
    take = (jnp.arange(k_max) < count.value) & eligible[idx]
    return jnp.zeros(priority.shape, bool).at[idx].set(take)


@dataclasses.dataclass(frozen=True)
class _Count:
    """How many tokens to select: a traced count and the static bound used for ``top_k``."""

    value: jax.Array  # traced int32
    k_max: int  # static upper bound


def _selection_count(ratio: float, valid) -> _Count:
    n_tokens = valid.size
    n_valid = jnp.sum(valid.astype(jnp.int32))
    k_max = min(max(int(n_tokens * ratio), 1), n_tokens)
    return _Count(_floor_count(ratio, n_valid, n_tokens), k_max)


def _local_clip_cov(adv, logp, valid, clipped, key, ratio, lb, ub):
    """One pool's Clip-Cov selection: returns (selected [B,T] bool, cov [B,T])."""
    cov = _covariance(adv, logp, valid)
    eligible = valid & ~clipped & (cov > lb) & (cov < ub)
    return _select_random(eligible, _selection_count(ratio, valid), key), cov


def _local_kl_cov(adv, logp, valid, ratio):
    """One pool's KL-Cov selection: returns (selected [B,T] bool, cov [B,T])."""
    cov = _covariance(adv, logp, valid)
    return _select_largest(cov, valid, _selection_count(ratio, valid)), cov


def _scoped(select, config: PolicyLossConfig, mesh, arrays, key):
    """Run ``select(*arrays, key)`` on the whole batch or on each shard of the batch axis.

    Under ``per_device`` each shard sees ``fold_in(key, shard_index)``.
    """
    if config.cov_selection_scope == "global":
        return select(*arrays, key)
    if mesh is None:
        raise ValueError("mesh is required when cov_selection_scope='per_device'")
    axis = config.cov_selection_axis
    if axis not in mesh.axis_names:
        raise ValueError(f"cov_selection_axis {axis!r} is not an axis of mesh {mesh.axis_names}")

    def per_shard(*args):
        *local, shard_key = args
        return select(*local, jax.random.fold_in(shard_key, jax.lax.axis_index(axis)))

    spec = P(axis)
    if axis in mesh.explicit_axes:  # explicit meshes need the inputs laid out as the specs say
        arrays = tuple(jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec)) for x in arrays)
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(spec,) * len(arrays) + (P(),), out_specs=(spec, spec)
    )(*arrays, key)


def _cov_metrics(cov, valid, selected):
    """The covariance statistics (scalars) and the selection mask ``cov_selected`` [B, T] bool."""
    m = valid.astype(jnp.float32)
    return {
        "cov_mean": _masked_mean(cov, m),
        "cov_max": jnp.where(jnp.any(valid), jnp.max(jnp.where(valid, cov, -jnp.inf)), 0.0),
        "cov_num_selected": jnp.sum(selected.astype(jnp.int32)),
        "cov_selected_fraction": _masked_mean(selected.astype(jnp.float32), m),
        "cov_selected": selected,
    }


# ------------------------------------------------------------------------------------------------
# Losses


def vanilla_policy_loss(config: PolicyLossConfig, *, logp, old_logp, advantages, mask, key=None, mesh=None):
    """PPO clipped surrogate with asymmetric clip and dual clip (see module docstring).

    Args:
      config: the loss options (static).
      logp, old_logp, advantages: [B, T] float; mask: [B, T] 0/1. ``key``/``mesh`` unused.

    Returns (loss [B, T] float32, metrics: pg_clipfrac, pg_clipfrac_lower, ppo_kl).
    """
    del key, mesh
    check_token_inputs(logp, old_logp, advantages, mask)
    log_ratio, adv, m, valid = _clean_inputs(logp, old_logp, advantages, mask, config.log_ratio_clamp)
    surrogate, clipped = _ppo_surrogate(log_ratio, adv, config)
    loss, dual = surrogate, jnp.zeros_like(clipped)
    if config.dual_clip_c is not None:
        l3 = -adv * config.dual_clip_c
        dual = (adv < 0) & (surrogate > l3)
        loss = jnp.where(adv < 0, tie_split_min(surrogate, l3), surrogate)
    metrics = {
        "pg_clipfrac": _masked_mean(clipped.astype(jnp.float32), m),
        "pg_clipfrac_lower": _masked_mean(dual.astype(jnp.float32), m),
        "ppo_kl": _masked_mean(-log_ratio, m),
    }
    return jnp.where(valid, loss, 0.0), metrics


def clip_cov_policy_loss(config: PolicyLossConfig, *, logp, old_logp, advantages, mask, key=None, mesh=None):
    """Clip-Cov: ``max(l1, l2) * (1 - selected)`` with a random covariance-band token subset.

    Args:
      config: the loss options (static).
      logp, old_logp, advantages: [B, T] float; mask: [B, T] 0/1.
      key: PRNG key driving the selection (required).
      mesh: required for ``cov_selection_scope='per_device'``.

    Returns (loss [B, T] float32, metrics: pg_clipfrac (PPO-clipped fraction), pg_clipfrac_lower
    (always 0), ppo_kl, cov_mean, cov_max, cov_num_selected, cov_selected_fraction -- what the
    reference logs as ``pg_clipfrac`` in this mode -- and cov_selected, the [B, T] bool mask of
    the zeroed tokens).
    """
    if key is None:
        raise ValueError("key (a PRNG key) is required for loss_mode='clip_cov'")
    check_token_inputs(logp, old_logp, advantages, mask)
    bound = config.log_ratio_clamp if config.clamp_cov_log_ratio else None
    log_ratio, adv, m, valid = _clean_inputs(logp, old_logp, advantages, mask, bound)
    surrogate, clipped = _ppo_surrogate(log_ratio, adv, config)
    sg_logp = jax.lax.stop_gradient(jnp.where(valid, logp.astype(jnp.float32), 0.0))

    def select(a, lp, v, c, k):
        return _local_clip_cov(a, lp, v, c, k, config.clip_cov_ratio, config.clip_cov_lb, config.clip_cov_ub)

    selected, cov = _scoped(select, config, mesh, (adv, sg_logp, valid, clipped), key)
    loss = jnp.where(valid & ~selected, surrogate, 0.0)
    metrics = {
        "pg_clipfrac": _masked_mean(clipped.astype(jnp.float32), m),
        "pg_clipfrac_lower": jnp.float32(0.0),
        "ppo_kl": _masked_mean(-log_ratio, m),
        **_cov_metrics(cov, valid, selected),
    }
    return loss, metrics


def kl_cov_policy_loss(config: PolicyLossConfig, *, logp, old_logp, advantages, mask, key=None, mesh=None):
    """KL-Cov: ``-A r`` everywhere, ``+ kl_cov_coef * |lr|`` on the top-covariance tokens.

    Args:
      config: the loss options (static).
      logp, old_logp, advantages: [B, T] float; mask: [B, T] 0/1. ``key`` unused (deterministic).
      mesh: required for ``cov_selection_scope='per_device'``.

    Returns (loss [B, T] float32, metrics: pg_clipfrac (0: no clipping), pg_clipfrac_lower (0),
    ppo_kl (masked mean of |lr|, as the reference logs it), cov_mean, cov_max, cov_num_selected,
    cov_selected_fraction, and cov_selected, the [B, T] bool mask of the penalised tokens).
    """
    del key
    check_token_inputs(logp, old_logp, advantages, mask)
    bound = config.log_ratio_clamp if config.clamp_cov_log_ratio else None
    log_ratio, adv, m, valid = _clean_inputs(logp, old_logp, advantages, mask, bound)
    sg_logp = jax.lax.stop_gradient(jnp.where(valid, logp.astype(jnp.float32), 0.0))

    def select(a, lp, v, unused_key):
        del unused_key  # the top-covariance choice is deterministic
        return _local_kl_cov(a, lp, v, config.kl_cov_ratio)

    selected, cov = _scoped(select, config, mesh, (adv, sg_logp, valid), jax.random.key(0))
    abs_kl = abs_(log_ratio)
    loss = -adv * jnp.exp(log_ratio) + jnp.where(selected, config.kl_cov_coef * abs_kl, 0.0)
    metrics = {
        "pg_clipfrac": jnp.float32(0.0),
        "pg_clipfrac_lower": jnp.float32(0.0),
        "ppo_kl": _masked_mean(abs_kl, m),
        **_cov_metrics(cov, valid, selected),
    }
    return jnp.where(valid, loss, 0.0), metrics


PolicyLoss = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

POLICY_LOSSES: dict[str, PolicyLoss] = {
    "vanilla": vanilla_policy_loss,
    "clip_cov": clip_cov_policy_loss,
    "kl_cov": kl_cov_policy_loss,
}


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered under ``name``; unknown names raise listing the valid ones."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]
