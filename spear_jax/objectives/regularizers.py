"""Per-token regularisers: KL penalty estimators to a reference policy, and the entropy bonus.

With ``d = logp - ref_logp`` per token:

* ``k1`` (``kl``, the reference's name): ``d``
* ``abs``:         ``|d|`` (derivative ``sign(d)``: 0 at ``d = 0``, as ``torch.abs``)
* ``k2`` (``mse``): ``0.5 d^2``
* ``low_var_kl`` (``k3``): ``exp(-d) - (-d) - 1 = exp(ref - logp) - (ref - logp) - 1``, clamped to
  ``[-10, 10]`` (as ``torch.clamp`` in the reference: gradient passed on ``[-10, 10]``, bounds
  included, and cut outside).

Entropy bonus per token: ``-coef * H_t``, with ``H_t`` from
:func:`spear_jax.objectives.token_stats.token_entropy` (or ``token_logprobs_and_entropy``).
"""
from __future__ import annotations

import jax.numpy as jnp

from spear_jax.objectives import _checks
from spear_jax.objectives._elementwise import abs_, clamp

KL_PENALTIES = ("k1", "kl", "abs", "k2", "mse", "low_var_kl", "k3")


def kl_penalty(logp, ref_logp, kind: str = "low_var_kl"):
    """Per-token KL estimate of the policy to the reference policy.

    Args:
      logp: [B, T] float current-policy log-probs.
      ref_logp: [B, T] float reference-policy log-probs.
      kind: one of ``KL_PENALTIES`` (see the module docstring).

    Returns [B, T] float32.
    """
    _checks.check_choice("kind", kind, KL_PENALTIES)
    _checks.check_float("logp", logp)
    _checks.check_float("ref_logp", ref_logp, jnp.shape(logp))
    d = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    if kind in ("k1", "kl"):
        return d
    if kind == "abs":
        return abs_(d)
    if kind in ("k2", "mse"):
        return 0.5 * d * d
    return clamp(jnp.exp(-d) + d - 1.0, -10.0, 10.0)


def entropy_bonus(entropy, coef: float):
    """Per-token entropy bonus term of the loss: ``-coef * H_t`` ([B, T] -> [B, T] float32)."""
    _checks.check_float("entropy", entropy)
    return -coef * entropy.astype(jnp.float32)
