"""Attention kernels: the grouped layout equals a per-head reference; the causal block split
equals full attention for every valid query, in value and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.model import layers
from spear_jax.model.layers import causal_attention, grouped_attention


def _reference(q, k, v, mask):
    """Per query head h: softmax(q_h k_{h // G}^T / sqrt(hd) masked) v_{h // G}, in float64."""
    q, k, v, mask = (np.asarray(a, np.float64 if a.dtype != bool else bool) for a in (q, k, v, mask))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scores = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", probs, v)


def _inputs(length, b=3, h=4, kvh=2, hd=8):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, length, h, hd))
    k = jax.random.normal(keys[1], (b, length, kvh, hd))
    v = jax.random.normal(keys[2], (b, length, kvh, hd))
    # Row 0 full, row 1 left-padded, row 2 right-padded; the mask the transformer builds.
    starts, ends = np.array([0, length // 3, 0]), np.array([length, length, length - length // 4])
    slots = np.arange(length)
    valid = (slots[None] >= starts[:, None]) & (slots[None] < ends[:, None])
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    mask = valid[:, None, :] & (positions[:, None, :] <= positions[:, :, None])
    return q, k, v, jnp.asarray(mask), valid


def test_grouped_attention_equals_per_head_reference():
    q, k, v, mask, valid = _inputs(12)
    got = np.asarray(grouped_attention(q, k, v, mask))
    want = _reference(q, k, v, np.asarray(mask))
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5)


@pytest.mark.parametrize("length,min_block", [(40, 8), (37, 8), (40, 64)])
def test_causal_blocks_equal_full_attention_at_valid_queries(monkeypatch, length, min_block):
    """Values and gradients (through valid queries only, as in the model) match; 37 leaves a
    ragged last block; with blocks of at least 64 the split is a single full block."""
    monkeypatch.setattr(layers, "CAUSAL_MIN_BLOCK", min_block)
    q, k, v, mask, valid = _inputs(length)
    weights = jax.random.normal(jax.random.key(1), q.shape) * valid[:, :, None, None]

    def loss(attention):
        return lambda q, k, v: jnp.sum(weights * attention(q, k, v, mask))

    np.testing.assert_allclose(np.asarray(causal_attention(q, k, v, mask))[valid],
                               np.asarray(grouped_attention(q, k, v, mask))[valid], atol=1e-6)
    got = jax.grad(loss(causal_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(grouped_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert np.isfinite(np.asarray(causal_attention(q, k, v, mask))).all()


def test_causal_blocks_skip_the_keys_above_the_diagonal(monkeypatch):
    """Four blocks of 10 queries: the score matmuls cover keys 10 + 20 + 30 + 40, not 4 x 40."""
    monkeypatch.setattr(layers, "CAUSAL_MIN_BLOCK", 8)
    q, k, v, mask, _ = _inputs(40)
    jaxpr = jax.make_jaxpr(causal_attention)(q, k, v, mask).jaxpr
    scores = [e.outvars[0].aval.shape for e in jaxpr.eqns
              if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] != q.shape[-1]]
    assert sorted(shape[-1] for shape in scores) == [10, 20, 30, 40]


def test_attention_softmax_and_its_gradient_equal_jax_nn_softmax():
    """``layers._softmax`` (custom gradient p * (g - sum(g p))) against ``jax.nn.softmax``, on
    rows with masked scores (the float32 minimum, as attention writes them) and a row masked
    whole (a uniform average)."""
    scores = jax.random.normal(jax.random.key(2), (3, 5, 7)) * 4
    masked = jnp.zeros(scores.shape, bool).at[0, :, 4:].set(True).at[1, 2].set(True)
    scores = jnp.where(masked, jnp.finfo(jnp.float32).min, scores)
    cotangent = jax.random.normal(jax.random.key(3), scores.shape)
    np.testing.assert_allclose(layers._softmax(scores), jax.nn.softmax(scores), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layers._softmax(scores)[1, 2], np.full(7, 1 / 7), rtol=1e-6)
    got = jax.vjp(layers._softmax, scores)[1](cotangent)[0]
    want = jax.vjp(jax.nn.softmax, scores)[1](cotangent)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(got))) > 0.1
