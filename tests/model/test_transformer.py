"""Transformer forward: KV-cache incremental decoding equals the full forward, padding is inert,
sharded forwards equal the single-device forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from flax import nnx

from spear_jax.model import (
    forward,
    forward_last,
    get_model_config,
    init_cache,
    init_model,
    init_sharded,
)
from spear_jax.sharding import make_mesh, shard_state

ARCHS = ["llama", "qwen2", "qwen3"]


def small_cfg(architecture="llama", **kw):
    return get_model_config("tiny", architecture=architecture, vocab_size=256, **kw)


def random_model(cfg, seed=0):
    model = init_model(cfg, seed)
    # Non-trivial norms and biases so that every parameter matters.
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


_jitted_forward = jax.jit(forward, static_argnums=0)


def run(model, tokens, valid, cache=None):
    """Jitted forward of ``model`` (one compilation per config and shape)."""
    graphdef, state = nnx.split(model)
    return _jitted_forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid), cache)


def single_row_logits(model, row_tokens):
    """Reference: the row alone, unpadded, in one forward -> [n, V]."""
    toks = jnp.asarray(row_tokens, jnp.int32)[None]
    logits, _ = run(model, toks, jnp.ones_like(toks, bool))
    return np.asarray(logits[0])


@pytest.mark.parametrize("architecture", ARCHS)
def test_prefill_then_ragged_steps_equal_full_forward(architecture):
    cfg = small_cfg(architecture)
    model = random_model(cfg)
    rng = np.random.default_rng(0)
    prompt_lens = [5, 2, 7]
    sequences = [list(rng.integers(0, cfg.vocab_size, size=n + 6)) for n in prompt_lens]
    B, prompt_width, max_len = 3, 7, 16
    cache = init_cache(cfg, B, max_len)

    toks = np.zeros((B, prompt_width), np.int32)
    valid = np.zeros((B, prompt_width), bool)
    for b, n in enumerate(prompt_lens):
        toks[b, :n], valid[b, :n] = sequences[b][:n], True
    logits, cache = run(model, toks, valid, cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lens)
    got = {b: [np.asarray(logits[b, :n])] for b, n in enumerate(prompt_lens)}

    consumed = list(prompt_lens)
    # Steps of one token, with row 1 paused in step 2 (no valid token).
    for step in range(3):
        step_tok = np.zeros((B, 1), np.int32)
        step_valid = np.ones((B, 1), bool)
        if step == 1:
            step_valid[1, 0] = False
        for b in range(B):
            if step_valid[b, 0]:
                step_tok[b, 0] = sequences[b][consumed[b]]
        logits, cache = run(model, step_tok, step_valid, cache)
        for b in range(B):
            if step_valid[b, 0]:
                got[b].append(np.asarray(logits[b, :1]))
                consumed[b] += 1
    np.testing.assert_array_equal(np.asarray(cache.lengths), consumed)

    for b in range(B):
        want = single_row_logits(model, sequences[b][: consumed[b]])
        np.testing.assert_allclose(np.concatenate(got[b]), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("architecture", ARCHS)
def test_appending_multi_token_chunk_equals_reprefill(architecture):
    """A tool observation of several tokens appended to a cache == prefilling everything."""
    cfg = small_cfg(architecture)
    model = random_model(cfg, seed=1)
    rng = np.random.default_rng(1)
    B, max_len = 2, 24
    first = [rng.integers(0, cfg.vocab_size, size=n) for n in (6, 3)]
    chunk = [rng.integers(0, cfg.vocab_size, size=n) for n in (4, 7)]

    def padded(rows, width):
        toks = np.zeros((len(rows), width), np.int32)
        valid = np.zeros((len(rows), width), bool)
        for b, r in enumerate(rows):
            toks[b, : len(r)], valid[b, : len(r)] = r, True
        return jnp.asarray(toks), jnp.asarray(valid)

    cache = init_cache(cfg, B, max_len)
    _, cache = run(model, *padded(first, 6), cache)
    appended, cache = run(model, *padded(chunk, 7), cache)

    whole = [np.concatenate([f, c]) for f, c in zip(first, chunk)]
    fresh = init_cache(cfg, B, max_len)
    reprefill, fresh = run(model, *padded(whole, 10), fresh)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(fresh.lengths))
    for b in range(B):
        n0, n1 = len(first[b]), len(chunk[b])
        np.testing.assert_allclose(
            np.asarray(appended[b, :n1]), np.asarray(reprefill[b, n0 : n0 + n1]), atol=2e-5, rtol=2e-5
        )
        np.testing.assert_allclose(
            np.asarray(cache.k)[:, b, : n0 + n1], np.asarray(fresh.k)[:, b, : n0 + n1], atol=2e-5
        )


def test_padding_anywhere_is_inert():
    """Left, right and interior padding leave the valid tokens' logits unchanged."""
    cfg = small_cfg("qwen2")
    model = random_model(cfg, seed=2)
    rng = np.random.default_rng(2)
    seq = rng.integers(0, cfg.vocab_size, size=6)
    want = single_row_logits(model, seq)
    layouts = [
        np.array([0, 0, 1, 1, 1, 1, 1, 1], bool),
        np.array([1, 1, 1, 1, 1, 1, 0, 0], bool),
        np.array([1, 0, 1, 1, 0, 1, 1, 1], bool),
    ]
    toks = np.full((3, 8), 7, np.int32)
    for b, layout in enumerate(layouts):
        toks[b, layout] = seq
    logits, _ = run(model, toks, np.stack(layouts))
    assert np.all(np.isfinite(np.asarray(logits)))
    for b, layout in enumerate(layouts):
        np.testing.assert_allclose(np.asarray(logits[b])[layout], want, atol=2e-5, rtol=2e-5)


