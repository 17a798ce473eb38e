import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.objectives.aggregation import AGGREGATION_MODES, AggregationConfig, aggregate, finalize

# ------------------------------------------------------------------------------------------------
# numpy references


def np_exact(loss, mask, mode, t_norm):
    lm = np.where(mask > 0, loss, 0.0) * mask
    rows = loss.shape[0]
    if mode == "token-mean":
        return lm.sum(), mask.sum()
    if mode == "seq-mean-token-sum":
        return lm.sum(), rows
    if mode == "seq-mean-token-mean":
        keep = mask.sum(1) > 0
        return (lm.sum(1)[keep] / mask.sum(1)[keep]).sum(), keep.sum()
    return lm.sum(), rows * t_norm


def np_reference_value(loss, mask, mode, t_norm):
    """SPEAR's agg_loss on one micro-batch (rows with empty masks left out of seq-mean-token-mean)."""
    lm = np.where(mask > 0, loss, 0.0) * mask
    if mode == "token-mean":
        return lm.sum() / (mask.sum() + 1e-8)
    if mode == "seq-mean-token-sum":
        return lm.sum(1).mean()
    if mode == "seq-mean-token-mean":
        keep = mask.sum(1) > 0
        return (lm.sum(1)[keep] / mask.sum(1)[keep]).mean()
    return lm.sum() / t_norm


def random_case(seed, b=8, t=7):
    rng = np.random.default_rng(seed)
    loss = rng.normal(size=(b, t))
    mask = (rng.random((b, t)) < 0.7).astype(np.float64)
    mask[rng.integers(b)] = 0.0
    loss[mask == 0] = np.nan  # values at masked tokens must be ignored
    return loss, mask


@functools.lru_cache(maxsize=None)
def jitted(config):
    return jax.jit(lambda loss, mask: aggregate(loss, mask, config))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(AGGREGATION_MODES),
                  accumulation=st.sampled_from(["exact", "reference_fixed", "reference_dynamic"]))
def test_matches_numpy(seed, mode, accumulation):
    loss, mask = random_case(seed)
    cfg = AggregationConfig(mode, norm_length=16, accumulation=accumulation, grad_accum_steps=4,
                            mini_batch_rows=32)
    got_sum, got_norm = jitted(cfg)(jnp.asarray(loss, jnp.float32), jnp.asarray(mask, jnp.float32))
    if accumulation == "exact":
        want_sum, want_norm = np_exact(loss, mask, mode, 16)
    else:
        scale = 1 / 4 if accumulation == "reference_fixed" else 8 / 32
        want_sum, want_norm = np_reference_value(loss, mask, mode, 16) * scale, scale
    np.testing.assert_allclose([got_sum, got_norm], [want_sum, want_norm], rtol=1e-5, atol=1e-6)


@functools.lru_cache(maxsize=None)
def sum_norm_and_grad(config):
    """(sum, normaliser) and d sum / d loss: what every upstream gradient flows through."""
    return jax.jit(lambda l, m: (aggregate(l, m, config), jax.grad(lambda x: aggregate(x, m, config)[0])(l)))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(AGGREGATION_MODES),
                  split=st.sampled_from([(8,), (4, 4), (2, 2, 4), (1, 3, 4), (3, 5)]))
def test_exact_accumulation_over_micro_batches_equals_full_batch(seed, mode, split):
    loss, mask = random_case(seed)
    loss = np.nan_to_num(loss)
    fn = sum_norm_and_grad(AggregationConfig(mode, norm_length=16))
    (full_sum, full_norm), full_grad = fn(jnp.asarray(loss, jnp.float32), jnp.asarray(mask, jnp.float32))
    sums, norms, grads = [], [], []
    start = 0
    for size in split:
        (s, n), g = fn(jnp.asarray(loss[start:start + size], jnp.float32),
                       jnp.asarray(mask[start:start + size], jnp.float32))
        sums.append(s)
        norms.append(n)
        grads.append(g)
        start += size
    total_norm = sum(norms)
    np.testing.assert_allclose(total_norm, full_norm, rtol=1e-6)
    np.testing.assert_allclose(finalize(sum(sums), total_norm), finalize(full_sum, full_norm), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(grads) / total_norm, full_grad / full_norm, rtol=1e-5, atol=1e-7)


def agg(loss, mask, **kw):
    return aggregate(jnp.asarray(loss, jnp.float32), jnp.asarray(mask, jnp.float32), AggregationConfig(**kw))


