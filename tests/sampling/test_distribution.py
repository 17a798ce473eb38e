"""Next-token selection: empirical frequencies match the intended distribution exactly,
truncation is exact, log-probs are log softmax(logits / T) before truncation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_jax.sampling.distribution import (SamplingKnobs, column_sums, exp_weights, first_index_of,
                                             inverse_cdf_draw, sample_tokens, truncation_mask)
from tests import xla

N = 40_000


@pytest.mark.parametrize("vocab, batch, lane_dense", [
    (4096, 1, True), (4096, 8, True), (384, 32, True), (4096, 128, True),
    (1000, 1, False), (1000, 4, False), (256, 256, False), (512, 3, False)])
def test_exp_weights_and_column_sums_equal_numpy(vocab, batch, lane_dense):
    logits = np.random.default_rng(vocab + batch).normal(0, 3, (vocab, batch)).astype(np.float32)
    top, inv_t = logits.max(0), np.float32(1 / 0.7)
    want = np.exp((logits - top) * inv_t)
    got = jax.jit(exp_weights)(logits, top, inv_t)
    assert got.shape == ((vocab * batch // 128, 128) if lane_dense else (vocab, batch))
    np.testing.assert_allclose(np.asarray(got).reshape(vocab, batch), want, rtol=1e-6)
    np.testing.assert_allclose(column_sums(got, batch), want.astype(np.float64).sum(0), rtol=1e-4)
LOGITS = np.array([2.0, 1.5, 0.3, -0.4, 1.0, -2.0, 0.0, 0.7], np.float32)

def test_exp_weights_keeps_the_rows_apart_under_a_mesh():
    from jax.sharding import NamedSharding, PartitionSpec

    from spear_jax.sharding import make_mesh
    mesh = make_mesh(data=-1)
    logits = np.random.default_rng(0).normal(0, 3, (4096, 8)).astype(np.float32)
    want = np.exp(logits - logits.max(0)).astype(np.float64).sum(0)
    with jax.set_mesh(mesh):
        rows = jax.device_put(logits, NamedSharding(mesh, PartitionSpec(None, "data")))
        sums = jax.jit(lambda x: column_sums(exp_weights(x, jnp.max(x, axis=0), 1.0), x.shape[1]))
        hlo = sums.lower(rows).compile().as_text()
        got = sums(rows)
    assert "all-gather" not in hlo  # the lane-dense view would gather every row to every device
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("temperature, greedy", [(1.0, True), (0.7, False)])
def test_logprobs_are_the_log_softmax_at_small_batches(batch, temperature, greedy):
    logits = np.random.default_rng(batch).normal(0, 2, (batch, 4096)).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), batch)
    tokens, logprobs = _sample(keys, logits, SamplingKnobs.make(temperature, 1.0, 0, greedy))
    z = logits.astype(np.float64) / temperature
    log_softmax = z - z.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    np.testing.assert_allclose(logprobs, log_softmax[np.arange(batch), tokens], atol=2e-5, rtol=1e-5)
    if greedy:
        np.testing.assert_array_equal(tokens, logits.argmax(1))


@functools.partial(jax.jit, compiler_options=xla.DEFAULT_COMPILE)
def _sample(keys, logits, knobs):
    """sample_tokens on row-major logits [B, V] (it takes the decode loop's [V, B]), each row
    drawing at ``uniform(keys[b])``. Compiled with LLVM's optimisation, which the session turns
    off (``tests/xla.py``): the frequency tests draw 40,000 rows, and bisect over them when
    truncating, so this program's run time outweighs its compile time."""
    return sample_tokens(jax.vmap(lambda k: jax.random.uniform(k, ()))(keys), logits.T, knobs)


def draw(logits, temperature=1.0, top_p=1.0, top_k=0, greedy=False, seed=0, n=N):
    keys = jax.random.split(jax.random.key(seed), n)
    batch = jnp.broadcast_to(jnp.asarray(logits), (n, len(logits)))
    tokens, logprobs = _sample(keys, batch, SamplingKnobs.make(temperature, top_p, top_k, greedy))
    return np.asarray(tokens), np.asarray(logprobs)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_probs(logits, temperature, top_k, top_p):
    """numpy: temperature, keep top_k, renormalise, keep smallest head with mass >= top_p."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    k = len(z) if top_k == 0 else min(top_k, len(z))
    q = softmax(z[order[:k]])
    mass = 0.0
    for rank in range(k):
        if top_p < 1.0 and mass >= top_p:
            break
        keep[order[rank]] = True
        mass += q[rank]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


def assert_frequencies(tokens, probs):
    """Every token's frequency within 5 binomial standard deviations; zero-probability tokens
    never drawn."""
    freq = np.bincount(tokens, minlength=len(probs)) / len(tokens)
    sigma = np.sqrt(probs * (1 - probs) / len(tokens))
    np.testing.assert_array_less(np.abs(freq - probs), 5 * sigma + 1e-12)
    assert np.all(freq[probs == 0] == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_frequencies_match_softmax_over_temperature(temperature):
    tokens, logprobs = draw(LOGITS, temperature=temperature)
    assert_frequencies(tokens, softmax(LOGITS.astype(np.float64) / temperature))
    expected = np.log(softmax(LOGITS.astype(np.float64) / temperature))[tokens]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.7), (4, 0.8), (1, 1.0), (0, 0.5)])
def test_truncation_frequencies_and_untruncated_logprobs(top_k, top_p):
    temperature = 0.8
    tokens, logprobs = draw(LOGITS, temperature=temperature, top_k=top_k, top_p=top_p, seed=1)
    assert_frequencies(tokens, reference_probs(LOGITS, temperature, top_k, top_p))
    # behaviour log-probs are taken before truncation
    expected = np.log(softmax(LOGITS.astype(np.float64) / temperature))[tokens]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-5)


_mask = jax.jit(truncation_mask)


def mask_of(logits, top_k, top_p):
    return np.asarray(_mask(jnp.asarray(logits, jnp.float32)[None], jnp.int32(top_k), jnp.float32(top_p))[0])


def test_top_p_hand_case():
    # probs 0.5, 0.3, 0.15, 0.05 at ids 1, 3, 0, 2: top_p = 0.7 keeps {1, 3} (0.5 < 0.7, then
    # 0.8 >= 0.7); top_p = 0.5 keeps {1}; top_k = 2 then top_p = 0.81 keeps {1, 3}.
    logits = np.log(np.array([0.15, 0.5, 0.05, 0.3], np.float32))
    np.testing.assert_array_equal(mask_of(logits, 0, 0.7), [False, True, False, True])
    np.testing.assert_array_equal(mask_of(logits, 0, 0.5), [False, True, False, False])
    np.testing.assert_array_equal(mask_of(logits, 2, 0.81), [False, True, False, True])
    tokens, _ = draw(logits, top_p=0.7, n=20_000)
    assert_frequencies(tokens, np.array([0.0, 0.625, 0.0, 0.375]))


def test_ties_are_ranked_by_id():
    # four equal probabilities: the masses before them are 0, 0.25, 0.5, 0.75 in id order, so
    # top_p = 0.5 keeps ids 0 and 1 (0.5 < 0.5 fails), 0.6 keeps three; top_k = 3 then top_p =
    # 0.7 renormalises to thirds: masses 0, 1/3, 2/3 all below 0.7, three kept.
    flat = np.zeros(4, np.float32)
    np.testing.assert_array_equal(mask_of(flat, 0, 0.5), [True, True, False, False])
    np.testing.assert_array_equal(mask_of(flat, 0, 0.6), [True, True, True, False])
    np.testing.assert_array_equal(mask_of(flat, 3, 0.7), [True, True, True, False])
    np.testing.assert_array_equal(mask_of(flat, 2, 1.0), [True, True, False, False])
    # a tie at the top-k cut that top-p cuts again: k = 3 keeps id 4 (5.0) and ids 0 and 1 of
    # the four 3.0s; top-p then cuts inside those two, or (k = 4) keeps ids 0, 1 and 2
    logits = np.array([3.0, 3.0, 3.0, 3.0, 5.0], np.float32)
    p = softmax(logits[[4, 0, 1]].astype(np.float64))
    np.testing.assert_array_equal(mask_of(logits, 3, p[0] + 0.5 * p[1]), [True, False, False, False, True])
    np.testing.assert_array_equal(mask_of(logits, 3, p[0] + 1.5 * p[1]), [True, True, False, False, True])
    np.testing.assert_array_equal(mask_of(logits, 4, 0.999), [True, True, True, False, True])


def test_top_k_keeps_exactly_k_with_ties():
    logits = np.array([1.0, 3.0, 3.0, 3.0, 0.0], np.float32)
    tokens, _ = draw(logits, top_k=2, n=20_000)
    # stable sort: ties broken by lower id -> ids 1 and 2, equally likely
    assert_frequencies(tokens, np.array([0.0, 0.5, 0.5, 0.0, 0.0]))


@pytest.mark.parametrize("knobs", [dict(greedy=True), dict(top_k=1), dict(top_p=1e-6),
                                   dict(greedy=True, temperature=0.3, top_k=5)])
def test_greedy_like_settings_take_the_argmax(knobs):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(64, 50)).astype(np.float32) * 3
    keys = jax.random.split(jax.random.key(0), 64)
    tokens, logprobs = _sample(keys, jnp.asarray(logits), SamplingKnobs.make(
        knobs.get("temperature", 1.0), knobs.get("top_p", 1.0), knobs.get("top_k", 0), knobs.get("greedy", False)))
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))
    temperature = knobs.get("temperature", 1.0)
    z = logits.astype(np.float64) / temperature
    expected = (z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)))
    np.testing.assert_allclose(np.asarray(logprobs), expected[np.arange(64), logits.argmax(-1)], rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.booleans())
def test_first_index_of_the_max_is_numpy_argmax_with_ties_and_infinities(values, with_infinities):
    x = np.asarray(values, np.float32)  # few distinct values: ties are the rule
    if with_infinities:
        x[::5] = -np.inf
    batch = np.stack([x, x[::-1], np.full_like(x, -np.inf)])
    first = jax.jit(first_index_of, static_argnums=2)
    np.testing.assert_array_equal(np.asarray(first(batch, batch.max(-1), -1)), batch.argmax(-1))
    np.testing.assert_array_equal(np.asarray(first(batch.T, batch.max(-1), 0)), batch.argmax(-1))  # [V, B]


def cdf_index(weights, target):
    """numpy: the v with C_{v-1} <= target < C_v over float64 cumulative sums, and the distance
    from target to the nearest C (how close the case is to a rounding knife-edge)."""
    c = np.cumsum(weights.astype(np.float64))
    return int(np.searchsorted(c, target, side="right")), float(np.min(np.abs(c - target)))


def test_draws_invert_the_cdf_at_the_rows_uniform():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(256, 300)).astype(np.float32) * 2  # 300: blocks of 16, the last padded
    keys = jax.random.split(jax.random.key(7), 256)
    tokens, _ = _sample(keys, jnp.asarray(logits), SamplingKnobs.make(1.0, 1.0, 0, False))
    uniforms = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, ()))(keys), np.float64)
    checked = 0
    for row, u, token in zip(logits, uniforms, np.asarray(tokens)):
        weights = np.exp(row.astype(np.float64) - row.max())
        expected, margin = cdf_index(weights, u * weights.sum())
        if margin > 1e-5 * weights.sum():  # float32 sums may differ on knife-edges only
            assert token == expected
            checked += 1
    assert checked > 250


_inverse_cdf = jax.jit(inverse_cdf_draw)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.0, 1e-30, 0.5, 1.0, 3.0]), min_size=1, max_size=70),
       st.sampled_from([0.0, 1e-9, 0.25, 0.5, 0.999, 1.0 - 2.0**-24]))
def test_inverse_cdf_matches_numpy_and_never_picks_a_zero_weight(values, u):
    weights = np.asarray(values, np.float32)
    if not np.any(weights > 0):
        weights[-1] = 1.0
    got = int(_inverse_cdf(jnp.asarray(weights), jnp.float32(u)))
    assert 0 <= got < len(weights) and weights[got] > 0
    expected, margin = cdf_index(weights, np.float64(np.float32(u)) * weights.astype(np.float64).sum())
    if margin > 1e-5 * weights.sum():
        assert got == expected


def test_frequencies_over_a_large_vocabulary_with_truncation():
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=1000) * 2.5).astype(np.float32)  # blocks of 32, the last padded
    for top_k, top_p in ((0, 1.0), (50, 1.0), (0, 0.6)):
        tokens, _ = draw(logits, temperature=0.9, top_k=top_k, top_p=top_p, seed=9)
        probs = reference_probs(logits, 0.9, top_k, top_p)
        # tokens expected fewer than 20 times are pooled into one bin (the normal approximation
        # of assert_frequencies needs counts), zero-probability ones checked apart
        common = probs * N >= 20
        pooled_tokens = np.where(common[tokens], tokens, len(probs))
        pooled_probs = np.append(probs * common, probs[~common].sum())
        assert_frequencies(pooled_tokens, pooled_probs)
        assert np.all(probs[tokens] > 0)


def test_determinism_and_key_dependence():
    a, _ = draw(LOGITS, seed=5, n=256)
    b, _ = draw(LOGITS, seed=5, n=256)
    c, _ = draw(LOGITS, seed=6, n=256)
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.3


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.lists(st.integers(-3, 3), min_size=1, max_size=40),   # ties are the rule
                 # no subnormals: XLA:CPU flushes them to zero, where numpy keeps them apart
                 st.lists(st.floats(-30, 30, width=32, allow_subnormal=False), min_size=1, max_size=40)),
       st.integers(0, 42), st.one_of(st.just(1.0), st.floats(0.01, 0.999)))
def test_truncation_mask_matches_a_stable_sort(values, top_k, top_p):
    """The sort-free mask equals numpy's: a stable descending sort, top-k, renormalise, the
    smallest head with mass >= top_p (float64)."""
    logits = np.asarray(values, np.float32)
    expected = reference_probs(logits, 1.0, top_k, top_p) > 0
    # float32 sums against float64 ones may disagree only where a partial mass in rank order is
    # within rounding of top_p; skip those knife-edge cases
    z = logits.astype(np.float64)
    order = np.argsort(-z, kind="stable")[:len(z) if top_k == 0 else min(top_k, len(z))]
    masses = np.cumsum(softmax(z[order]))
    if top_p < 1.0 and np.min(np.abs(masses - top_p)) < 1e-5:
        return
    np.testing.assert_array_equal(mask_of(logits, top_k, top_p), expected)


def test_truncation_mask_at_the_extremes_of_the_keys():
    """Infinite, signed-zero and tiny logits keep their order in the bisection's keys. (Not
    denormal ones: XLA:CPU flushes them to zero, so they tie with 0.0.)"""
    logits = np.array([-np.inf, 3e38, -0.0, 0.0, 1e-30, -1e-30, -3e38, 1.0], np.float32)
    np.testing.assert_array_equal(mask_of(logits, 1, 1.0), [False, True, False, False, False, False, False, False])
    np.testing.assert_array_equal(mask_of(logits, 3, 1.0), [False, True, False, False, True, False, False, True])
    # -0.0 ties with 0.0 (the lower id first), just above -1e-30
    np.testing.assert_array_equal(mask_of(logits, 5, 1.0), [False, True, True, True, True, False, False, True])
    # a -inf logit has no mass: top-p never keeps it, even when it keeps every other token
    np.testing.assert_array_equal(mask_of(np.array([-np.inf, 0.0, 0.0], np.float32), 0, 0.999), [False, True, True])


def test_truncation_mask_cuts_each_row_at_its_own_threshold():
    """Rows with and without ties at their cuts, and different knobs' outcomes, in one batch."""
    rng = np.random.default_rng(11)
    rows = np.concatenate([rng.integers(-2, 3, (6, 50)), rng.normal(0, 2, (6, 50))]).astype(np.float32)
    for top_k, top_p in ((7, 1.0), (0, 0.6), (9, 0.8)):
        got = np.asarray(_mask(jnp.asarray(rows), jnp.int32(top_k), jnp.float32(top_p)))
        for row, mask in zip(rows, got):
            np.testing.assert_array_equal(mask, reference_probs(row, 1.0, top_k, top_p) > 0)


def test_truncated_draws_trace_with_rows_sharded_over_explicit_axes():
    """Under a mesh of explicit axes the arrays carry their sharding in their types: both sides
    of every cut's ``cond`` must keep the rows' sharding."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
    rows = np.random.default_rng(2).integers(-2, 3, (4, 64)).astype(np.float32)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(rows, NamedSharding(mesh, PartitionSpec("data", None)))
        for top_k, top_p in ((5, 0.6), (0, 0.6), (5, 1.0)):
            got = np.asarray(_mask(sharded, jnp.int32(top_k), jnp.float32(top_p)))
            for row, mask in zip(rows, got):
                np.testing.assert_array_equal(mask, reference_probs(row, 1.0, top_k, top_p) > 0)
        logits = jax.device_put(rows.T.copy(), NamedSharding(mesh, PartitionSpec(None, "data")))
        uniforms = jax.device_put(np.full(4, 0.3, np.float32), NamedSharding(mesh, PartitionSpec("data")))
        tokens, _ = jax.jit(sample_tokens)(uniforms, logits, SamplingKnobs.make(1.0, 0.6, 5, False))
    assert all(reference_probs(row, 1.0, 5, 0.6)[t] > 0 for row, t in zip(rows, np.asarray(tokens)))