def test_forward_last_picks_each_rows_last_valid_token():
    cfg = small_cfg()
    model = random_model(cfg, seed=3)
    graphdef, state = nnx.split(model)
    toks = jax.random.randint(jax.random.key(0), (3, 5), 0, cfg.vocab_size)
    valid = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], bool)
    full, _ = _jitted_forward(graphdef, state, toks, valid)
    last, _ = jax.jit(forward_last, static_argnums=0)(graphdef, state, toks, valid)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[jnp.arange(3), jnp.array([2, 4, 3])]), atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_vocab_major_last_logits_are_the_transpose(tie):
    cfg = small_cfg(tie_embeddings=tie)
    graphdef, state = nnx.split(random_model(cfg, seed=5))
    toks = jax.random.randint(jax.random.key(1), (3, 5), 0, cfg.vocab_size)
    valid = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], bool)
    rows, _ = jax.jit(forward_last, static_argnums=0)(graphdef, state, toks, valid)
    vocab_major, _ = jax.jit(forward_last, static_argnums=(0, 5))(graphdef, state, toks, valid, None, True)
    assert vocab_major.shape == (cfg.vocab_size, 3)
    np.testing.assert_allclose(np.asarray(vocab_major), np.asarray(rows).T, atol=1e-5, rtol=1e-5)


def test_jitted_decode_step_with_donated_cache_and_bf16_cache():
    cfg = small_cfg("qwen3")
    model = random_model(cfg, seed=4)
    graphdef, state = nnx.split(model)
    step = jax.jit(forward_last, static_argnums=0, donate_argnames=("cache",))
    toks = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    ones = jnp.ones((2, 1), bool)
    want, _ = _jitted_forward(graphdef, state, toks, jnp.ones_like(toks, bool))
    for dtype, tol in ((jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)):
        cache = init_cache(cfg, 2, 12, dtype)
        logits, cache = step(graphdef, state, toks[:, :5], jnp.ones((2, 5), bool), cache)
        outs = [logits]
        for i in range(5, 9):
            logits, cache = step(graphdef, state, toks[:, i : i + 1], ones, cache)
            outs.append(logits)
        assert {cache.k.dtype, cache.v.dtype} == {jnp.dtype(dtype)}
        got = np.stack([np.asarray(o) for o in outs], axis=1)
        np.testing.assert_allclose(got, np.asarray(want[:, 4:]), atol=tol, rtol=tol)


def test_bf16_compute_close_to_fp32_and_params_stay_fp32():
    cfg = small_cfg("qwen2")
    model32 = random_model(cfg, seed=5)
    model16 = nnx.merge(nnx.graphdef(random_model(cfg.replace(compute_dtype="bfloat16"))), nnx.state(model32))
    toks = jax.random.randint(jax.random.key(2), (2, 8), 0, cfg.vocab_size)
    valid = jnp.ones_like(toks, bool)
    l32, _ = run(model32, toks, valid)
    l16, _ = run(model16, toks, valid)
    assert l16.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16)))
    assert np.abs(np.asarray(l16) - np.asarray(l32)).max() < 0.1 * np.abs(np.asarray(l32)).max()


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_same_value_and_gradient(scan_layers, policy):
    """Every remat policy gives the plain forward's value and gradients; the traced program holds
    one rematerialised block per layer unrolled, one in all under the scan."""
    cfg = small_cfg("qwen3", scan_layers=scan_layers)
    model = random_model(cfg, seed=6)
    graphdef, state = nnx.split(model)
    graphdef_remat = nnx.graphdef(init_model(cfg.replace(remat=policy)))
    toks = jax.random.randint(jax.random.key(3), (2, 8), 0, cfg.vocab_size)
    valid = jnp.ones_like(toks, bool)

    def loss(st, gd):
        logits, _ = forward(gd, st, toks, valid)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    v1, g1 = grad_fn(state, graphdef)
    v2, g2 = grad_fn(state, graphdef_remat)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    remat_eqns = str(jax.make_jaxpr(loss, static_argnums=1)(state, graphdef_remat)).count("remat2[")
    plain_eqns = str(jax.make_jaxpr(loss, static_argnums=1)(state, graphdef)).count("remat2[")
    assert remat_eqns == plain_eqns + (1 if scan_layers else cfg.num_layers)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)