def test_token_mean_single_row_is_mean_of_valid_tokens():
    s, n = agg([[1.0, 2.0, 6.0, 100.0]], [[1, 1, 1, 0]], mode="token-mean")
    assert float(finalize(s, n)) == pytest.approx(3.0)
    s, n = agg([[1.0, 2.0, 6.0, 100.0]], [[1, 1, 1, 0]], mode="token-mean", accumulation="reference_fixed")
    assert float(finalize(s, n)) == pytest.approx(3.0)


def test_seq_mean_token_sum_norm_checklist():
    one_row = np.zeros((1, 512))
    one_row[0, :3] = 1.0
    for accumulation in ("exact", "reference_fixed"):
        s, n = agg(np.ones((1, 512)), one_row, mode="seq-mean-token-sum-norm", accumulation=accumulation)
        assert float(finalize(s, n)) == pytest.approx(3 / 512)
    two_rows = np.concatenate([one_row, one_row])
    s, n = agg(np.ones((2, 512)), two_rows, mode="seq-mean-token-sum-norm", accumulation="reference_fixed")
    assert float(finalize(s, n)) == pytest.approx(6 / 512)  # reference: sum over rows
    s, n = agg(np.ones((2, 512)), two_rows, mode="seq-mean-token-sum-norm")
    assert float(finalize(s, n)) == pytest.approx(3 / 512)  # exact: mean over rows


def test_norm_length_overrides_padded_length():
    s, n = agg(np.ones((1, 8)), np.ones((1, 8)), mode="seq-mean-token-sum-norm", norm_length=512)
    assert float(finalize(s, n)) == pytest.approx(8 / 512)


def test_reference_gradient_accumulation_scaling():
    loss, mask = np.ones((2, 4)), np.ones((2, 4))
    s, n = agg(loss, mask, mode="token-mean", accumulation="reference_fixed", grad_accum_steps=4)
    assert float(s) == pytest.approx(1 / 4) and float(n) == pytest.approx(1 / 4)
    s, n = agg(loss, mask, mode="token-mean", accumulation="reference_dynamic", mini_batch_rows=8)
    assert float(s) == pytest.approx(2 / 8) and float(n) == pytest.approx(2 / 8)
    # four fixed micro-batches: the normalisers sum to one, the loss is sum of the scaled values
    parts = [agg(loss * k, mask, mode="token-mean", accumulation="reference_fixed", grad_accum_steps=4)
             for k in (1, 2, 3, 4)]
    assert float(finalize(sum(p[0] for p in parts), sum(p[1] for p in parts))) == pytest.approx(10 / 4)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("accumulation", ["exact", "reference_fixed"])
def test_empty_rows_and_batches_do_not_give_nan(mode, accumulation):
    loss = jnp.asarray([[1.0, 2.0], [jnp.nan, 5.0]])
    mask = jnp.asarray([[1.0, 1.0], [0.0, 0.0]])
    grad = jax.grad(lambda l: finalize(*aggregate(l, mask, AggregationConfig(mode, accumulation=accumulation))))(loss)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[1] == 0.0)
    s, n = aggregate(loss, jnp.zeros((2, 2)), AggregationConfig(mode, accumulation=accumulation))
    assert float(finalize(s, n)) == 0.0 and np.isfinite(float(s))


def test_seq_mean_token_mean_leaves_out_empty_rows():
    s, n = agg([[1.0, 3.0], [7.0, 7.0]], [[1, 1], [0, 0]], mode="seq-mean-token-mean")
    assert (float(s), float(n)) == (2.0, 1.0)


def test_row_valid_excludes_padding_rows_from_row_counts():
    loss = jnp.ones((3, 2))
    mask = jnp.asarray([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    s, n = aggregate(loss, mask, AggregationConfig("seq-mean-token-sum"), row_valid=jnp.asarray([1, 1, 0]))
    assert (float(s), float(n)) == (3.0, 2.0)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="mode"):
        AggregationConfig("seq-sum")
    with pytest.raises(ValueError, match="accumulation"):
        AggregationConfig(accumulation="global")
    with pytest.raises(ValueError, match="mini_batch_rows"):
        AggregationConfig(accumulation="reference_dynamic")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        AggregationConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="norm_length"):
        AggregationConfig(norm_length=0)
    with pytest.raises(ValueError, match="mask must have shape"):
        aggregate(jnp.zeros((2, 3)), jnp.zeros((2, 4)), AggregationConfig())
    with pytest.raises(ValueError, match="row_valid must have shape"):
        aggregate(jnp.zeros((2, 3)), jnp.zeros((2, 3)), AggregationConfig(), row_valid=jnp.ones(3))
