"""Stacked blocks under one lax.scan: the same values and gradients as the unrolled loop, the
KV cache scanned with the layers, a traced program whose size does not grow with depth, the
remat policy names, and checkpoints of the one-block-per-layer layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spear_jax.checkpoint import CheckpointError, RunCheckpointer, RunState
from spear_jax.model import ModelConfig, forward, forward_last, get_model_config, init_cache, init_model
from spear_jax.model.layers import Block
from spear_jax.model.transformer import SCAN_UNROLLED_MAX_LAYERS, stack_blocks
from spear_jax.model.weight_layout import stacked_blocks, unstacked_blocks


def small_cfg(architecture="qwen2", **kw):
    return get_model_config("tiny", **{"architecture": architecture, "vocab_size": 256, "num_layers": 3, **kw})


def perturbed_state(cfg, seed=0):
    """Random weights with norms and biases moved off their init, so every parameter matters."""
    _, state = nnx.split(init_model(cfg, seed))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def abstract_state(cfg):
    """The model's state as shapes and dtypes (nothing materialised)."""
    return jax.eval_shape(lambda: nnx.state(init_model(cfg)))


def graphdef_of(cfg):
    return nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg)))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 10)), jnp.int32)
VALID = jnp.asarray(np.arange(10)[None] >= np.array([[0], [3]]))  # row 1 left-padded


def test_stack_blocks_puts_layer_i_at_slice_i():
    cfg = small_cfg()
    blocks = [Block(cfg, rngs=nnx.Rngs(params=i)) for i in range(3)]
    stacked = nnx.state(stack_blocks(blocks))
    for i, block in enumerate(blocks):
        for (path, got), (_, want) in zip(nnx.to_flat_state(stacked), nnx.to_flat_state(nnx.state(block))):
            np.testing.assert_array_equal(np.asarray(got.get_value()[i]), np.asarray(want.get_value()), err_msg=str(path))
    assert stacked["attention"]["q_proj"].get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_and_unrolled_forwards_and_gradients_agree(architecture, remat):
    cfg = small_cfg(architecture, remat=remat)
    state = perturbed_state(cfg)

    def loss(st, graphdef):
        logits, _ = forward(graphdef, st, TOKENS, VALID)
        return jnp.sum(jnp.where(VALID, jax.nn.log_softmax(logits)[..., 5], 0.0)), logits

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (v_scan, logits_scan), g_scan = grad_fn(state, graphdef_of(cfg))
    (v_loop, logits_loop), g_loop = grad_fn(state, graphdef_of(cfg.replace(scan_layers=False)))
    np.testing.assert_allclose(np.asarray(logits_scan), np.asarray(logits_loop), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(float(v_scan), float(v_loop), rtol=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_scan), nnx.to_flat_state(g_loop)):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), atol=2e-5, rtol=2e-4,
                                   err_msg=str(path))


def test_scanned_decode_writes_every_layer_of_the_cache_like_the_unrolled_one():
    cfg = small_cfg("qwen3")
    state = perturbed_state(cfg, seed=1)
    step = jax.jit(forward_last, static_argnums=0)
    results = {}
    for scan_layers in (True, False):
        graphdef = graphdef_of(cfg.replace(scan_layers=scan_layers))
        logits, cache = step(graphdef, state, TOKENS, VALID, init_cache(cfg, 2, 16))
        outs = [logits]
        for token in (3, 9):
            logits, cache = step(graphdef, state, jnp.full((2, 1), token), jnp.ones((2, 1), bool), cache)
            outs.append(logits)
        results[scan_layers] = (np.stack(outs), cache)
    (scan_logits, scan_cache), (loop_logits, loop_cache) = results[True], results[False]
    np.testing.assert_allclose(scan_logits, loop_logits, atol=2e-5, rtol=2e-5)
    assert scan_cache.k.shape == (cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)
    np.testing.assert_array_equal(np.asarray(scan_cache.lengths), [12, 9])
    for name in ("k", "v"):
        got, want = np.asarray(getattr(scan_cache, name)), np.asarray(getattr(loop_cache, name))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
        assert np.all(np.abs(got[:, 0, :12]).sum(axis=(-1, -2)) > 0)  # every layer written, row 0
        assert np.all(got[:, 1, 9:] == 0)  # row 1 holds 7 + 2 tokens, nothing beyond


def _primitive_count(cfg, name):
    """Occurrences of primitive ``name`` in the jaxpr of the gradient of the forward."""
    state = abstract_state(cfg)

    def loss(st):
        return forward(graphdef_of(cfg), st, TOKENS, VALID)[0].sum()

    return str(jax.make_jaxpr(jax.grad(loss))(state)).count(name)