@pytest.mark.parametrize(
    "mesh_shape", [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)], ids=["dp", "fsdp", "fsdp_tp", "dp_fsdp_tp"]
)
def test_sharded_forward_equals_single_device(mesh_shape):
    cfg = small_cfg("qwen2")
    model = random_model(cfg, seed=7)
    graphdef, state = nnx.split(model)
    toks = jax.random.randint(jax.random.key(4), (8, 12), 0, cfg.vocab_size)
    valid = jnp.arange(12)[None] < jnp.arange(5, 13)[:, None]
    want, _ = _jitted_forward(graphdef, state, toks, valid)

    mesh = make_mesh(*mesh_shape)
    sharded = shard_state(state, cfg.sharding_rules, mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        got, _ = jax.jit(forward, static_argnums=0)(
            graphdef, sharded, jax.device_put(toks, batch_sharding), jax.device_put(valid, batch_sharding)
        )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    with jax.set_mesh(mesh):  # activations carry sharding constraints under the mesh
        jaxpr = str(jax.make_jaxpr(forward, static_argnums=0)(graphdef, sharded, toks, valid))
    assert "sharding_constraint" in jaxpr
    if mesh_shape[2] > 1:  # the tensor axis really splits the MLP
        spec = sharded["blocks"]["mlp"]["gate_proj"].get_value().sharding.spec
        assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_init_sharded_matches_host_init():
    cfg = small_cfg("qwen3")
    mesh = make_mesh(2, 2, 2)
    _, sharded = init_sharded(cfg, mesh, seed=3)
    _, host = nnx.split(init_model(cfg, seed=3))
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(host)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    emb = sharded["embed"].get_value()
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_bad_inputs_raise_clear_errors():
    cfg = small_cfg()
    model = init_model(cfg)
    with pytest.raises(ValueError, match="tokens .* valid"):
        model(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="cache batch"):
        model(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), bool), init_cache(cfg, 3, 8))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_any_chunking_of_ragged_rows_equals_full_forward(data):
    """Random row lengths, cut into random chunks (each row its own number of valid tokens per
    call, right-padded): the logits of every token equal the single full forward's."""
    cfg = small_cfg("qwen3", num_layers=1)
    model = _PROPERTY_MODEL.get("m") or _PROPERTY_MODEL.setdefault("m", random_model(cfg, seed=9))
    graphdef, state = nnx.split(model)
    B = 2
    lengths = [data.draw(st.integers(1, 9)) for _ in range(B)]
    rng = np.random.default_rng(sum(lengths))
    seqs = [rng.integers(0, cfg.vocab_size, size=n) for n in lengths]
    cache = init_cache(cfg, B, 10)
    done = [0] * B
    got = [[] for _ in range(B)]
    while any(d < n for d, n in zip(done, lengths)):
        takes = [data.draw(st.integers(0, n - d)) for d, n in zip(done, lengths)]
        if not any(takes):  # always make progress
            first = next(b for b in range(B) if done[b] < lengths[b])
            takes[first] = lengths[first] - done[first]
        width = 9  # one static chunk shape: a single compiled forward
        toks = np.zeros((B, width), np.int32)
        valid = np.zeros((B, width), bool)
        for b, k in enumerate(takes):
            toks[b, :k], valid[b, :k] = seqs[b][done[b] : done[b] + k], True
        logits, cache = _jitted_forward(graphdef, state, jnp.asarray(toks), jnp.asarray(valid), cache)
        for b, k in enumerate(takes):
            got[b].append(np.asarray(logits[b, :k]))
            done[b] += k
    for b in range(B):
        np.testing.assert_allclose(np.concatenate(got[b]), single_row_logits(model, seqs[b]), atol=2e-5, rtol=2e-5)


_PROPERTY_MODEL: dict = {}


def test_query_chunked_attention_equals_unchunked_with_gradient():
    cfg = small_cfg("qwen2", attention_query_chunk=0)
    model = random_model(cfg, seed=10)
    graphdef, state = nnx.split(model)
    graphdef_chunked = nnx.graphdef(init_model(cfg.replace(attention_query_chunk=3)))
    toks = jax.random.randint(jax.random.key(5), (2, 10), 0, cfg.vocab_size)
    valid = jnp.arange(10)[None] >= jnp.array([[0], [2]])  # one left-padded row

    def loss(st, gd):
        logits, _ = forward(gd, st, toks, valid)
        return jnp.sum(jnp.where(valid[..., None], jnp.tanh(logits), 0.0))

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    v1, g1 = grad_fn(state, graphdef)
    v2, g2 = grad_fn(state, graphdef_chunked)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * np.abs(np.asarray(b)).max())
