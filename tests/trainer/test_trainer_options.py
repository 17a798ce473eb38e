"""Trainer options without a rollout: KL in the reward, minibatch shuffling, the frozen
reference copy, and the run-config checks of the KL, removed and logging fields."""
import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax import rewards, run_config, sharding, train_step
from spear_jax.run_config import ConfigError
from spear_jax.minibatches import epoch_order as _epoch_order
from spear_jax.trainer import Trainer
from spear_jax.trainer_setup import reference_params


def _config(method="grpo", arg=None):
    c = importlib.import_module(f"configs.{method}").get_config(arg)
    c.unlock()
    return c


def test_kl_in_reward_subtracts_coef_times_summed_token_kl():
    old = np.array([[0.0, -1.0, -2.0, 0.0], [-0.5, -0.5, 0.0, 0.0]], np.float32)
    ref = np.array([[0.0, -1.5, -1.0, 0.0], [-0.5, -1.0, 0.0, 0.0]], np.float32)
    mask = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    scores = np.array([1.0, -1.0], np.float32)
    penalised, metrics = rewards.kl_penalised_scores(scores, old, ref, mask, 0.1, "k1")
    # k1 = old - ref on the mask: row 0: 0.5 - 1.0 = -0.5; row 1: 0 + 0.5 = 0.5
    np.testing.assert_allclose(penalised, [1.0 + 0.05, -1.0 - 0.05], rtol=1e-6)
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(np.mean([-0.25, 0.25]))
    assert metrics["actor/reward_kl_penalty_coeff"] == pytest.approx(0.1)
    squared, _ = rewards.kl_penalised_scores(scores, old, ref, mask, 0.1, "k2")
    np.testing.assert_allclose(squared, [1.0 - 0.1 * (0.125 + 0.5), -1.0 - 0.1 * 0.125], rtol=1e-6)


def test_epoch_order_permutes_real_rows_and_keeps_padding_last():
    row_valid = np.array([True] * 6 + [False] * 2)
    np.testing.assert_array_equal(_epoch_order(row_valid, None), np.arange(8))
    order = _epoch_order(row_valid, np.random.default_rng(0))
    assert sorted(order[:6]) == list(range(6)) and list(order[6:]) == [6, 7]
    assert list(order[:6]) != list(range(6))
    np.testing.assert_array_equal(order, _epoch_order(row_valid, np.random.default_rng(0)))


def _optimize_rows(shuffle: bool, epochs: int = 2) -> list[list[int]]:
    """The row ids each minibatch of ``Trainer._optimize`` receives (the update recorded)."""
    c = _config()
    c.actor.shuffle, c.actor.ppo_epochs = shuffle, epochs
    c.actor.ppo_mini_batch_size, c.actor.ppo_micro_batch_size = 16, 8
    trainer = Trainer.__new__(Trainer)
    trainer.config, trainer.mesh = c, sharding.make_mesh(data=8)
    trainer.update_config = run_config.update_config(c)
    trainer.policy = types.SimpleNamespace(params={})
    trainer.opt_state, seen = {}, []

    def record(params, opt_state, minibatch, key, scalar):
        seen.append(np.asarray(minibatch["tokens"])[:, :, 0].ravel().tolist())
        return params, opt_state, {"loss": jnp.float32(0.0)}

    trainer._update = record
    rows, length = 40, 4
    batch = {key: np.zeros((48, length), np.float32) for key in train_step.MINIBATCH_KEYS}
    batch["tokens"] = np.repeat(np.arange(48, dtype=np.int32)[:, None], length, axis=1)
    batch["row_valid"] = np.arange(48) < rows
    metrics = trainer._optimize(batch, step=3, sil_weight=None)
    assert metrics["actor/optimizer_steps"] == 3 * epochs
    return seen


def test_shuffle_reaches_the_minibatches():
    plain = _optimize_rows(shuffle=False)
    assert plain[:3] == [list(range(0, 16)), list(range(16, 32)), list(range(32, 48))] == plain[3:]
    shuffled = _optimize_rows(shuffle=True)
    for epoch in (shuffled[:3], shuffled[3:]):
        ids = sum(epoch, [])
        assert sorted(ids[:40]) == list(range(40)) and ids[40:] == list(range(40, 48))
        assert ids != list(range(48))
    assert shuffled[:3] != shuffled[3:]  # a fresh permutation each epoch
    assert shuffled == _optimize_rows(shuffle=True)  # keyed by seed and step


def test_reference_params_are_a_separate_copy_in_the_compute_dtype():
    mesh = sharding.make_mesh(data=8)
    params = {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2),
                                  jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))),
              "n": jax.device_put(jnp.arange(3), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))}
    ref = reference_params(params, "bfloat16")
    assert ref["w"].dtype == jnp.bfloat16 and ref["n"].dtype == params["n"].dtype
    assert ref["w"].sharding == params["w"].sharding
    same = reference_params(params, "float32")
    params["w"].delete()  # as a donated update would: the copy must survive
    np.testing.assert_array_equal(np.asarray(same["w"]), np.arange(16.0).reshape(8, 2))


def test_kl_fields_are_checked():
    c = _config()
    c.actor.use_kl_loss = True  # the one override a user needs: verl's default coefficient 0.001
    run_config.validate(c, num_devices=8)
    assert ("kl", 0.001) in run_config.objective_config(c).terms
    c.actor.kl_loss_type, c.actor.kl_loss_coef = "kl", 0.0
    with pytest.raises(ConfigError, match="config.actor.kl_loss_coef > 0"):
        run_config.validate(c, num_devices=8)
    c.actor.kl_loss_coef = 0.01
    run_config.validate(c, num_devices=8)
    assert run_config.objective_config(c).kl_penalty == "kl"  # the reference's name of k1
    c.actor.kl_loss_type = "k4"
    with pytest.raises(ConfigError, match="config.actor.kl_loss_type"):
        run_config.validate(c, num_devices=8)
    c = _config()
    c.algorithm.use_kl_in_reward, c.algorithm.kl_coef = True, 0.0
    with pytest.raises(ConfigError, match="config.algorithm.kl_coef > 0"):
        run_config.validate(c, num_devices=8)
    c.algorithm.kl_coef, c.algorithm.kl_penalty = -0.1, "low_var_kl"
    with pytest.raises(ConfigError, match=r"config.algorithm.kl_coef=-0.1: must be >= 0"):
        run_config.validate(c, num_devices=8)
    c.algorithm.kl_coef = 0.1
    run_config.validate(c, num_devices=8)
    assert run_config.uses_reference_policy(c) and not run_config.uses_reference_policy(_config())


def test_removed_and_flag_fields_are_checked():
    c = _config("spear", "math_tiny")
    assert c.env.max_steps == 2 and "max_tool_turns" not in c.env
    c.env.max_tool_turns = 4  # an old config
    with pytest.raises(ConfigError, match="config.env.max_tool_turns no longer exists.*config.env.max_steps"):
        run_config.validate(c, num_devices=8)
    assert _config("spear", "aime_qwen3_32b").env.max_steps == 8
    c = _config()
    c.trainer.log_every = 0
    with pytest.raises(ConfigError, match="config.trainer.log_every=0: must be >= 1"):
        run_config.validate(c, num_devices=8)
    with pytest.raises(TypeError, match="remat"):  # the typed config: a policy name only
        c.model.remat = True
    c.trainer.log_every = 1
    c.model.remat = "True"  # what --config.model.remat=True gives
    with pytest.raises(ConfigError, match="config.model.remat='True'.*'full' is the former True"):
        run_config.validate(c, num_devices=8)


def test_model_remat_reaches_the_training_forward_and_keeps_the_loss():
    """config.model.remat builds the policy with rematerialised blocks: the differentiated
    log-prob pass of the update holds one remat more (the scanned block's), with the same value
    and grads."""
    from spear_jax.model.logprobs import sequence_token_stats
    from spear_jax.policy import load_policy

    mesh = sharding.make_mesh(data=8)
    c = _config()
    c.model.remat = "full"
    remat, plain = load_policy(c, mesh), load_policy(_config(), mesh)
    assert (remat.model_config.remat, plain.model_config.remat) == ("full", "none")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 4000, (8, 24)), jnp.int32)
    valid = jnp.ones((8, 24), bool)

    def loss(params, graphdef):
        return sequence_token_stats(graphdef, params, tokens, valid, 1.0, 512)[0].sum()

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    count = {}
    for name, policy in (("remat", remat), ("plain", plain)):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(plain.params, policy.graphdef))
        count[name] = jaxpr.count("remat2[") + jaxpr.count("checkpoint[")
    assert count["remat"] == count["plain"] + 1
    value, grads = grad_fn(plain.params, remat.graphdef)
    value_plain, grads_plain = grad_fn(plain.params, plain.graphdef)
    np.testing.assert_allclose(float(value), float(value_plain), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)  # float32 rounding
