"""Helpers for arrays on meshes with explicit axis types (``jax.make_mesh``'s default).

Under explicit sharding some operations (``lax.top_k`` along a sharded axis, scatters with sharded
indices such as ``segment_sum``) refuse to pick an output layout. The objectives that need a whole
pool (global Clip-Cov selection, group statistics over rows) replicate such inputs first; with
automatic sharding or on one device these helpers are no-ops.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P


def is_explicitly_sharded(x) -> bool:
    """True for an array whose type carries a sharded axis (a mesh with explicit axis types)."""
    return any(axis is not None for axis in jax.typeof(x).sharding.spec)


def replicate_if_explicit(tree):
    """Reshard every explicitly sharded array leaf of ``tree`` to fully replicated."""
    return jax.tree.map(lambda x: jax.sharding.reshard(x, P()) if is_explicitly_sharded(x) else x, tree)
