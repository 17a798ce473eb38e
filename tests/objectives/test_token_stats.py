import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.objectives import token_stats


def _numpy_reference(logits, ids, temperature):
    z = logits.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp_all, ids[..., None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    return picked, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.4, 1.7])
def test_matches_numpy_reference(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 4
    ids = rng.integers(0, 11, size=(3, 5))
    want_logp, want_h = _numpy_reference(logits, ids, temperature)
    logp, h = token_stats.token_logprobs_and_entropy(jnp.asarray(logits), jnp.asarray(ids), temperature)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(token_stats.token_logprobs(jnp.asarray(logits), jnp.asarray(ids), temperature), want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(token_stats.token_entropy(jnp.asarray(logits), temperature), want_h, rtol=1e-5, atol=1e-5)


def test_uniform_logits_have_entropy_log_vocab():
    h = token_stats.token_entropy(jnp.zeros((2, 7, 50)))
    np.testing.assert_allclose(h, np.full((2, 7), np.log(50)), rtol=1e-6)


def test_bf16_logits_computed_in_float32():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 9)), jnp.bfloat16)
    logp, h = token_stats.token_logprobs_and_entropy(logits, jnp.zeros(4, jnp.int32))
    assert logp.dtype == jnp.float32 and h.dtype == jnp.float32


def test_gradient_of_logprob_is_onehot_minus_softmax():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(6,)), jnp.float32)
    grad = jax.grad(lambda z: token_stats.token_logprobs(z[None], jnp.array([2]))[0])(logits)
    want = -jax.nn.softmax(logits)
    want = want.at[2].add(1.0)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def test_bad_shapes_and_temperature_raise():
    with pytest.raises(ValueError, match="token_ids shape"):
        token_stats.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="temperature"):
        token_stats.token_entropy(jnp.zeros((2, 5)), temperature=0.0)


def test_target_logit_is_gathered_and_its_gradient_is_a_select_not_a_scatter():
    """The forward gathers the target's logit (no pass over the vocabulary); the backward is the
    elementwise select [v = y] g, not a scatter into the vocabulary, and equals the masked sum's."""
    logits = jax.random.normal(jax.random.key(0), (3, 5, 11))
    ids = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    for fn in (lambda z: token_stats.token_logprobs_and_entropy(z, ids)[0],
               lambda z: token_stats.token_logprobs(z, ids)):
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda z, fn=fn: jnp.sum(fn(z))))(logits))
        assert "scatter" not in jaxpr and jaxpr.count("gather[") == 1
    masked_sum = lambda z: jnp.sum(jnp.where(jnp.arange(11) == ids[..., None], z, 0.0), axis=-1)
    weights = jax.random.normal(jax.random.key(2), (3, 5))
    np.testing.assert_array_equal(token_stats._picked(logits, ids), masked_sum(logits))
    np.testing.assert_array_equal(jax.grad(lambda z: jnp.sum(weights * token_stats._picked(z, ids)))(logits),
                                  jax.grad(lambda z: jnp.sum(weights * masked_sum(z)))(logits))
