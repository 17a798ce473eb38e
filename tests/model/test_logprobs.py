"""Chunked per-token log-probs / entropies equal the dense computation (values and gradients) and
do not materialise [B, L, V] logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spear_jax.model import forward, get_model_config, init_model
from spear_jax.model.logprobs import (
    balanced_chunks,
    chunked_token_stats,
    selected_token_stats,
    sequence_token_stats,
)


def numpy_stats(logits, tokens, valid, temperature):
    """Reference in float64: stats of token t from the logits at t - 1."""
    z = logits.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    b, length = tokens.shape
    lp = np.zeros((b, length))
    ent = np.zeros((b, length))
    for i in range(b):
        for t in range(1, length):
            if valid[i, t] and valid[i, t - 1]:
                lp[i, t] = logp[i, t - 1, tokens[i, t]]
                ent[i, t] = -(np.exp(logp[i, t - 1]) * logp[i, t - 1]).sum()
    return lp, ent


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_sequence_stats_match_numpy_reference(chunk_size):
    cfg = get_model_config("tiny", architecture="qwen3", vocab_size=256)
    graphdef, state = nnx.split(init_model(cfg, seed=1))
    toks = jax.random.randint(jax.random.key(0), (3, 11), 0, cfg.vocab_size)
    valid = jnp.asarray(np.arange(11)[None] < np.array([[11], [7], [3]]))
    valid = valid.at[2].set(jnp.arange(11) >= 4)  # a left-padded row
    logits, _ = jax.jit(forward, static_argnums=0)(graphdef, state, toks, valid)
    want_lp, want_ent = numpy_stats(np.asarray(logits), np.asarray(toks), np.asarray(valid), 0.7)
    lp, ent = jax.jit(sequence_token_stats, static_argnums=(0, 4, 5))(
        graphdef, state, toks, valid, 0.7, chunk_size
    )
    np.testing.assert_allclose(np.asarray(lp), want_lp, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, atol=2e-5)


def test_gradient_equals_dense_gradient():
    cfg = get_model_config("tiny", vocab_size=256)
    graphdef, state = nnx.split(init_model(cfg, seed=2))
    toks = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    valid = jnp.ones_like(toks, bool)
    weights = jax.random.normal(jax.random.key(2), toks.shape)

    def chunked(st):
        lp, ent = sequence_token_stats(graphdef, st, toks, valid, 1.0, 4)
        return jnp.sum(weights * lp) + 0.1 * jnp.sum(ent)

    def dense(st):
        logits, _ = forward(graphdef, st, toks, valid)
        logp = jax.nn.log_softmax(logits[:, :-1])
        lp = jnp.take_along_axis(logp, toks[:, 1:, None], -1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp) * logp, -1)
        return jnp.sum(weights[:, 1:] * lp) + 0.1 * jnp.sum(ent)

    v1, g1 = jax.jit(jax.value_and_grad(chunked))(state)
    v2, g2 = jax.jit(jax.value_and_grad(dense))(state)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_peak_memory_does_not_hold_all_logits():
    """Forward+backward temp memory stays far below one [B, L, V] float32 logits array."""
    b, length, d, v = 4, 2048, 64, 8192
    hidden = jnp.zeros((b, length, d))
    targets = jnp.zeros((b, length), jnp.int32)
    w = jnp.zeros((d, v))

    def loss(h, w):
        lp, ent = chunked_token_stats(h, targets, w, 1.0, 32)
        return jnp.sum(lp) + jnp.sum(ent)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, w).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full_logits = b * length * v * 4
    assert temp < full_logits / 4, (temp, full_logits)


def test_shape_errors():
    with pytest.raises(ValueError, match="targets"):
        chunked_token_stats(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32), jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_stats(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), jnp.zeros((4, 5)), chunk_size=0)


def test_sharded_stats_equal_single_device():
    from spear_jax.sharding import make_mesh, shard_state

    cfg = get_model_config("tiny", architecture="qwen2", vocab_size=256)
    graphdef, state = nnx.split(init_model(cfg, seed=3))
    toks = jax.random.randint(jax.random.key(3), (4, 12), 0, cfg.vocab_size)
    valid = jnp.arange(12)[None] < jnp.array([[12], [9], [5], [12]])
    stats = jax.jit(sequence_token_stats, static_argnums=(0, 4, 5))
    want = stats(graphdef, state, toks, valid, 1.0, 5)
    mesh = make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        got = stats(graphdef, shard_state(state, cfg.sharding_rules, mesh), toks, valid, 1.0, 5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("length,chunk_size,want", [(352, 256, (2, 176)), (352, 512, (1, 352)),
                                                    (10, 3, (4, 3)), (9, 3, (3, 3)), (5, 1, (5, 1))])
def test_balanced_chunks_pad_less_than_one_position_per_chunk(length, chunk_size, want):
    num_chunks, chunk = balanced_chunks(length, chunk_size)
    assert (num_chunks, chunk) == want
    assert chunk <= chunk_size and 0 <= num_chunks * chunk - length < num_chunks


def test_one_chunk_runs_without_scan_or_recomputation():
    """A sequence within one chunk: no scan and no checkpoint in the program (the backward reuses
    the forward's logits); two chunks: a scan of checkpointed chunks."""
    hidden, targets, w = jnp.zeros((2, 8, 4)), jnp.zeros((2, 8), jnp.int32), jnp.zeros((4, 16))

    def program(chunk_size):
        def loss(h, w):
            return jnp.sum(chunked_token_stats(h, targets, w, 1.0, chunk_size)[0])
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, w))

    assert "scan" not in program(8) and "remat" not in program(8) and "checkpoint" not in program(8)
    assert "scan" in program(4)