def test_traced_program_does_not_grow_with_depth():
    """The scanned forward and backward hold one block whatever num_layers is; unrolled they hold
    one per layer (the reason compile time grew with depth)."""
    scanned = {n: _primitive_count(small_cfg(num_layers=n), "dot_general") for n in (2, 6)}
    unrolled = {n: _primitive_count(small_cfg(num_layers=n, scan_layers=False), "dot_general") for n in (2, 6)}
    assert scanned[2] == scanned[6]
    assert unrolled[6] > unrolled[2] > 0
    assert _primitive_count(small_cfg(num_layers=6), "scan[") == _primitive_count(small_cfg(num_layers=2), "scan[")


def test_decode_program_holds_one_block_whatever_the_depth():
    """Past ``SCAN_UNROLLED_MAX_LAYERS`` (a shallower scan is unrolled, which jax 0.11 already
    does when lowering)."""
    def hlo_dots(num_layers):
        cfg = small_cfg(num_layers=num_layers)
        state = abstract_state(cfg)
        cache = jax.eval_shape(lambda: init_cache(cfg, 2, 16))
        lowered = jax.jit(forward_last, static_argnums=0).lower(graphdef_of(cfg), state, TOKENS, VALID, cache)
        return lowered.as_text().count("dot_general")

    assert hlo_dots(SCAN_UNROLLED_MAX_LAYERS + 1) == hlo_dots(SCAN_UNROLLED_MAX_LAYERS + 3)


def test_a_scan_of_at_most_the_threshold_depth_is_unrolled():
    """``run_blocks`` asks for a full unroll up to ``SCAN_UNROLLED_MAX_LAYERS`` layers, and none
    past it (the scan's ``unroll`` parameter in the traced program, whatever the JAX release
    then does with it when lowering)."""
    def scan_unroll(num_layers):
        cfg = small_cfg(num_layers=num_layers)
        state = abstract_state(cfg)
        jaxpr = jax.make_jaxpr(lambda st: forward(graphdef_of(cfg), st, TOKENS, VALID)[0])(state)
        (scan,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
        return scan.params["unroll"], scan.params["length"]

    assert scan_unroll(SCAN_UNROLLED_MAX_LAYERS) == (SCAN_UNROLLED_MAX_LAYERS, SCAN_UNROLLED_MAX_LAYERS)
    assert scan_unroll(SCAN_UNROLLED_MAX_LAYERS + 1) == (1, SCAN_UNROLLED_MAX_LAYERS + 1)


def test_remat_names_and_the_former_booleans():
    assert get_model_config("tiny", remat=True).remat == "full"
    assert get_model_config("tiny", remat=False).remat == "none"
    assert get_model_config("tiny").scan_layers is True
    with pytest.raises(ValueError, match="remat must be one of .*'full'.*remat=True is 'full'"):
        get_model_config("tiny", remat="everything")
    with pytest.raises(ValueError, match="scan_layers must be True or False"):
        get_model_config("tiny", scan_layers="yes")
    assert isinstance(get_model_config("tiny"), ModelConfig)


def _save(directory, device):
    checkpointer = RunCheckpointer(directory)
    checkpointer.save(1, RunState(device=device, host={}, meta={"step": 1}))
    checkpointer.close()


def test_checkpoint_of_one_block_per_layer_restores_params_stacked_and_refuses_a_resume(tmp_path):
    cfg = get_model_config("tiny")
    state = perturbed_state(cfg, seed=2)
    old_layout = unstacked_blocks(state, cfg.num_layers)
    assert ("blocks", 1, "mlp", "up_proj") in dict(nnx.to_flat_state(old_layout))
    _save(str(tmp_path), {"params": old_layout, "opt_state": {"count": jnp.ones((), jnp.int32)}})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = RunCheckpointer(str(tmp_path)).restore({"params": abstract}, step=1, partial=True).device["params"]
    for (path, got), (_, want) in zip(nnx.to_flat_state(restored), nnx.to_flat_state(state)):
        np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(path))
    target = {"params": abstract, "opt_state": {"count": jax.ShapeDtypeStruct((), jnp.int32)}}
    with pytest.raises(CheckpointError, match="one per layer .*params/blocks/0 ... /1.*init_from"):
        RunCheckpointer(str(tmp_path)).restore(target, step=1)


def test_unstacked_and_stacked_blocks_are_inverse():
    cfg = small_cfg()
    state = perturbed_state(cfg, seed=3)
    back = stacked_blocks(unstacked_blocks(state, cfg.num_layers), state)
    for (path, got), (_, want) in zip(nnx.to_flat_state(back), nnx.to_flat_state(state)):
        np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(path))
