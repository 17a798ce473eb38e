"""Trace-time argument checks shared by the objectives.

They look only at static facts (shape, dtype), so they cost nothing under ``jax.jit`` and raise a
``ValueError`` / ``TypeError`` that names the offending argument.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp


def check_float(name: str, x, shape: Sequence[int] | None = None) -> None:
    """Require a floating array (optionally of ``shape``)."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {dtype}")
    check_shape(name, x, shape)


def check_int(name: str, x, shape: Sequence[int] | None = None) -> None:
    """Require an integer array (optionally of ``shape``)."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array of ids, got dtype {dtype}")
    check_shape(name, x, shape)


def check_mask(name: str, x, shape: Sequence[int] | None = None) -> None:
    """Require a bool, integer or floating 0/1 mask (optionally of ``shape``)."""
    dtype = jnp.result_type(x)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.number)):
        raise TypeError(f"{name} must be a bool or numeric 0/1 mask, got dtype {dtype}")
    check_shape(name, x, shape)


def check_shape(name: str, x, shape: Sequence[int] | None) -> None:
    if shape is not None and tuple(jnp.shape(x)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(jnp.shape(x))}")


def check_rank(name: str, x, rank: int) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(jnp.shape(x))}")


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive Python int (a static size), got {value!r}")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
