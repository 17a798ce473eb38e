"""LoRA: the adapted forward, merging (decode / export), adapter-only optimizer state and
updates, the sampler on merged weights, sharded adapters, config validation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from spear_jax import sharding, train_step
from spear_jax.model import forward, get_model_config, init_model, lora
from spear_jax.sampling import Sampler, SamplingParams, decode
from tests.sampling.reference import log_softmax, teacher_forced_logits

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
CFG = get_model_config("tiny", vocab_size=256)


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _lora_model(targets=TARGETS, rank=4, alpha=8.0, mesh=None, perturb=0.05):
    """(base graphdef, base state, LoRA config, LoRA graphdef, LoRA state) with random nonzero
    adapters (B starts at 0, which would hide a wrong merge)."""
    graphdef, base = nnx.split(init_model(CFG, seed=0))
    cfg, lora_graphdef, params = lora.add_adapters(CFG, base, rank=rank, alpha=alpha, targets=targets, mesh=mesh)
    adapters, frozen = lora.split_trainable(params)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [x + perturb * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return graphdef, base, cfg, lora_graphdef, lora.combine(jax.tree.unflatten(treedef, leaves), frozen)


def _batch(rows=4, length=10, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (rows, length)), jnp.int32)
    return tokens, jnp.ones((rows, length), bool)


def test_fresh_adapters_leave_the_model_unchanged_and_have_the_lora_shapes():
    graphdef, base = nnx.split(init_model(CFG, seed=0))
    cfg, lora_graphdef, params = lora.add_adapters(CFG, base, rank=4, alpha=8.0, targets=TARGETS)
    tokens, valid = _batch()
    np.testing.assert_array_equal(forward(lora_graphdef, params, tokens, valid)[0],
                                  forward(graphdef, base, tokens, valid)[0])
    adapters = lora.trainable_params(params)
    d, f, h, kv, hd, r = CFG.hidden_size, CFG.intermediate_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim, 4
    per_layer = (d * r + r * h * hd) + 2 * (d * r + r * kv * hd) + (h * hd * r + r * d) \
        + 2 * (d * r + r * f) + (f * r + r * d)
    assert _size(adapters) == CFG.num_layers * per_layer
    assert cfg.lora_scale == 2.0


def test_adapters_change_the_forward_and_merging_equals_the_adapted_forward():
    graphdef, base, cfg, lora_graphdef, params = _lora_model()
    tokens, valid = _batch()
    adapted = forward(lora_graphdef, params, tokens, valid)[0]
    assert float(jnp.abs(adapted - forward(graphdef, base, tokens, valid)[0]).max()) > 0.1
    merged = lora.merge_lora(params, cfg)
    # the merged state is a base state: same tree, shapes and dtypes (what HF export writes)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(merged)] == [(x.shape, x.dtype) for x in jax.tree.leaves(base)]
    np.testing.assert_allclose(forward(lora.base_graphdef(cfg), merged, tokens, valid)[0], adapted, atol=2e-5)
    assert lora.merge_lora(base, CFG) is base


@pytest.mark.parametrize("targets", [("q", "v"), ("o", "down")])
def test_merge_touches_exactly_the_targets(targets):
    _, base, cfg, _, params = _lora_model(targets=targets)
    before = dict(nnx.to_flat_state(base))
    changed = {f"{path[-2]}/{path[-1]}" for path, v in nnx.to_flat_state(lora.merge_lora(params, cfg))
               if not np.array_equal(v[...], before[path][...])}
    assert changed == {f"{'attention' if t in 'qkvo' else 'mlp'}/{t}_proj" for t in targets}


def test_optimizer_state_is_adapter_sized_and_the_loss_falls():
    _, _, cfg, lora_graphdef, params = _lora_model()
    optimizer = train_step.make_optimizer(train_step.OptimizerConfig(lr=1e-2, weight_decay=0.0))
    opt_state = optimizer.init(lora.trainable_params(params))
    adapters = _size(lora.trainable_params(params))
    # AdamW keeps two moments per trainable element (plus scalar counts)
    moments = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0)
    assert moments == 2 * adapters and adapters < _size(params) / 10
    update = train_step.make_sft_update_fn(lora_graphdef, optimizer, chunk_size=16)
    tokens, valid = _batch(rows=8, length=12)
    minibatch = {"tokens": tokens.reshape(2, 4, 12), "valid": valid.reshape(2, 4, 12),
                 "loss_mask": jnp.ones((2, 4, 12), jnp.float32), "row_valid": jnp.ones((2, 4), bool)}
    frozen_before = jax.tree.map(np.asarray, lora.split_trainable(params)[1])
    losses = []
    for _ in range(5):
        params, opt_state, metrics = update(params, opt_state, minibatch, jax.random.key(0), jnp.float32(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(lora.split_trainable(params)[1])):
        np.testing.assert_array_equal(a, b)  # the base weights never move


def test_sampler_decodes_the_adapted_model_without_recompiling_on_new_adapters():
    _, _, cfg, lora_graphdef, params = _lora_model()
    prompts = [[5, 9, 11, 3], [7, 1, 2]]
    greedy = SamplingParams(greedy=True, max_new_tokens=8)
    sampler = Sampler(lora_graphdef, params, cfg, max_len=32, max_batch=2)
    sampler.generate(prompts, greedy, jax.random.key(0))
    compiled = decode.extend_and_decode._cache_size()
    _, _, _, _, other = _lora_model(perturb=0.2)
    sampler.set_params(other)
    gens = sampler.generate(prompts, greedy, jax.random.key(0))
    assert decode.extend_and_decode._cache_size() == compiled
    for prompt, gen in zip(prompts, gens):  # log-probs of the training forward with adapters
        logits = teacher_forced_logits(lora_graphdef, other, prompt + list(gen.tokens))
        at = logits[len(prompt) - 1: len(prompt) - 1 + len(gen.tokens)]
        np.testing.assert_array_equal(gen.tokens, at.argmax(-1))
        np.testing.assert_allclose(gen.logprobs, log_softmax(at)[np.arange(len(gen.tokens)), gen.tokens], atol=2e-4)


def test_sharded_adapters_follow_their_weights_and_update_like_unsharded():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    _, _, cfg, lora_graphdef, params = _lora_model(mesh=mesh)
    adapters = lora.trainable_params(params)
    q = adapters["blocks"]["attention"]["q_lora"]  # a [layers, D, rank]
    assert q.a[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # embed over fsdp
    placed = sharding.shard_state(params, cfg.sharding_rules, mesh)
    optimizer = optax.sgd(1.0)  # Adam's first step would amplify rounding in tiny gradients
    update = train_step.make_sft_update_fn(lora_graphdef, optimizer, chunk_size=16)
    tokens, valid = _batch(rows=8, length=12)
    minibatch = {"tokens": tokens.reshape(1, 8, 12), "valid": valid.reshape(1, 8, 12),
                 "loss_mask": jnp.ones((1, 8, 12), jnp.float32), "row_valid": jnp.ones((1, 8), bool)}
    results = []
    for state in (jax.tree.map(jnp.copy, params), placed):
        opt_state = optimizer.init(lora.trainable_params(state))
        with jax.set_mesh(mesh):
            new, _, _ = update(state, opt_state, minibatch, jax.random.key(0), jnp.float32(0))
        results.append(jax.tree.map(np.asarray, lora.trainable_params(new)))
    for a, b in zip(*(jax.tree.leaves(r) for r in results)):
        np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("field,value,message", [
    ("lora_rank", -1, "lora_rank must be >= 0"),
    ("lora_alpha", 0.0, "lora_alpha must be > 0"),
    ("lora_targets", ("q", "attn"), "not projections"),
])
def test_model_config_rejects_bad_lora_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        CFG.replace(lora_rank=4, lora_targets=("q",)).replace(**{field: value})


def test_remat_keeps_the_adapters_gradient():
    _, _, cfg, lora_graphdef, params = _lora_model()
    tokens, valid = _batch()

    def loss(adapters, frozen, graphdef):
        logits = forward(graphdef, lora.combine(adapters, frozen), tokens, valid)[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    adapters, frozen = lora.split_trainable(params)
    remat_graphdef = nnx.split(nnx.eval_shape(lambda: init_model(cfg.replace(remat=True))))[0]
    grad_fn = jax.jit(jax.grad(loss), static_argnums=2)
    plain, remat = grad_fn(adapters, frozen, lora_graphdef), grad_fn(adapters, frozen, remat_graphdef)
    assert float(optax.tree.norm(plain)) > 0
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, atol=1e-6)
