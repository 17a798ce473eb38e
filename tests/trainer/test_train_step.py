import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from spear_jax import sharding, train_step
from spear_jax.model import get_model_config, init_model
from spear_jax.objectives import AggregationConfig, ObjectiveConfig, PolicyLossConfig, SILConfig

CFG = get_model_config("tiny", num_layers=1, hidden_size=64, intermediate_size=128, vocab_size=256)


def _model():
    return nnx.split(init_model(CFG, seed=0))


def _rows(n_rows=8, length=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (n_rows, length)).astype(np.int32)
    prompt_len = rng.integers(2, 6, n_rows)
    total_len = rng.integers(8, length + 1, n_rows)
    pos = np.arange(length)[None]
    valid = pos < total_len[:, None]
    loss_mask = ((pos >= prompt_len[:, None]) & valid).astype(np.float32)
    adv = rng.normal(size=(n_rows, 1)).astype(np.float32) * loss_mask
    old = np.where(loss_mask > 0, rng.normal(-5.5, 0.3, (n_rows, length)), 0).astype(np.float32)
    return {
        "tokens": tokens, "valid": valid, "loss_mask": loss_mask, "old_logprobs": old,
        "advantages": adv, "row_valid": np.ones(n_rows, bool),
    }


def _split(rows, n_micro):
    return {k: jnp.asarray(v.reshape((n_micro, v.shape[0] // n_micro) + v.shape[1:])) for k, v in rows.items()}


def _config(mode="token-mean", loss_mode="vanilla", entropy_coef=0.0):
    objective = ObjectiveConfig(
        policy=PolicyLossConfig(loss_mode=loss_mode, eps_high=0.28),
        aggregation=AggregationConfig(mode=mode, norm_length=12),
        entropy_coef=entropy_coef,
    )
    return train_step.UpdateConfig(objective=objective, sil=SILConfig(), logprob_chunk_size=8)


def _sgd():
    """Plain SGD: parameter differences are exactly gradient differences (Adam's first step
    normalises every coordinate and would amplify rounding in near-zero gradients)."""
    return optax.sgd(1.0)


def _run(config, rows, n_micro, replay=False, sil_weight=1.0):
    graphdef, params = _model()
    opt = _sgd()
    update = train_step.make_update_fn(graphdef, opt, config, replay)
    opt_state = opt.init(params)
    return update(params, opt_state, _split(rows, n_micro), jax.random.key(0), jnp.float32(sil_weight))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_reproduces_full_batch(mode):
    rows = _rows()
    full_params, _, full = _run(_config(mode, entropy_coef=0.01), rows, n_micro=1)
    micro_params, _, micro = _run(_config(mode, entropy_coef=0.01), rows, n_micro=4)
    np.testing.assert_allclose(micro["loss"], full["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(micro["grad_norm"], full["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(micro_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_update_moves_params_and_reports_metrics():
    graphdef, params = _model()
    before = [np.asarray(x) for x in jax.tree.leaves(params)]
    new_params, _, metrics = _run(_config(), _rows(), n_micro=2)
    assert float(metrics["skipped"]) == 0.0 and float(metrics["grad_norm"]) > 0
    moved = [not np.allclose(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(new_params))]
    assert any(moved)
    for name in ("loss", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy"):
        assert name in metrics and np.isfinite(float(metrics[name]))


def test_non_finite_loss_skips_update():
    rows = _rows()
    rows["advantages"][0, np.argmax(rows["loss_mask"][0])] = np.nan
    graphdef, params = _model()
    before = [np.asarray(x) for x in jax.tree.leaves(params)]
    new_params, new_opt, metrics = _run(_config(), rows, n_micro=2)
    assert float(metrics["skipped"]) == 1.0
    for a, b in zip(before, jax.tree.leaves(new_params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(new_opt) if np.asarray(x).dtype.kind == "f")


def test_replay_loss_scales_with_sil_weight_without_recompiling():
    rows = _rows()
    rows["advantages"] = np.abs(rows["advantages"])
    graphdef, params = _model()
    opt = train_step.make_optimizer(train_step.OptimizerConfig(lr=1e-2, weight_decay=0.0))
    update = train_step.make_update_fn(graphdef, opt, _config(loss_mode="clip_cov"), replay=True)
    losses = []
    for weight in (0.25, 1.0):
        _, params_copy = _model()
        _, _, metrics = update(params_copy, opt.init(params_copy), _split(rows, 2), jax.random.key(1), jnp.float32(weight))
        losses.append(float(metrics["loss"]))
        assert float(metrics["sil_weight"]) == weight
    np.testing.assert_allclose(losses[0] * 4, losses[1], rtol=1e-5)
    assert update._cache_size() == 1


def test_data_parallel_sharded_update_equals_single_device():
    rows = _rows(n_rows=16)
    config = _config("seq-mean-token-sum-norm")
    single_params, _, single = _run(config, rows, n_micro=2)
    mesh = sharding.make_mesh(data=8)
    graphdef, params = _model()
    params = sharding.shard_state(params, CFG.sharding_rules, mesh)
    opt = _sgd()
    update = train_step.make_update_fn(graphdef, opt, config, replay=False)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    minibatch = {k: jax.device_put(v, batch_sharding) for k, v in _split(rows, 2).items()}
    with jax.set_mesh(mesh):
        sharded_params, _, sharded = update(params, opt.init(params), minibatch, jax.random.key(0), jnp.float32(1))
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded_params), jax.tree.leaves(single_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_bad_minibatch_is_rejected():
    rows = _split(_rows(), 2)
    with pytest.raises(KeyError, match="advantages"):
        train_step.check_minibatch({k: v for k, v in rows.items() if k != "advantages"})
    rows["row_valid"] = rows["row_valid"][:, :1]
    with pytest.raises(ValueError, match="row_valid"):
        train_step.check_minibatch(rows)
    with pytest.raises(ValueError, match="schedule"):
        train_step.OptimizerConfig(schedule="linear")
