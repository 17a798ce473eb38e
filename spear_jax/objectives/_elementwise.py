"""Elementwise functions with the reference's (PyTorch's) gradients at their kinks.

JAX and PyTorch agree on values but not on derivatives at non-differentiable points:

* ``jnp.clip(x, lo, hi)`` = ``minimum(maximum(x, lo), hi)`` splits the gradient at a tie, so at
  ``x == lo`` or ``x == hi`` it passes 1/2; ``torch.clamp`` passes 1 on ``[lo, hi]`` (bounds
  included) and 0 outside. :func:`clamp` has torch's gradient.
* ``jnp.abs`` has derivative 1 at 0; ``torch.abs`` has ``sign(x)``, 0 at 0. :func:`abs_` has
  torch's derivative.
* ``torch.minimum`` / ``torch.maximum`` give each argument half the gradient at a tie;
  :func:`tie_split_min` reproduces that for a minimum against a constant.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def clamp(x, lo: float, hi: float):
    """``min(max(x, lo), hi)``; d/dx = 1 for ``lo <= x <= hi``, 0 outside (``torch.clamp``).

    NaN stays NaN (as in torch). x: any shape, float.
    """
    return jnp.where(x < lo, lo, jnp.where(x > hi, hi, x))


def abs_(x):
    """``|x|`` with d/dx = ``sign(x)`` (0 at ``x == 0``, as ``torch.abs``). x: any shape, float."""
    return jnp.sign(x) * x


def tie_split_min(x, bound):
    """``min(x, bound)`` for a ``bound`` that carries no gradient, with ``torch.minimum``'s
    derivative: 1 where ``x < bound``, 1/2 where ``x == bound``, 0 where ``x > bound``.

    x, bound: broadcastable float arrays; the value is exactly ``min(x, bound)``.
    """
    bound = jax.lax.stop_gradient(bound)
    tie = x == bound
    half = 0.5 * x + jax.lax.stop_gradient(0.5 * x)  # value x, gradient 1/2
    return jnp.where(x < bound, x, jnp.where(tie, half, bound))
