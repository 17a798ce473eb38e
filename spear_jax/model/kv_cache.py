"""Key/value cache for incremental decoding: a functional pytree, donation-friendly.

Row ``b`` holds ``lengths[b]`` valid positions in slots ``[0, lengths[b])`` of every layer; slot
``t`` holds the (RoPE-rotated) key and the value of the token at position ``t`` of that row.

Layout: one buffer per layer (``k[layer]``, ``v[layer]``), each ``[batch, kv_heads, slots,
head_dim]`` (head-major). A layer's attention reads its own buffer whole, so no per-step slice
of a stacked array is materialised, and one (row, kv head) is a contiguous [slots, head_dim]
matrix, the operand layout of a decode step's q k^T and p v (no transposing copy).

A forward with a cache appends each row's valid new tokens at slots ``lengths[b], ...`` and
returns a new cache; jit the caller with ``donate_argnames=("cache",)`` so XLA updates the
buffers in place.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spear_jax.model.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: tuples of ``layers`` arrays [batch, kv_heads, max_len, head_dim]; lengths: [batch] int32."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def stacked(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) as [layers, batch, kv_heads, max_len, head_dim] arrays (a copy; for inspection)."""
        return jnp.stack(self.k), jnp.stack(self.v)

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, slots: jax.Array) -> "KVCache":
        """Store k_new, v_new [B, L, KVH, hd] of ``layer`` at ``slots`` [B, L]; slots >= max_len
        (used for padding tokens) are dropped. ``lengths`` is not changed."""
        rows = jnp.broadcast_to(jnp.arange(slots.shape[0])[:, None], slots.shape)

        def put(buffers, new):
            # the advanced indices (rows, slots) around the kv-head slice index [B, L, KVH, hd]
            updated = buffers[layer].at[rows, :, slots].set(new.astype(buffers[layer].dtype), mode="drop")
            return buffers[:layer] + (updated,) + buffers[layer + 1:]

        return KVCache(k=put(self.k, k_new), v=put(self.v, v_new), lengths=self.lengths)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Empty cache (all lengths 0) for ``batch_size`` rows of up to ``max_len`` tokens."""
    if batch_size <= 0 or max_len <= 0:
        raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
    shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )
