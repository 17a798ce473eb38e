"""The one-token decode step equals the model's cached forward of a one-token chunk."""
import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.model import KVCache, forward_last, get_model_config, init_cache
from spear_jax.model.kv_cache import merge_layers, split_layers
from spear_jax.model.layers import grouped_attention
from spear_jax.sampling import Sampler, SamplingParams, decode
from spear_jax.sampling.decode_step import _write_slot, attend_one_query, decode_step, decode_weights
from spear_jax.sharding import make_mesh
from tests.sampling.reference import random_state


def test_one_query_attention_equals_grouped_attention():
    q_key, k_key, v_key = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(q_key, (3, 6, 8))          # 6 heads over 2 kv heads
    k = jax.random.normal(k_key, (3, 10, 2, 8))
    v = jax.random.normal(v_key, (3, 10, 2, 8))
    lengths = jnp.array([0, 4, 9])
    mask = jnp.arange(10)[None, None, :] <= lengths[:, None, None]
    want = grouped_attention(q[:, None], k, v, mask)[:, 0]
    head_major = k.transpose(0, 2, 3, 1), jnp.swapaxes(v, 1, 2)   # keys [B, KVH, hd, W]
    np.testing.assert_allclose(attend_one_query(q, *head_major, lengths), want, atol=1e-5)


def _one_token_case(architecture: str, tied: bool, layers: int, lengths: list[int]):
    """(cfg, graphdef, state, random 3-row cache of 24 slots holding ``lengths``, token [3],
    live [3], the last row not live) of a tiny model."""
    cfg = get_model_config("tiny", vocab_size=512, num_layers=layers, architecture=architecture,
                           tie_embeddings=tied)
    graphdef, state = random_state(cfg, 3)
    k_key, v_key = jax.random.split(jax.random.key(1))
    shape = init_cache(cfg, 3, 24).k.shape
    cache = KVCache(k=jax.random.normal(k_key, shape), v=jax.random.normal(v_key, shape),
                    lengths=jnp.array(lengths, jnp.int32))
    return cfg, graphdef, state, cache, jnp.array([17, 400, 3]), jnp.array([True, True, False])


@pytest.mark.parametrize("architecture, tied", [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_decode_step_equals_the_cached_forward_of_one_token(architecture, tied):
    cfg, graphdef, state, cache, token, live = _one_token_case(architecture, tied, 2, [5, 11, 7])
    want_logits, want = forward_last(graphdef, state, token[:, None], live[:, None], cache)
    want_vocab_major, _ = forward_last(graphdef, state, token[:, None], live[:, None], cache, vocab_major=True)
    np.testing.assert_allclose(want_vocab_major, want_logits.T, atol=1e-5, rtol=1e-5)
    window = 16  # every live row's slots (<= 11) lie inside it
    logits, layers = jax.jit(decode_step, static_argnums=0)(
        graphdef, state, decode_weights(graphdef, state), token, live, split_layers(cache, window))
    got = merge_layers(cache, layers)
    assert logits.shape == (cfg.vocab_size, 3)                                 # vocab-major
    np.testing.assert_allclose(logits[:, :2], want_logits[:2].T, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(got.lengths, [6, 12, 7])
    np.testing.assert_allclose(got.k, want.k, atol=1e-5)
    np.testing.assert_allclose(got.v, want.v, atol=1e-5)
    np.testing.assert_array_equal(got.k[:, 2], cache.k[:, 2])  # the row that is not live: untouched


@pytest.mark.parametrize("row", [0, 1, 2])  # live at slot 5, live at slot 11, not live
def test_one_row_decode_step_equals_the_cached_forward_of_one_token(row):
    cfg, graphdef, state, cache, token, live = _one_token_case("qwen2", False, 2, [5, 11, 7])
    one = KVCache(k=cache.k[:, row:row + 1], v=cache.v[:, row:row + 1], lengths=cache.lengths[row:row + 1])
    token, live = token[row:row + 1], live[row:row + 1]
    want_logits, want = forward_last(graphdef, state, token[:, None], live[:, None], one)
    logits, layers = jax.jit(decode_step, static_argnums=0)(
        graphdef, state, decode_weights(graphdef, state), token, live, split_layers(one, 16))
    got = merge_layers(one, layers)
    if row < 2:
        np.testing.assert_allclose(logits, want_logits.T, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(got.lengths, one.lengths + live)
    np.testing.assert_allclose(got.k, want.k, atol=1e-5)
    np.testing.assert_allclose(got.v, want.v, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_a_slot_write_stores_each_rows_key_and_value_and_drops_slots_past_the_window(rows):
    k_key, v_key, new_key = jax.random.split(jax.random.key(4), 3)
    keys = jax.random.normal(k_key, (rows, 2, 4, 6))                            # [B, KVH, hd, W]
    values = jax.random.normal(v_key, (rows, 2, 6, 4))                          # [B, KVH, W, hd]
    new = jax.random.normal(new_key, (2, 4, rows))                              # [KVH, hd, B]
    for slots in ([0], [5], [6]) if rows == 1 else ([0, 3, 6], [5, 6, 2]):
        want_k, want_v = np.array(keys), np.array(values)
        for b, slot in enumerate(slots):
            if slot < 6:  # slot 6 lies past the 6-slot window: dropped
                want_k[b, :, :, slot] = new[:, :, b]
                want_v[b, :, slot, :] = new[:, :, b]
        slots = jnp.array(slots)
        np.testing.assert_array_equal(jax.jit(_write_slot, static_argnums=3)(keys, new, slots, 3), want_k)
        np.testing.assert_array_equal(jax.jit(_write_slot, static_argnums=3)(values, new, slots, 2), want_v)


def test_one_row_on_cpu_writes_with_a_select_and_every_other_write_scatters():
    def program(rows, backend="cpu", layer=()):  # the traced program's text, nested jaxprs included
        buffer = jnp.zeros((2, rows, 2, 4, 6) if layer else (rows, 2, 4, 6), jnp.bfloat16)
        with mock.patch.object(jax, "default_backend", return_value=backend):
            return str(jax.make_jaxpr(lambda b, n, s: _write_slot(b, n, s, 3, layer))(
                buffer, jnp.ones((2, 4, rows)), jnp.zeros((rows,), jnp.int32)))

    assert "select_n" in program(1) and "scatter" not in program(1)
    assert "scatter" in program(1, "gpu") and "scatter" in program(3)
    assert "scatter" in program(1, layer=(jnp.int32(1),))  # the stacked form's layer i


def test_bfloat16_decode_step_is_the_cached_forward_up_to_rounding():
    cfg = get_model_config("tiny", vocab_size=512, architecture="qwen2", tie_embeddings=False,
                           compute_dtype="bfloat16")
    graphdef, state = random_state(cfg, 6)
    weights = decode_weights(graphdef, state)
    assert all(w.dtype == jnp.bfloat16 for w in jax.tree.leaves(weights))  # float32 masters, narrowed
    cache = init_cache(cfg, 2, 16)
    prompt = jnp.array([[5, 9, 200, 7], [1, 2, 3, 0]])
    _, cache = forward_last(graphdef, state, prompt, prompt > 0, cache)
    token, live = jnp.array([17, 400]), jnp.array([True, True])
    want, _ = forward_last(graphdef, state, token[:, None], live[:, None], cache)
    logits, _ = jax.jit(decode_step, static_argnums=0)(graphdef, state, weights, token, live,
                                                      split_layers(cache, 16))
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(logits.T, want, atol=0.05 * scale)  # bfloat16 rounding, not a wrong product
    np.testing.assert_array_equal(jnp.argmax(logits, axis=0), jnp.argmax(want, axis=1))


def test_decode_weights_are_each_layers_projections_output_major():
    cfg = get_model_config("tiny", vocab_size=512, architecture="qwen2", tie_embeddings=False)
    graphdef, state = random_state(cfg, 4)
    weights = decode_weights(graphdef, state)
    blocks = state["blocks"]
    att, mlp = blocks["attention"], blocks["mlp"]
    d, layers = cfg.hidden_size, cfg.num_layers
    assert len(weights.layers) == layers
    np.testing.assert_array_equal(weights.head, np.asarray(state["lm_head"][...]).T)
    for i, layer in enumerate(weights.layers):
        def out_major(w):  # [D, *out] -> [out, D]
            return np.asarray(w[...][i]).reshape(d, -1).T
        np.testing.assert_array_equal(layer.qkv, np.concatenate(
            [out_major(att["q_proj"]), out_major(att["k_proj"]), out_major(att["v_proj"])]))
        np.testing.assert_array_equal(layer.qkv_bias, np.concatenate(
            [np.asarray(att[name][...][i]).ravel() for name in ("q_bias", "k_bias", "v_bias")]))
        np.testing.assert_array_equal(layer.o, np.asarray(att["o_proj"][...][i]).reshape(-1, d).T)
        np.testing.assert_array_equal(layer.gate_up, np.concatenate([out_major(mlp["gate_proj"]),
                                                                     out_major(mlp["up_proj"])]))
        np.testing.assert_array_equal(layer.down, np.asarray(mlp["down_proj"][...][i]).T)
        np.testing.assert_array_equal(layer.input_norm, blocks["input_norm"]["weight"][...][i])
        np.testing.assert_array_equal(layer.post_norm, blocks["post_attention_norm"]["weight"][...][i])
        assert layer.q_norm is None and layer.k_norm is None
    tied = get_model_config("tiny", vocab_size=512)
    assert decode_weights(*random_state(tied, 4)).head is None  # the embedding serves


def test_decode_step_form_needs_whole_layers_per_device_and_unrolls_on_cpu():
    tiny, deep = get_model_config("tiny"), get_model_config("smollm2-135m")
    form = decode.decode_step_form
    assert form(tiny, None) == "unrolled" and form(tiny, make_mesh(data=-1)) == "unrolled"
    assert form(tiny, make_mesh(data=-1, fsdp=2)) is None and form(tiny, make_mesh(data=-1, tensor=2)) is None
    assert form(tiny, None, platform="gpu") == "unrolled"  # 2 layers: the model's blocks unroll anyway
    assert form(deep, None, platform="cpu") == "unrolled"  # scanned 30 layers: no per-step weight copy
    assert form(deep, None, platform="gpu") is None        # the model's forward_last
    assert form(deep, None) == ("unrolled" if jax.default_backend() == "cpu" else None)
    assert form(deep, make_mesh(data=-1, fsdp=2), platform="cpu") is None
    assert form(dataclasses.replace(deep, scan_layers=False), None, platform="gpu") == "unrolled"
    for layers in ("unrolled", "scanned"):
        assert form(deep, None, layers, platform="gpu") == layers
        assert form(deep, make_mesh(data=-1), layers) == layers
        assert form(deep, make_mesh(data=-1, fsdp=2), layers) is None
    with pytest.raises(ValueError, match="decode_layers"):
        form(deep, None, "scan")


@pytest.mark.parametrize("architecture, tied", [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_decode_step_over_stacked_weights_equals_the_unrolled_step(architecture, tied):
    _, graphdef, state, cache, token, live = _one_token_case(architecture, tied, 5, [5, 15, 7])
    step = jax.jit(decode_step, static_argnums=0)
    stacked = decode_weights(graphdef, state, True)
    assert stacked.stacked and stacked.layers.qkv.shape[0] == 5
    per_layer = decode_weights(graphdef, state)
    np.testing.assert_array_equal(stacked.layers.down[3], per_layer.layers[3].down)
    want_logits, want = step(graphdef, state, per_layer, token, live, split_layers(cache, 16))
    logits, got = step(graphdef, state, stacked, token, live, split_layers(cache, 16, stacked=True))
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    for buffers, want_buffers in ((got.k, want.k), (got.v, want.v)):
        np.testing.assert_allclose(buffers, np.stack(want_buffers), atol=1e-6)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    with pytest.raises(ValueError, match="stacked weights need the stacked cache"):
        decode_step(graphdef, state, stacked, token, live, split_layers(cache, 16))
    merged, want_merged = merge_layers(cache, got), merge_layers(cache, want)
    np.testing.assert_allclose(merged.k, want_merged.k, atol=1e-6)
    np.testing.assert_allclose(merged.v, want_merged.v, atol=1e-6)


def test_unrolled_and_scanned_decode_of_a_scanned_deep_model_equal_its_forward_last_decode():
    cfg = get_model_config("tiny", vocab_size=512, num_layers=6)  # > 4 scanned layers
    graphdef, state = random_state(cfg, 5)
    prompts = [[3, 17, 42, 5], [9, 2], [400, 401, 402, 403, 404, 405]]
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0)
    runs = {}
    for layers, platform in (("auto", "gpu"), ("unrolled", None), ("scanned", None)):
        with mock.patch.object(jax, "default_backend", return_value=platform or jax.default_backend()):
            sampler = Sampler(graphdef, state, cfg, max_len=32, max_batch=4, decode_layers=layers)
        runs[layers] = (sampler.decode_form, sampler.generate(prompts, sampling, jax.random.key(7)))
    assert [runs[k][0] for k in ("auto", "unrolled", "scanned")] == [None, "unrolled", "scanned"]
    for layers in ("unrolled", "scanned"):
        for scanned, step in zip(runs["auto"][1], runs[layers][1]):
            np.testing.assert_array_equal(step.tokens, scanned.tokens)
            np.testing.assert_allclose(step.logprobs, scanned.logprobs, atol=1e-5, rtol=1e-5)
            assert step.finish_reason == scanned.finish_reason


def test_scanned_step_over_a_data_mesh_equals_it_on_one_device():
    cfg = get_model_config("tiny", vocab_size=512, num_layers=6)
    graphdef, state = random_state(cfg, 5)
    prompts = [[3, 17, 42, 5], [9, 2], [400, 401, 402, 403, 404, 405], [7]]
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0)
    alone = Sampler(graphdef, state, cfg, max_len=32, max_batch=8, decode_layers="scanned")
    sharded = Sampler(graphdef, state, cfg, max_len=32, max_batch=8, decode_layers="scanned",
                      mesh=make_mesh(data=-1))
    assert sharded.decode_form == "scanned"
    for want, got in zip(alone.generate(prompts, sampling, jax.random.key(2)),
                         sharded.generate(prompts, sampling, jax.random.key(2))):
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_decode_step_forms_need_whole_layers_on_every_device():
    cfg = get_model_config("tiny", vocab_size=512)
    graphdef, state = random_state(cfg, 5)
    with pytest.raises(ValueError, match="decode_layers='unrolled' needs whole layers"):
        Sampler(graphdef, state, cfg, max_len=32, max_batch=4, mesh=make_mesh(data=-1, tensor=2),
                decode_layers="unrolled")
    with pytest.raises(ValueError, match="decode_layers='scanned' needs whole layers"):
        Sampler(graphdef, state, cfg, max_len=32, max_batch=4, mesh=make_mesh(data=-1, fsdp=2),
                decode_layers="scanned")
    with pytest.raises(ValueError, match="decode_layers must be one of"):
        Sampler(graphdef, state, cfg, max_len=32, max_batch=4, decode_layers="scan")
