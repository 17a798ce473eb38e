"""The decode loop's per-layer, head-major form of a cache window, and its write-back."""
import jax
import jax.numpy as jnp
import numpy as np

from spear_jax.model.kv_cache import KVCache, merge_layers, split_layers


def _cache(layers=3, batch=2, slots=10, kv_heads=2, head_dim=4):
    k_key, v_key = jax.random.split(jax.random.key(0))
    shape = (layers, batch, slots, kv_heads, head_dim)
    return KVCache(k=jax.random.normal(k_key, shape), v=jax.random.normal(v_key, shape),
                   lengths=jnp.array([3, 6], jnp.int32))


def test_split_layers_holds_each_layer_head_major_keys_slot_minor():
    cache = _cache()
    layers = split_layers(cache, window=8)
    assert layers.window == 8 and len(layers.k) == cache.num_layers and not layers.stacked
    stacked = split_layers(cache, window=8, stacked=True)
    assert stacked.stacked and stacked.window == 8 and stacked.k.shape == (3, 2, 2, 4, 8)
    for i in range(cache.num_layers):
        assert layers.k[i].shape == (2, 2, 4, 8)               # [batch, kv heads, head_dim, window]
        assert layers.v[i].shape == (2, 2, 8, 4)               # [batch, kv heads, window, head_dim]
        np.testing.assert_array_equal(layers.k[i], np.asarray(cache.k[i, :, :8]).transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(layers.v[i], np.asarray(cache.v[i, :, :8]).transpose(0, 2, 1, 3))


def test_merge_layers_writes_the_window_back_and_leaves_the_rest():
    cache = _cache()
    layers = split_layers(cache, window=8)
    changed = jax.tree.map(lambda x: x + 1.0, layers.k)
    merged = merge_layers(cache, type(layers)(k=changed, v=layers.v, lengths=layers.lengths + 1))
    np.testing.assert_array_equal(merged.k[:, :, :8], np.asarray(cache.k[:, :, :8]) + 1.0)
    np.testing.assert_array_equal(merged.k[:, :, 8:], cache.k[:, :, 8:])     # beyond the window
    np.testing.assert_array_equal(merged.v, cache.v)
    np.testing.assert_array_equal(merged.lengths, [4, 7])
    roundtrip = merge_layers(cache, split_layers(cache, window=8))
    np.testing.assert_array_equal(roundtrip.k, cache.k)
