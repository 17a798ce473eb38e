import dataclasses

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
        terms=(("pg", 1.0), ("entropy", entropy_coef)),
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
    # the logged metrics are scalars: Clip-Cov's [B, T] selection mask stays with direct callers
    assert all(jnp.ndim(value) == 0 for value in metrics.values())
    assert "cov_selected" not in metrics and "cov_num_selected" in metrics


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


def _with_terms(config, on_policy=None, replay=None):
    objective = config.objective if on_policy is None else dataclasses.replace(config.objective, terms=on_policy)
    sil = config.sil if replay is None else dataclasses.replace(config.sil, terms=replay)
    return dataclasses.replace(config, objective=objective, sil=sil)


def test_batch_keys_add_the_inputs_the_terms_declare():
    plain = _config()
    keys = train_step.MINIBATCH_KEYS
    assert train_step.batch_keys(plain, replay=False) == train_step.batch_keys(plain, replay=True) == keys
    kl_on_policy = _with_terms(plain, on_policy=(("pg", 1.0), ("kl", 0.1)))
    assert train_step.batch_keys(kl_on_policy, replay=False) == keys + ("ref_logprobs",)
    assert train_step.batch_keys(kl_on_policy, replay=True) == keys
    kl_on_replay = _with_terms(plain, replay=(("pg", 1.0), ("kl", 0.1)))
    assert train_step.batch_keys(kl_on_replay, replay=False) == keys
    assert train_step.batch_keys(kl_on_replay, replay=True) == keys + ("ref_logprobs",)


def test_check_minibatch_checks_the_declared_inputs():
    rows = _rows()
    rows["ref_logprobs"] = rows["old_logprobs"]
    rows["reward"] = np.ones(8, np.float32)  # a per-row extra input
    minibatch = _split(rows, 2)
    keys = train_step.MINIBATCH_KEYS + ("ref_logprobs", "reward")
    assert train_step.check_minibatch(minibatch, keys) == (2, 4, 12)
    with pytest.raises(KeyError, match="reward"):
        train_step.check_minibatch({k: v for k, v in minibatch.items() if k != "reward"}, keys)
    minibatch["reward"] = minibatch["reward"][:, :, None]
    with pytest.raises(ValueError, match=r"minibatch\['reward'\] has shape \(2, 4, 1\)"):
        train_step.check_minibatch(minibatch, keys)


def test_kl_on_replay_rows_only_reads_the_stored_reference_logprobs():
    """replay terms (pg, kl): the replay update reads ref_logprobs and logs kl_loss; the
    on-policy update of the same config neither needs nor logs it."""
    rows = _rows()
    rows["advantages"] = np.abs(rows["advantages"])
    rows["ref_logprobs"] = (rows["old_logprobs"] - 0.2 * rows["loss_mask"]).astype(np.float32)
    config = _with_terms(_config(), replay=(("pg", 1.0), ("kl", 0.3)))
    _, _, replayed = _run(config, rows, n_micro=1, replay=True)
    _, _, replay_without_kl = _run(_config(), rows, n_micro=1, replay=True)
    without_reference = {k: v for k, v in rows.items() if k != "ref_logprobs"}
    _, _, on_policy = _run(config, without_reference, n_micro=1)
    assert "kl_loss" in replayed and "kl_loss" not in on_policy
    np.testing.assert_allclose(float(replayed["pg_loss"]), float(replay_without_kl["pg_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(replayed["loss"]),
                               float(replayed["pg_loss"]) + 0.3 * float(replayed["kl_loss"]), rtol=1e-5)


def _kl_reference(kind, logp, ref):
    d = logp - ref
    return {"k1": d, "abs": np.abs(d), "k2": 0.5 * d * d,
            "low_var_kl": np.clip(np.exp(-d) + d - 1.0, -10.0, 10.0)}[kind]


@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "low_var_kl"])
def test_kl_loss_adds_coef_times_aggregated_kl(kind):
    """With reference log-probs in the minibatch, the loss is the policy loss plus
    kl_coef * token-mean(KL_kind(logp || ref)), logged as ``kl_loss``."""
    rows = _rows()
    rng = np.random.default_rng(3)
    graphdef, params = _model()
    stats = train_step.make_token_stats_fn(graphdef, 1.0, 8)
    logp = np.asarray(stats(params, jnp.asarray(rows["tokens"]), jnp.asarray(rows["valid"]))[0])
    rows["ref_logprobs"] = np.where(rows["loss_mask"] > 0, logp + rng.normal(0, 0.5, logp.shape), 0).astype(np.float32)
    plain = _config()
    with_kl = train_step.UpdateConfig(
        objective=dataclasses.replace(plain.objective, terms=plain.objective.terms + (("kl", 0.3),),
                                      kl_penalty=kind),
        sil=plain.sil, logprob_chunk_size=8)
    _, _, base = _run(plain, {k: v for k, v in rows.items() if k != "ref_logprobs"}, n_micro=1)
    _, _, out = _run(with_kl, rows, n_micro=1)  # one micro-batch: the metric is the exact mean
    mask = rows["loss_mask"] > 0
    expected_kl = _kl_reference(kind, logp, rows["ref_logprobs"])[mask].mean()
    np.testing.assert_allclose(float(out["kl_loss"]), expected_kl, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(out["loss"]), float(base["loss"]) + 0.3 * expected_kl, rtol=2e-4, atol=1e-6)
    assert "kl" not in out and "kl_loss" not in base


def test_external_schedule_clock_uses_the_rate_it_is_given():
    """schedule_clock='external': every update applies the rate last set with
    set_learning_rate, however many updates ran (Adam's first step moves each coordinate by
    about lr * sign(g))."""
    rows = _rows()
    graphdef, params = _model()
    config = train_step.OptimizerConfig(lr=1e-2, weight_decay=0.0, schedule="cosine", total_steps=2,
                                        schedule_clock="external")
    opt = train_step.make_optimizer(config)
    update = train_step.make_update_fn(graphdef, opt, _config(), replay=False)
    schedule = train_step.learning_rate_schedule(config)
    assert float(schedule(0)) == pytest.approx(1e-2) and float(schedule(1)) == pytest.approx(5e-3)
    assert float(schedule(2)) == pytest.approx(0.0, abs=1e-9)
    state = train_step.set_learning_rate(opt.init(params), 0.0)
    for _ in range(3):  # a zero rate leaves the params where they are
        before = [np.asarray(x) for x in jax.tree.leaves(params)]
        params, state, _ = update(params, state, _split(rows, 2), jax.random.key(0), jnp.float32(0))
        for a, b in zip(before, jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, np.asarray(b))
    _, fresh = _model()
    state = train_step.set_learning_rate(opt.init(fresh), 4e-3)
    before = [np.asarray(x) for x in jax.tree.leaves(fresh)]
    moved, _, _ = update(fresh, state, _split(rows, 2), jax.random.key(0), jnp.float32(0))
    steps = np.concatenate([np.abs(np.asarray(b) - a).ravel() for a, b in zip(before, jax.tree.leaves(moved))])
    assert steps.max() == pytest.approx(4e-3, rel=1e-3)
    with pytest.raises(TypeError, match="schedule_clock='external'"):
        train_step.set_learning_rate(train_step.make_optimizer(train_step.OptimizerConfig()).init(fresh), 1e-3)


def test_logprobs_only_pass_equals_the_stats_pass_and_drops_the_entropy():
    """The reference policy's pass (``entropy=False``) gives the same log-probs as the full
    statistics pass, and its compiled program computes no entropy output."""
    rows = _rows()
    graphdef, params = _model()
    tokens, valid = jnp.asarray(rows["tokens"]), jnp.asarray(rows["valid"])
    stats = train_step.make_token_stats_fn(graphdef, 1.0, 8)
    logprobs_only = train_step.make_token_stats_fn(graphdef, 1.0, 8, entropy=False)
    logp, entropy = stats(params, tokens, valid)
    only = logprobs_only(params, tokens, valid)
    np.testing.assert_array_equal(np.asarray(only), np.asarray(logp))
    assert entropy.shape == only.shape
    outputs = jax.eval_shape(logprobs_only, params, tokens, valid)
    assert isinstance(outputs, jax.ShapeDtypeStruct)  # one output: the log-probs


@pytest.mark.parametrize("clock", ["update", "external"])
def test_optimizer_state_is_sharded_like_the_parameters(clock):
    mesh = sharding.make_mesh(data=2, fsdp=4)
    graphdef, params = _model()
    params = sharding.shard_state(params, CFG.sharding_rules, mesh)
    optimizer = train_step.make_optimizer(train_step.OptimizerConfig(lr=1e-3, schedule_clock=clock))
    state = train_step.init_optimizer_state(optimizer, params, mesh)
    adamw = state[1] if clock == "update" else state[1].inner_state
    moments = [leaf for part in adamw if hasattr(part, "mu") for leaf in (part.mu, part.nu)]
    assert moments, "AdamW's moments were not found in the state"
    split = 0
    for moment in moments:
        for param, leaf in zip(jax.tree.leaves(params), jax.tree.leaves(moment)):
            assert leaf.sharding == param.sharding
            split += not leaf.sharding.is_fully_replicated
            np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert split > 0  # fsdp splits the model, and so its moments
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    counts = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim == 0]
    assert counts and all(leaf.sharding == replicated for leaf in counts)


@pytest.mark.parametrize("positions", [10, 4])
def test_logits_at_loss_mask_positions_only_give_the_same_update(positions):
    """logprob_positions = 10 covers every row's mask (<= 10 response tokens of 12: the LM head
    runs on 10 positions per row); 4 is too few for some rows (the full pass runs). The loss,
    the metrics and the updated params equal those of the full pass."""
    rows = _rows()
    assert np.sum(rows["loss_mask"], axis=1).max() <= 10 < rows["tokens"].shape[1]
    base = _config(entropy_coef=0.01)
    want_params, _, want = _run(base, rows, n_micro=2)
    got_params, _, got = _run(dataclasses.replace(base, logprob_positions=positions), rows, n_micro=2)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
