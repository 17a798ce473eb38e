"""Key/value cache for incremental decoding: a functional pytree, donation-friendly.

Row ``b`` holds ``lengths[b]`` valid positions in slots ``[0, lengths[b])`` of every layer; slot
``t`` holds the (RoPE-rotated) key and the value of the token at position ``t`` of that row.
A forward with a cache appends each row's valid new tokens at slots ``lengths[b], ...`` and
returns a new cache; jit the caller with ``donate_argnames=("cache",)`` so XLA updates the
buffers in place.

The buffers are stacked over layers, [num_layers, batch, max_len, kv_heads, head_dim], like the
blocks' weights: the scanned forward carries them through its ``lax.scan`` and writes layer
``i``'s new keys and values into slice ``i`` in place.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from spear_jax.model.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: [num_layers, batch, max_len, kv_heads, head_dim]; lengths: [batch] int32."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def map_buffers(self, fn) -> "KVCache":
        """The cache with ``fn`` applied to the stacked k and v buffers (same lengths)."""
        return KVCache(k=fn(self.k), v=fn(self.v), lengths=self.lengths)

    def layer(self, layer) -> tuple[jax.Array, jax.Array]:
        """(k, v) [B, max_len, KVH, hd] of ``layer`` (a Python int or a traced int32 scalar)."""
        return (jax.lax.dynamic_index_in_dim(self.k, layer, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.v, layer, keepdims=False))

    def write(self, layer, k_new: jax.Array, v_new: jax.Array, slots: jax.Array) -> "KVCache":
        """Store k_new, v_new [B, L, KVH, hd] of ``layer`` (int or traced int32 scalar) at
        ``slots`` [B, L]; slots >= max_len (used for padding tokens) are dropped. ``lengths`` is
        not changed."""
        rows = jnp.broadcast_to(jnp.arange(slots.shape[0])[:, None], slots.shape)

        def store(buffer, new):
            return buffer.at[layer, rows, slots].set(new.astype(buffer.dtype), mode="drop")

        return KVCache(k=store(self.k, k_new), v=store(self.v, v_new), lengths=self.lengths)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Empty cache (all lengths 0) for ``batch_size`` rows of up to ``max_len`` tokens."""
    if batch_size <= 0 or max_len <= 0:
        raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
    shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch_size,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """A cache window held as one head-major buffer per layer (the decode loop's form of
    ``KVCache``).

    k: tuple of ``num_layers`` arrays [batch, kv_heads, head_dim, window] (slot-minor); v: tuple
    of ``num_layers`` arrays [batch, kv_heads, window, head_dim]; lengths: [batch] int32. (The
    decode step's layer scan carries the same layouts stacked instead: k [num_layers, batch,
    kv_heads, head_dim, window] and v [num_layers, batch, kv_heads, window, head_dim], one array
    each, ``split_layers(..., stacked=True)``.) In the per-layer form layer i's attention reads
    and writes its own buffers only, so a step neither slices a layer out of a stacked array
    nor writes one back into it. In both, each (row, kv head) holds its keys as one
    contiguous [head_dim, window] matrix and its values as one [window, head_dim] matrix: the
    right-hand operands of the scores' q K and the output's p V, both in the plain
    [m, k] x [k, n] form (XLA:CPU ran q K^T over [window, head_dim] keys about 2x slower)."""

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    lengths: jax.Array

    @property
    def stacked(self) -> bool:
        """Whether k and v are one array each, stacked over the layers (else a tuple of layers)."""
        return not isinstance(self.k, tuple)

    @property
    def window(self) -> int:
        return self.v.shape[3] if self.stacked else self.v[0].shape[2]


KEY_FROM_TOKEN_MAJOR = (0, 2, 3, 1)    # [B, S, KVH, hd] -> LayerKV's key [B, KVH, hd, S]
VALUE_FROM_TOKEN_MAJOR = (0, 2, 1, 3)  # [B, S, KVH, hd] -> LayerKV's value [B, KVH, S, hd]


def split_layers(cache: KVCache, window: int, stacked: bool = False) -> LayerKV:
    """The first ``window`` slots of every layer of ``cache`` as one head-major buffer per layer,
    keys slot-minor and values feature-minor (a transposed copy, made once per call); or
    (``stacked``) the same layouts stacked over the layers, one array each for k and v."""
    def layers(x, axes):
        if stacked:
            return x[:, :, :window].transpose((0, *(a + 1 for a in axes)))
        return tuple(x[i, :, :window].transpose(axes) for i in range(cache.num_layers))

    return LayerKV(k=layers(cache.k, KEY_FROM_TOKEN_MAJOR), v=layers(cache.v, VALUE_FROM_TOKEN_MAJOR),
                   lengths=cache.lengths)


def merge_layers(full: KVCache, window: LayerKV) -> KVCache:
    """``full`` with the first ``window.window`` slots of every layer replaced by ``window``'s
    buffers, transposed back to token-major (in place when ``full`` is donated), lengths taken
    from ``window``."""
    def put(stacked, layers, axes):
        back = tuple(int(a) for a in np.argsort(axes))
        if window.stacked:
            return jax.lax.dynamic_update_slice(
                stacked, layers.transpose((0, *(a + 1 for a in back))).astype(stacked.dtype), (0,) * 5)
        for i, part in enumerate(layers):
            part = part.transpose(back)[None].astype(stacked.dtype)
            stacked = jax.lax.dynamic_update_slice(stacked, part, (i, 0, 0, 0, 0))
        return stacked

    return KVCache(k=put(full.k, window.k, KEY_FROM_TOKEN_MAJOR), v=put(full.v, window.v, VALUE_FROM_TOKEN_MAJOR),
                   lengths=window.lengths)
