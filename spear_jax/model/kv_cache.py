"""Key/value cache for incremental decoding: a functional pytree, donation-friendly.

Row ``b`` holds ``lengths[b]`` valid positions in slots ``[0, lengths[b])`` of every layer; slot
``t`` holds the (RoPE-rotated) key and the value of the token at position ``t`` of that row.
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
    """k, v: tuples of one [batch, max_len, kv_heads, head_dim] buffer per layer; lengths:
    [batch] int32. One buffer per layer (not a stacked [layers, ...] array) so that a layer's
    write and its attention read touch that buffer only: slicing a layer out of a stacked
    cache makes XLA copy it every decode step."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def map_buffers(self, fn) -> "KVCache":
        """The cache with ``fn`` applied to every layer's k and v buffer (same lengths)."""
        return KVCache(k=tuple(map(fn, self.k)), v=tuple(map(fn, self.v)), lengths=self.lengths)

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, slots: jax.Array) -> "KVCache":
        """Store k_new, v_new [B, L, KVH, hd] of ``layer`` at ``slots`` [B, L]; slots >= max_len
        (used for padding tokens) are dropped. ``lengths`` is not changed."""
        rows = jnp.broadcast_to(jnp.arange(slots.shape[0])[:, None], slots.shape)

        def store(buffers, new):
            updated = buffers[layer].at[rows, slots].set(new.astype(buffers[layer].dtype), mode="drop")
            return buffers[:layer] + (updated,) + buffers[layer + 1:]

        return KVCache(k=store(self.k, k_new), v=store(self.v, v_new), lengths=self.lengths)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Empty cache (all lengths 0) for ``batch_size`` rows of up to ``max_len`` tokens."""
    if batch_size <= 0 or max_len <= 0:
        raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
    shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )
