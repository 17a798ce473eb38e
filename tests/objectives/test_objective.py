import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spear_jax.objectives import policy_losses as pl
from spear_jax.objectives import regularizers, token_stats
from spear_jax.objectives.aggregation import AggregationConfig, finalize
from spear_jax.objectives.objective import (
    ObjectiveConfig,
    SILConfig,
    policy_objective,
    replay_policy_config,
    sil_objective,
)
from spear_jax.objectives.policy_losses import PolicyLossConfig

B, T = 16, 8

# jitted entry points (configs are static): eager op-by-op dispatch is slow on a busy CPU
jit_objective = jax.jit(policy_objective, static_argnums=(0,))
jit_sil = jax.jit(sil_objective, static_argnums=(0, 1))


def terms(**coefficients):
    """The term list ``pg`` (coefficient 1) followed by ``name=coefficient`` terms."""
    return (("pg", 1.0),) + tuple(coefficients.items())


def random_inputs(seed, b=B, t=T):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 1.0, (b, t)).astype(np.float32)
    logp = (old + rng.normal(0.0, 0.3, (b, t))).astype(np.float32)
    adv = np.repeat(rng.normal(0.0, 3.0, (b, 1)), t, axis=1).astype(np.float32)
    mask = (rng.random((b, t)) < 0.8).astype(np.float32)
    mask[1] = 0.0
    entropy = rng.uniform(0.0, 3.0, (b, t)).astype(np.float32)
    ref = (old + rng.normal(0.0, 0.2, (b, t))).astype(np.float32)
    return tuple(jnp.asarray(x) for x in (logp, old, adv, mask, entropy, ref))


@functools.lru_cache(maxsize=None)
def objective_and_grad(config):
    def f(logp, old, adv, mask, entropy, ref, key):
        s, n, m = policy_objective(config, logp=logp, old_logp=old, advantages=adv, mask=mask, key=key,
                                   entropy=entropy, inputs={"ref_logprobs": ref})
        return s, (n, m)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


# ------------------------------------------------------------------------------------------------
# composition


def test_composition_is_pg_minus_entropy_plus_kl():
    logp, old, adv, mask, entropy, ref = random_inputs(0)
    cfg = ObjectiveConfig(PolicyLossConfig(eps_high=0.28), AggregationConfig("token-mean"),
                          terms=terms(entropy=0.001, kl=0.05), kl_penalty="low_var_kl")
    (s, (n, metrics)) = objective_and_grad(cfg)(logp, old, adv, mask, entropy, ref, jax.random.key(0))[0]
    pg, _ = pl.vanilla_policy_loss(cfg.policy, logp=logp, old_logp=old, advantages=adv, mask=mask)
    kl = regularizers.kl_penalty(logp, ref, "low_var_kl")
    m = np.asarray(mask)
    want = (np.asarray(pg) - 0.001 * np.asarray(entropy) + 0.05 * np.asarray(kl))[m > 0].sum()
    np.testing.assert_allclose([s, n], [want, m.sum()], rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy"], np.asarray(entropy)[m > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["pg_loss"], np.asarray(pg)[m > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], want / m.sum(), rtol=1e-5)
    assert int(metrics["num_valid_tokens"]) == m.sum()


def test_entropy_bonus_from_uniform_logits_is_minus_coef_log_vocab():
    vocab = 50
    logits = jnp.zeros((2, 5, vocab))
    ids = jnp.zeros((2, 5), jnp.int32)
    logp, entropy = token_stats.token_logprobs_and_entropy(logits, ids)
    cfg = ObjectiveConfig(terms=terms(entropy=0.001))
    s, n, metrics = jit_objective(cfg, logp=logp, old_logp=logp, advantages=jnp.zeros((2, 5)),
                                  mask=jnp.ones((2, 5)), entropy=entropy)
    assert float(finalize(s, n)) == pytest.approx(-0.001 * math.log(vocab), rel=1e-5)
    assert float(metrics["entropy"]) == pytest.approx(math.log(vocab), rel=1e-5)


def test_gradient_flows_through_entropy_and_logits():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    ids = jnp.asarray([[1, 2, 3], [4, 5, 6]])
    old = token_stats.token_logprobs(logits, ids)
    adv = jnp.full((2, 3), 0.5)
    cfg = ObjectiveConfig(terms=terms(entropy=0.01))

    def loss(z):
        logp, entropy = token_stats.token_logprobs_and_entropy(z, ids)
        return finalize(*policy_objective(cfg, logp=logp, old_logp=old, advantages=adv, mask=jnp.ones((2, 3)),
                                          entropy=entropy)[:2])

    def manual(z):
        logp, entropy = token_stats.token_logprobs_and_entropy(z, ids)
        return jnp.mean(-adv * jnp.exp(logp - old) - 0.01 * entropy)

    np.testing.assert_allclose(jax.jit(jax.grad(loss))(logits), jax.jit(jax.grad(manual))(logits),
                               rtol=1e-5, atol=1e-7)


def test_kl_penalties():
    logp = jnp.asarray([[-1.0, -2.0, -0.5]])
    ref = jnp.asarray([[-1.5, -1.0, -30.0]])
    d = np.asarray(logp - ref)
    np.testing.assert_allclose(regularizers.kl_penalty(logp, ref, "k1"), d)
    np.testing.assert_allclose(regularizers.kl_penalty(logp, ref, "abs"), np.abs(d))
    np.testing.assert_allclose(regularizers.kl_penalty(logp, ref, "k2"), 0.5 * d**2)
    k3 = np.exp(-d) + d - 1
    np.testing.assert_allclose(regularizers.kl_penalty(logp, ref, "low_var_kl"), np.clip(k3, -10, 10), rtol=1e-6)
    assert float(regularizers.kl_penalty(logp, ref, "low_var_kl")[0, 2]) == 10.0  # clamped
    with pytest.raises(ValueError, match="kind"):
        regularizers.kl_penalty(logp, ref, "k4")


def test_missing_or_mismatched_optional_inputs_raise():
    logp, old, adv, mask, entropy, ref = random_inputs(1)
    arrays = dict(logp=logp, old_logp=old, advantages=adv, mask=mask)
    with pytest.raises(ValueError, match="'entropy' needs entropy="):
        policy_objective(ObjectiveConfig(terms=terms(entropy=0.1)), **arrays)
    with pytest.raises(ValueError, match=r"\['kl'\] need inputs\['ref_logprobs'\]"):
        policy_objective(ObjectiveConfig(terms=terms(kl=0.1)), **arrays)
    with pytest.raises(ValueError, match=r"inputs\['ref_logprobs'\] must have shape"):
        policy_objective(ObjectiveConfig(terms=terms(kl=0.1)), **arrays, inputs={"ref_logprobs": ref[:, :3]})
    with pytest.raises(ValueError, match="entropy must have shape"):
        policy_objective(ObjectiveConfig(), **arrays, entropy=entropy[:, :3])
    with pytest.raises(ValueError, match="advantages must have shape"):
        policy_objective(ObjectiveConfig(), **dict(arrays, advantages=adv[:, 0]))
    with pytest.raises(TypeError, match="positional"):
        policy_objective(ObjectiveConfig(), logp, old, adv, mask)  # a swap would invert the ratio
    with pytest.raises(ValueError, match="kl_penalty"):
        ObjectiveConfig(kl_penalty="forward")
    with pytest.raises(ValueError, match="unknown loss term 'entropy_bonus'; registered: .*'entropy'"):
        ObjectiveConfig(terms=(("pg", 1.0), ("entropy_bonus", 0.1)))
    with pytest.raises(ValueError, match="finite"):
        ObjectiveConfig(terms=(("pg", math.nan),))
    with pytest.raises(ValueError, match="'pg' and 'pg_kl_cov' both report 'pg_loss'"):
        ObjectiveConfig(terms=(("pg", 1.0), ("pg_kl_cov", 1.0)))
    with pytest.raises(TypeError, match="policy must be a PolicyLossConfig"):
        ObjectiveConfig(policy={"loss_mode": "vanilla"})


# ------------------------------------------------------------------------------------------------
# micro-batch accumulation through the full objective (value and gradient w.r.t. logp)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_accumulation_equals_full_batch(mode):
    logp, old, adv, mask, entropy, ref = random_inputs(2)
    logp = logp.at[:, :2].add(0.5)  # some clipped tokens
    cfg = ObjectiveConfig(PolicyLossConfig(eps_high=0.28), AggregationConfig(mode, norm_length=T),
                          terms=terms(entropy=0.001, kl=0.01))
    fn = objective_and_grad(cfg)
    key = jax.random.key(0)
    (full_sum, (full_norm, _)), full_grad = fn(logp, old, adv, mask, entropy, ref, key)
    sums, norms, grads = 0.0, 0.0, []
    for start in range(0, B, 4):
        sl = slice(start, start + 4)
        (s, (n, _)), g = fn(logp[sl], old[sl], adv[sl], mask[sl], entropy[sl], ref[sl], key)
        sums, norms = sums + s, norms + n
        grads.append(g)
    np.testing.assert_allclose(norms, full_norm, rtol=1e-6)
    np.testing.assert_allclose(sums / norms, full_sum / full_norm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(grads) / norms, full_grad / full_norm, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# SIL (replay) term


def test_replay_parameters_agent_and_math_semantics():
    on_policy = PolicyLossConfig("clip_cov", eps_high=0.28)
    agent = replay_policy_config(on_policy, SILConfig())
    assert (agent.clip_cov_ratio, agent.clip_cov_lb, agent.clip_cov_ub) == (0.02, 2.0, 60.0)
    assert agent.eps_high == 0.28 and agent.kl_cov_ratio == 0.02
    math_tree = replay_policy_config(on_policy, SILConfig(ignore_replay_clip_cov=True))
    assert (math_tree.clip_cov_ratio, math_tree.clip_cov_lb, math_tree.clip_cov_ub) == (0.0002, 1.0, 5.0)
    assert math_tree.kl_cov_ratio == 0.02  # KL-Cov honours is_replay in both trees
    with pytest.raises(ValueError, match="clip_cov_lb"):
        SILConfig(clip_cov_lb=60.0, clip_cov_ub=2.0)
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        SILConfig(clip_cov_ratio=0.0)


def replay_band_case():
    """100 valid tokens, r = 1; 10 tokens with cov = 16.2 (inside replay band (2, 60), outside (1, 5))."""
    adv = np.zeros((1, 100), np.float32)
    logp = np.full((1, 100), -3.0, np.float32)
    adv[0, :10] = 10.0
    logp[0, :10] = -1.0
    return jnp.asarray(logp), jnp.asarray(logp), jnp.asarray(adv), jnp.ones((1, 100))


@pytest.mark.parametrize("ignore, on_policy_count", [(False, 2), (True, 0)])
def test_replay_loss_uses_replay_clip_cov_triple(ignore, on_policy_count):
    logp, old, adv, mask = replay_band_case()
    cfg = ObjectiveConfig(PolicyLossConfig("clip_cov", eps_high=0.28))
    arrays = dict(logp=logp, old_logp=old, advantages=adv, mask=mask, key=jax.random.key(0))
    _, _, on_metrics = jit_objective(cfg, **arrays)
    assert int(on_metrics["cov_num_selected"]) == 0  # on-policy triple 0.0002/1/5: cov 16.2 outside
    _, _, metrics = jit_sil(cfg, SILConfig(ignore_replay_clip_cov=ignore), 1.0, **arrays)
    assert int(metrics["cov_num_selected"]) == on_policy_count


def test_sil_weight_scales_the_sum_and_no_kl_is_added():
    logp, old, adv, mask, entropy, ref = random_inputs(3)
    adv = jnp.abs(adv)  # recalibrated advantages are >= 0
    cfg = ObjectiveConfig(PolicyLossConfig(eps_high=0.28), terms=terms(entropy=0.001, kl=0.5))
    base = ObjectiveConfig(PolicyLossConfig(eps_high=0.28), terms=terms(entropy=0.001))
    arrays = dict(logp=logp, old_logp=old, advantages=adv, mask=mask, entropy=entropy)
    s0, n0, _ = jit_objective(base, **arrays)
    lam = 0.5 * (1 - math.cos(math.pi * 1 / 100))  # lambda(1) for T = 100
    s, n, metrics = jit_sil(cfg, SILConfig(terms=terms(entropy=0.001)), lam, **arrays)
    np.testing.assert_allclose([s, n], [lam * s0, n0], rtol=1e-6)
    assert float(metrics["sil_weight"]) == pytest.approx(2.467e-4, rel=1e-3)
    assert "kl" not in metrics


def test_replay_token_above_clip_has_zero_gradient():
    cfg = ObjectiveConfig(PolicyLossConfig("clip_cov", eps_high=0.28))
    old = jnp.asarray([[-1.0, -1.0]])
    logp = old + jnp.log(jnp.asarray([[1.5, 1.1]]))
    adv = jnp.asarray([[2.0, 2.0]])
    grad = jax.jit(jax.grad(lambda lp: sil_objective(cfg, SILConfig(), 0.7, logp=lp, old_logp=old, advantages=adv,
                                                     mask=jnp.ones((1, 2)), key=jax.random.key(0))[0]))(logp)
    assert float(grad[0, 0]) == 0.0
    assert float(grad[0, 1]) == pytest.approx(-0.7 * 2.0 * 1.1, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# jit and 8-device sharding


def data_mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("loss_mode", ["vanilla", "clip_cov", "kl_cov"])
def test_global_selection_on_sharded_batch_equals_single_device(loss_mode):
    mesh = data_mesh()
    logp, old, adv, mask, entropy, ref = random_inputs(4)
    cfg = ObjectiveConfig(PolicyLossConfig(loss_mode, clip_cov_ratio=0.1, clip_cov_lb=0.2, clip_cov_ub=8.0,
                                           kl_cov_ratio=0.1), AggregationConfig("seq-mean-token-sum-norm"),
                          terms=terms(entropy=0.001))
    key = jax.random.key(9)
    fn = objective_and_grad(cfg)
    (s1, (n1, m1)), g1 = fn(logp, old, adv, mask, entropy, ref, key)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
    sharded = [put(x) for x in (logp, old, adv, mask, entropy, ref)]
    assert len(sharded[0].sharding.device_set) == 8
    (s8, (n8, m8)), g8 = fn(*sharded, key)
    np.testing.assert_allclose([s8, n8], [s1, n1], rtol=1e-6)
    np.testing.assert_allclose(g8, g1, rtol=1e-6, atol=1e-8)
    if loss_mode != "vanilla":
        assert int(m1["cov_num_selected"]) > 0
        assert int(m8["cov_num_selected"]) == int(m1["cov_num_selected"])


@pytest.mark.parametrize("loss_mode", ["clip_cov", "kl_cov"])
def test_per_device_scope_selects_per_shard(loss_mode):
    mesh = data_mesh()
    logp, old, adv, mask, _, _ = random_inputs(5)
    kw = dict(clip_cov_ratio=0.2, clip_cov_lb=0.2, clip_cov_ub=8.0, kl_cov_ratio=0.2)
    per_device = PolicyLossConfig(loss_mode, cov_selection_scope="per_device", **kw)
    one_pool = PolicyLossConfig(loss_mode, **kw)
    key = jax.random.key(2)
    loss_fn = pl.get_policy_loss(loss_mode)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
    got, metrics = jax.jit(lambda lp, o, a, m: loss_fn(per_device, logp=lp, old_logp=o, advantages=a, mask=m,
                                                       key=key, mesh=mesh))(put(logp), put(old), put(adv), put(mask))
    rows = B // 8
    jit_loss = jax.jit(lambda lp, o, a, m, k: loss_fn(one_pool, logp=lp, old_logp=o, advantages=a, mask=m, key=k))
    want, selected = [], 0
    for i in range(8):
        sl = slice(i * rows, (i + 1) * rows)
        shard_loss, shard_metrics = jit_loss(logp[sl], old[sl], adv[sl], mask[sl], jax.random.fold_in(key, i))
        want.append(shard_loss)
        selected += int(shard_metrics["cov_num_selected"])
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-6, atol=1e-7)
    assert int(metrics["cov_num_selected"]) == selected > 0
    # per-shard pools give a different selection than one global pool
    global_loss, _ = jit_loss(logp, old, adv, mask, key)
    assert not np.allclose(global_loss, got)


@pytest.mark.parametrize("scope", ["global", "per_device"])
@pytest.mark.parametrize("loss_mode", ["clip_cov", "kl_cov"])
def test_explicit_axis_mesh_gives_the_same_selection(loss_mode, scope):
    explicit = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    logp, old, adv, mask, _, _ = random_inputs(8)
    cfg = ObjectiveConfig(PolicyLossConfig(loss_mode, clip_cov_ratio=0.1, clip_cov_lb=0.2, clip_cov_ub=8.0,
                                           kl_cov_ratio=0.1, cov_selection_scope=scope))
    key = jax.random.key(4)

    def run(mesh, *arrays):
        def value(lp, o, a, m):
            return policy_objective(cfg, logp=lp, old_logp=o, advantages=a, mask=m, key=key, mesh=mesh)[0]

        return jax.jit(jax.value_and_grad(value))(*arrays)

    want_value, want_grad = run(data_mesh(), logp, old, adv, mask)
    with jax.set_mesh(explicit):
        sharded = [jax.device_put(x, NamedSharding(explicit, P("data"))) for x in (logp, old, adv, mask)]
        for arrays in (sharded, (logp, old, adv, mask)):
            value, grad = run(explicit, *arrays)
            np.testing.assert_allclose(value, want_value, rtol=1e-5)
            np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)


def test_per_device_scope_rejects_unknown_axis():
    logp, old, adv, mask, _, _ = random_inputs(6)
    cfg = PolicyLossConfig("clip_cov", cov_selection_scope="per_device", cov_selection_axis="fsdp")
    with pytest.raises(ValueError, match="cov_selection_axis 'fsdp'"):
        pl.clip_cov_policy_loss(cfg, logp=logp, old_logp=old, advantages=adv, mask=mask, key=jax.random.key(0),
                                mesh=data_mesh())


def test_gradient_matches_finite_differences_on_unclipped_tokens():
    logp, old, adv, mask, entropy, ref = random_inputs(7)
    cfg = ObjectiveConfig(PolicyLossConfig(eps_high=0.28), AggregationConfig("seq-mean-token-sum-norm"),
                          terms=terms(kl=0.1), kl_penalty="k2")
    loss = jax.jit(lambda lp: finalize(*policy_objective(cfg, logp=lp, old_logp=old, advantages=adv, mask=mask,
                                                         inputs={"ref_logprobs": ref})[:2]))
    grad = np.asarray(jax.jit(jax.grad(loss))(logp))
    ratio = np.exp(np.asarray(logp - old))
    inside = (ratio > 0.85) & (ratio < 1.2) & (np.asarray(mask) > 0)  # far from the clip edges
    clipped = ((ratio < 0.8) | (ratio > 1.28)) & (np.asarray(mask) > 0)
    assert inside.sum() > 5 and clipped.sum() > 0
    eps = 1e-2
    for i, t in list(zip(*np.nonzero(inside)))[:6]:
        up = float(loss(logp.at[i, t].add(eps)))
        down = float(loss(logp.at[i, t].add(-eps)))
        np.testing.assert_allclose(grad[i, t], (up - down) / (2 * eps), rtol=2e-2, atol=1e-5)
    # clipped tokens: only the KL term's gradient remains
    kl_grad = 0.1 * np.asarray(logp - ref) / (B * T)
    adv_np = np.asarray(adv)
    clipped_pg = clipped & (((ratio > 1.28) & (adv_np > 0)) | ((ratio < 0.8) & (adv_np < 0)))
    assert clipped_pg.sum() > 0
    np.testing.assert_allclose(grad[clipped_pg], kl_grad[clipped_pg], rtol=1e-5, atol=1e-9)