def _selection_case():
    cfg = get_model_config("tiny", vocab_size=256)
    graphdef, state = nnx.split(init_model(cfg, seed=5))
    length = 16
    toks = jax.random.randint(jax.random.key(7), (3, length), 0, cfg.vocab_size)
    slots = jnp.arange(length)[None]
    valid = (slots >= jnp.array([[0], [4], [0]])) & (slots < jnp.array([[16], [16], [11]]))
    # Response spans: two turns in row 0, one late span in row 1, the row's end in row 2; the first
    # token of row 0 is selected but not scored (no predecessor).
    selected = (slots == 0) | ((slots >= 5) & (slots < 8)) | ((slots >= 12) & (slots < 14))
    selected = selected & jnp.array([[True], [False], [False]]) | ((slots >= 13) & jnp.array([[False], [True], [False]]))
    selected = selected | ((slots >= 7) & (slots < 12) & jnp.array([[False], [False], [True]]))
    return graphdef, state, toks, valid, selected


@pytest.mark.parametrize("num_selected", [5, 8, 2])
def test_selected_positions_equal_the_full_pass_with_gradients(num_selected):
    """K = 5 is each row's most kept positions, 8 leaves slack, 2 is too few (the full pass runs):
    values and gradients equal the full pass restricted to the kept positions."""
    graphdef, state, toks, valid, selected = _selection_case()
    weights = jax.random.normal(jax.random.key(8), toks.shape)

    def full(st):
        lp, ent = sequence_token_stats(graphdef, st, toks, valid, 0.8, 4)
        keep = selected & (lp != 0)
        return jnp.where(keep, lp, 0.0), jnp.where(keep, ent, 0.0)

    def windowed(st):
        return selected_token_stats(graphdef, st, toks, valid, selected, num_selected, 0.8, 4)

    def loss(fn):
        return lambda st: jnp.sum(weights * fn(st)[0]) + 0.1 * jnp.sum(fn(st)[1])

    for got, want in zip(jax.jit(windowed)(state), jax.jit(full)(state)):
        assert np.count_nonzero(np.asarray(want)) == 5 + 3 + 4
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    got, want = jax.jit(jax.grad(loss(windowed)))(state), jax.jit(jax.grad(loss(full)))(state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_selected_positions_run_the_lm_head_on_k_positions():
    """The window branch's logits are [B, K, V]: the program holds a [3, 5, 256] logits array."""
    graphdef, state, toks, valid, selected = _selection_case()
    jaxpr = str(jax.make_jaxpr(lambda st: selected_token_stats(graphdef, st, toks, valid, selected, 5))(state))
    assert "f32[3,5,256]" in jaxpr
    with pytest.raises(ValueError, match="num_selected"):
        selected_token_stats(graphdef, state, toks, valid, selected, 0)
