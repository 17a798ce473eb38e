import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.objectives import policy_losses as pl
from spear_jax.objectives.objective import ObjectiveConfig, policy_objective
from spear_jax.objectives.policy_losses import PolicyLossConfig

# ------------------------------------------------------------------------------------------------
# numpy references (float64)


def np_ratio_terms(logp, old, adv, eps_low, eps_high, clamp):
    lr = logp - old
    if clamp is not None:
        lr = np.clip(lr, -clamp, clamp)
    r = np.exp(lr)
    l1 = -adv * r
    l2 = -adv * np.clip(r, 1 - eps_low, 1 + eps_high)
    return lr, r, l1, l2


def np_vanilla(logp, old, adv, mask, cfg):
    lr, r, l1, l2 = np_ratio_terms(logp, old, adv, cfg.eps_low, cfg.eps_high, cfg.log_ratio_clamp)
    lc = np.maximum(l1, l2)
    dual = np.zeros_like(mask, bool)
    loss = lc
    if cfg.dual_clip_c is not None:
        l3 = -adv * cfg.dual_clip_c
        dual = (adv < 0) & (lc > l3)
        loss = np.where(adv < 0, np.minimum(lc, l3), lc)
    valid = mask > 0
    metrics = {"pg_clipfrac": (l2 > l1)[valid].mean(), "pg_clipfrac_lower": dual[valid].mean(),
               "ppo_kl": (-lr)[valid].mean()}
    grad = np.where(valid & ~(l2 > l1) & ~dual, -adv * r, 0.0)
    return np.where(valid, loss, 0.0), metrics, grad


def np_cov(adv, logp, valid):
    return np.where(valid, (adv - adv[valid].mean()) * (logp - logp[valid].mean()), 0.0)


def np_clip_cov(logp, old, adv, mask, cfg, uniforms):
    """Reference Clip-Cov with the selection driven by the given per-token uniform draws."""
    valid = mask > 0
    lr, r, l1, l2 = np_ratio_terms(logp, old, adv, cfg.eps_low, cfg.eps_high, cfg.log_ratio_clamp)
    clipped = (l2 > l1) & valid
    cov = np_cov(adv, logp, valid)
    eligible = valid & ~clipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    k = max(int(valid.sum() * cfg.clip_cov_ratio), 1)
    cand = np.flatnonzero(eligible.ravel())
    chosen = cand[np.argsort(uniforms.ravel()[cand], kind="stable")][: min(k, len(cand))]
    selected = np.zeros(mask.size, bool)
    selected[chosen] = True
    selected = selected.reshape(mask.shape)
    loss = np.where(valid & ~selected, np.maximum(l1, l2), 0.0)
    grad = np.where(valid & ~selected & ~clipped, -adv * r, 0.0)
    return loss, selected, grad


def np_kl_cov(logp, old, adv, mask, cfg):
    valid = mask > 0
    lr = np.clip(logp - old, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    r = np.exp(lr)
    cov = np_cov(adv, logp, valid)
    k = max(int(valid.sum() * cfg.kl_cov_ratio), 1)
    cand = np.flatnonzero(valid.ravel())
    chosen = cand[np.argsort(-cov.ravel()[cand], kind="stable")][: min(k, len(cand))]
    selected = np.zeros(mask.size, bool)
    selected[chosen] = True
    selected = selected.reshape(mask.shape)
    loss = np.where(valid, -adv * r + np.where(selected, cfg.kl_cov_coef * np.abs(lr), 0.0), 0.0)
    grad = np.where(valid, -adv * r + np.where(selected, cfg.kl_cov_coef * np.sign(lr), 0.0), 0.0)
    return loss, selected, grad


# ------------------------------------------------------------------------------------------------
# helpers

B, T = 6, 10


def random_inputs(seed):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 1.0, (B, T))
    logp = old + rng.normal(0.0, 0.25, (B, T))
    adv = np.repeat(rng.normal(0.0, 3.0, (B, 1)), T, axis=1)
    mask = (rng.random((B, T)) < 0.8).astype(np.float64)
    mask[rng.integers(B)] = 0.0  # one empty row
    return logp, old, adv, mask


@functools.lru_cache(maxsize=None)
def loss_and_grad(cfg):
    fn = pl.get_policy_loss(cfg.loss_mode)

    def value(logp, old, adv, mask, key):
        loss, metrics = fn(cfg, logp=logp, old_logp=old, advantages=adv, mask=mask, key=key)
        return jnp.sum(loss), (loss, metrics)

    return jax.jit(jax.grad(value, has_aux=True))


def run(cfg, logp, old, adv, mask, key=None):
    key = jax.random.key(0) if key is None else key
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    grad, (loss, metrics) = loss_and_grad(cfg)(f32(logp), f32(old), f32(adv), f32(mask), key)
    return np.asarray(loss), metrics, np.asarray(grad)


def uniforms_for(key, shape):
    return np.asarray(jax.random.uniform(key, (math.prod(shape),))).reshape(shape)


# ------------------------------------------------------------------------------------------------
# property tests against numpy


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), eps_high=st.sampled_from([0.2, 0.28]),
                  dual=st.sampled_from([None, 3.0]))
def test_vanilla_matches_numpy(seed, eps_high, dual):
    cfg = PolicyLossConfig("vanilla", eps_low=0.2, eps_high=eps_high, dual_clip_c=dual)
    logp, old, adv, mask = random_inputs(seed)
    # make some ratios large so both clips and the dual clip fire
    logp = logp + 2.0 * (np.random.default_rng(seed + 1).random((B, T)) < 0.15)
    loss, metrics, grad = run(cfg, logp, old, adv, mask)
    want_loss, want_metrics, want_grad = np_vanilla(logp, old, adv, mask, cfg)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)
    for name, want in want_metrics.items():
        np.testing.assert_allclose(metrics[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), ratio=st.sampled_from([0.05, 0.2, 1.0]),
                  key_seed=st.integers(0, 1000))
def test_clip_cov_matches_numpy_given_the_same_draws(seed, ratio, key_seed):
    cfg = PolicyLossConfig("clip_cov", eps_low=0.2, eps_high=0.28, clip_cov_ratio=ratio,
                           clip_cov_lb=0.3, clip_cov_ub=6.0)
    logp, old, adv, mask = random_inputs(seed)
    key = jax.random.key(key_seed)
    loss, metrics, grad = run(cfg, logp, old, adv, mask, key)
    want_loss, selected, want_grad = np_clip_cov(logp, old, adv, mask, cfg, uniforms_for(key, (B, T)))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)
    assert int(metrics["cov_num_selected"]) == selected.sum()
    valid = mask > 0
    cov = np_cov(adv, logp, valid)
    np.testing.assert_allclose(metrics["cov_mean"], cov[valid].mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["cov_max"], cov[valid].max(), rtol=1e-4, atol=1e-5)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), ratio=st.sampled_from([0.05, 0.3]))
def test_kl_cov_matches_numpy(seed, ratio):
    cfg = PolicyLossConfig("kl_cov", kl_cov_ratio=ratio, kl_cov_coef=0.1)
    logp, old, adv, mask = random_inputs(seed)
    loss, metrics, grad = run(cfg, logp, old, adv, mask)
    want_loss, selected, want_grad = np_kl_cov(logp, old, adv, mask, cfg)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)
    assert int(metrics["cov_num_selected"]) == selected.sum()
    np.testing.assert_allclose(metrics["ppo_kl"], np.abs(logp - old)[mask > 0].mean(), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# spec checklist: vanilla PPO


def one_token(mode="vanilla", **cfg_kw):
    cfg = PolicyLossConfig(mode, **cfg_kw)

    def at(adv, ratio=None, log_ratio=None):
        lr = math.log(ratio) if log_ratio is None else log_ratio
        loss, metrics, grad = run(cfg, [[lr]], [[0.0]], [[adv]], [[1.0]])
        return float(loss[0, 0]), float(grad[0, 0]), metrics

    return at


def test_clip_high_zero_gradient_for_positive_advantage():
    at = one_token(eps_high=0.28)
    loss, grad, metrics = at(2.0, ratio=1.5)
    assert loss == pytest.approx(-1.28 * 2.0, rel=1e-6) and grad == 0.0
    assert metrics["pg_clipfrac"] == 1.0


def test_clip_higher_asymmetry():
    at = one_token(eps_low=0.2, eps_high=0.28)
    loss, grad, _ = at(-1.0, ratio=0.7)
    assert loss == pytest.approx(0.8, rel=1e-6) and grad == 0.0
    loss, grad, _ = at(-1.0, ratio=1.25)
    assert loss == pytest.approx(1.25, rel=1e-6) and grad == pytest.approx(1.25, rel=1e-6)
    loss, grad, _ = at(1.0, ratio=1.25)
    assert loss == pytest.approx(-1.25, rel=1e-6) and grad == pytest.approx(-1.25, rel=1e-6)


def test_dual_clip():
    at = one_token(dual_clip_c=10.0)
    loss, grad, metrics = at(-1.0, ratio=20.0)
    assert loss == pytest.approx(10.0, rel=1e-6) and grad == 0.0
    assert metrics["pg_clipfrac_lower"] == 1.0


def test_log_ratio_clamp_at_20():
    at = one_token(dual_clip_c=None)
    assert at(-1.0, log_ratio=50.0)[0] == at(-1.0, log_ratio=20.0)[0] == pytest.approx(math.exp(20), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# spec checklist: Clip-Cov / KL-Cov


def band_case():
    """|V| = 100 tokens, r = 1, exactly 10 tokens with cov = 1.62 in (1, 5) (others 0.02)."""
    adv = np.zeros((1, 100))
    logp = np.full((1, 100), -3.0)
    adv[0, :10] = 1.0
    logp[0, :10] = -1.0
    return logp, logp.copy(), adv, np.ones((1, 100))


def test_clip_cov_zeroes_exactly_k_of_the_eligible_tokens():
    cfg = PolicyLossConfig("clip_cov", clip_cov_ratio=0.02, clip_cov_lb=1.0, clip_cov_ub=5.0)
    logp, old, adv, mask = band_case()
    loss, metrics, grad = run(cfg, logp, old, adv, mask, jax.random.key(3))
    selected = np.flatnonzero(loss[0, :10] == 0.0)
    assert len(selected) == 2 and int(metrics["cov_num_selected"]) == 2
    assert np.all(grad[0, selected] == 0.0)
    unselected = np.setdiff1d(np.arange(10), selected)
    np.testing.assert_allclose(loss[0, unselected], -1.0)
    np.testing.assert_allclose(grad[0, unselected], -1.0)
    assert metrics["cov_selected_fraction"] == pytest.approx(0.02)
    # the selection mask itself: exactly the zeroed tokens
    np.testing.assert_array_equal(np.flatnonzero(metrics["cov_selected"]), selected)
    # zeroed tokens stay in the token-mean denominator
    lp, o, a, m = (jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask))
    s, n, metrics = policy_objective(ObjectiveConfig(cfg), logp=lp, old_logp=o, advantages=a, mask=m,
                                     key=jax.random.key(3))
    assert float(n) == 100.0 and float(s) == pytest.approx(-8.0)
    assert metrics["cov_selected"].shape == (1, 100)
    np.testing.assert_array_equal(np.flatnonzero(metrics["cov_selected"]), selected)


def test_kl_cov_selection_mask_marks_the_top_covariance_tokens():
    cfg = PolicyLossConfig("kl_cov", kl_cov_ratio=0.02)
    logp, old, adv, mask = band_case()
    adv[0, 3] = 3.0  # tokens 3 and 7 carry the largest covariance
    adv[0, 7] = 2.0
    lp, o, a, m = (jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask))
    _, metrics = pl.kl_cov_policy_loss(cfg, logp=lp, old_logp=o, advantages=a, mask=m)
    assert metrics["cov_selected"].dtype == jnp.bool_
    np.testing.assert_array_equal(np.flatnonzero(metrics["cov_selected"]), [3, 7])
    _, vanilla_metrics = pl.vanilla_policy_loss(cfg, logp=lp, old_logp=o, advantages=a, mask=m)
    assert "cov_selected" not in vanilla_metrics


def test_clip_cov_selection_is_reproducible_and_key_driven():
    cfg = PolicyLossConfig("clip_cov", clip_cov_ratio=0.02)
    inputs = band_case()
    first = run(cfg, *inputs, jax.random.key(11))[0]
    again = run(cfg, *inputs, jax.random.key(11))[0]
    np.testing.assert_array_equal(first, again)
    picks = {tuple(np.flatnonzero(run(cfg, *inputs, jax.random.key(s))[0][0, :10] == 0)) for s in range(8)}
    assert len(picks) > 1


def test_clip_cov_selection_is_uniform_over_eligible_tokens():
    cfg = PolicyLossConfig("clip_cov", clip_cov_ratio=0.02)
    logp, old, adv, mask = (jnp.asarray(x, jnp.float32) for x in band_case())
    keys = jax.random.split(jax.random.key(5), 2000)
    losses, metrics = jax.jit(jax.vmap(lambda k: pl.clip_cov_policy_loss(
        cfg, logp=logp, old_logp=old, advantages=adv, mask=mask, key=k)))(keys)
    zeroed = np.asarray(losses)[:, 0, :10] == 0.0
    assert np.all(zeroed.sum(axis=1) == 2) and np.all(np.asarray(metrics["cov_num_selected"]) == 2)
    np.testing.assert_allclose(zeroed.mean(axis=0), 0.2, atol=0.045)  # ~5 sigma


def test_clip_cov_never_selects_masked_or_ppo_clipped_tokens():
    cfg = PolicyLossConfig("clip_cov", clip_cov_ratio=1.0, eps_high=0.28)
    logp, old, adv, mask = band_case()
    mask[0, 0] = 0.0  # in the band but masked
    logp[0, 1] += 0.0
    old[0, 1] -= math.log(1.5)  # ratio 1.5 with A>0: PPO-clipped
    loss, metrics, grad = run(cfg, logp, old, adv, mask, jax.random.key(0))
    assert loss[0, 0] == 0.0 and grad[0, 0] == 0.0  # masked: no loss either way
    assert loss[0, 1] == pytest.approx(-1.28, rel=1e-6)  # clipped, not zeroed
    # every other in-band token is selected when rho = 1
    assert np.all(loss[0, 2:10] == 0.0)
    assert int(metrics["cov_num_selected"]) == 8


def test_clip_cov_with_equal_advantages_zeroes_nothing():
    cfg = PolicyLossConfig("clip_cov", clip_cov_ratio=1.0, clip_cov_lb=1e-3)
    logp, old, _, mask = random_inputs(0)
    loss, metrics, _ = run(cfg, logp, old, np.full((B, T), 2.5), mask, jax.random.key(1))
    assert int(metrics["cov_num_selected"]) == 0
    assert np.all(loss[mask > 0] != 0.0)


def test_clip_cov_has_no_dual_clip():
    at = one_token("clip_cov", dual_clip_c=10.0)
    loss, grad, metrics = at(-1.0, ratio=20.0)
    assert loss == pytest.approx(20.0, rel=1e-5) and grad == pytest.approx(20.0, rel=1e-5)
    assert metrics["pg_clipfrac_lower"] == 0.0


def test_kl_cov_with_unit_ratio_is_plain_policy_gradient():
    cfg = PolicyLossConfig("kl_cov", kl_cov_ratio=0.5)
    logp, _, adv, mask = random_inputs(4)
    loss, metrics, _ = run(cfg, logp, logp, adv, mask)
    np.testing.assert_allclose(loss, np.where(mask > 0, -adv, 0.0), rtol=1e-6)
    assert float(metrics["ppo_kl"]) == 0.0


def test_kl_cov_penalises_the_top_covariance_tokens():
    cfg = PolicyLossConfig("kl_cov", kl_cov_ratio=0.02, kl_cov_coef=0.1)
    logp, old, adv, mask = band_case()
    logp[0, 3] += 0.01  # largest covariance: the one token (max(floor(2), 1) = 2 -> plus the next)
    old = old - 0.5  # |lr| = 0.5 everywhere (0.51 at token 3)
    loss, metrics, _ = run(cfg, logp, old, adv, mask)
    plain = -adv * np.exp(logp - old)
    penalised = np.flatnonzero(~np.isclose(loss[0], plain[0], rtol=1e-6))
    assert int(metrics["cov_num_selected"]) == 2 and 3 in penalised and len(penalised) == 2
    np.testing.assert_allclose(loss[0, penalised] - plain[0, penalised],
                               0.1 * np.abs(logp - old)[0, penalised], rtol=1e-5)


def test_log_ratio_clamp_in_cov_losses_is_the_default_and_faithful_option_overflows():
    stale = ([[100.0, -1.0]], [[0.0, -1.0]], [[0.0, 1.0]], [[1.0, 1.0]])  # A = 0 on the stale token
    sound = PolicyLossConfig("clip_cov")
    faithful = PolicyLossConfig("clip_cov", clamp_cov_log_ratio=False)
    loss, _, grad = run(sound, *stale, jax.random.key(0))
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    loss, _, _ = run(faithful, *stale, jax.random.key(0))
    assert np.isnan(loss[0, 0])


def test_masked_garbage_does_not_leak():
    cfg = PolicyLossConfig("clip_cov")
    logp, old, adv, mask = random_inputs(2)
    old = np.where(mask > 0, old, np.inf)
    loss, _, grad = run(cfg, logp, old, adv, mask, jax.random.key(0))
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert np.all(loss[mask == 0] == 0.0) and np.all(grad[mask == 0] == 0.0)


def test_selection_count_uses_float64_floor_like_the_reference():
    n = jnp.arange(5001)
    for ratio in (0.0002, 0.02, 0.07, 0.1, 0.3, 0.7, 1 / 3, 1.0):
        got = jax.jit(lambda x: pl._floor_count(ratio, x, 5000))(n)
        want = [max(int(i * ratio), 1) for i in range(5001)]
        np.testing.assert_array_equal(got, want)
    # large pools: the host thresholds agree with int(n * ratio) on random n up to 2e6
    sample = np.random.default_rng(0).integers(0, 2_000_000, 20_000)
    for ratio in (0.0002, 0.02, 0.07, 0.3):
        thresholds = pl._count_thresholds(ratio, 2_000_000)
        got = np.searchsorted(thresholds, sample, side="right")
        np.testing.assert_array_equal(got, [int(i * ratio) for i in sample])


# ------------------------------------------------------------------------------------------------
# config and input validation


@pytest.mark.parametrize("field, kwargs", [
    ("loss_mode", dict(loss_mode="gspo")),
    ("eps_low", dict(eps_low=0.0)),
    ("eps_low", dict(eps_low=1.0)),
    ("eps_high", dict(eps_high=0.0)),
    ("dual_clip_c", dict(dual_clip_c=1.0)),
    ("dual_clip_c", dict(dual_clip_c=0.5)),
    ("log_ratio_clamp", dict(log_ratio_clamp=0.0)),
    ("clip_cov_ratio", dict(clip_cov_ratio=0.0)),
    ("clip_cov_ratio", dict(clip_cov_ratio=1.5)),
    ("kl_cov_ratio", dict(kl_cov_ratio=-0.1)),
    ("clip_cov_lb", dict(clip_cov_lb=5.0, clip_cov_ub=5.0)),
    ("kl_cov_coef", dict(kl_cov_coef=-1.0)),
    ("cov_selection_scope", dict(cov_selection_scope="host")),
])
def test_bad_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**kwargs)


def test_registry_lists_valid_names():
    assert pl.get_policy_loss("clip_cov") is pl.clip_cov_policy_loss
    with pytest.raises(ValueError, match=r"valid: \['clip_cov', 'kl_cov', 'vanilla'\]"):
        pl.get_policy_loss("cispo")


def test_bad_inputs_name_the_argument():
    cfg = PolicyLossConfig()
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="old_logp must have shape"):
        pl.vanilla_policy_loss(cfg, logp=z, old_logp=jnp.zeros((2, 4)), advantages=z, mask=z)
    with pytest.raises(ValueError, match="advantages must have shape"):
        pl.vanilla_policy_loss(cfg, logp=z, old_logp=z, advantages=jnp.zeros((2,)), mask=z)
    with pytest.raises(ValueError, match="mask must have shape"):
        pl.vanilla_policy_loss(cfg, logp=z, old_logp=z, advantages=z, mask=jnp.ones((3, 2)))
    with pytest.raises(TypeError, match="logp must be a floating"):
        pl.vanilla_policy_loss(cfg, logp=jnp.zeros((2, 3), jnp.int32), old_logp=z, advantages=z, mask=z)
    with pytest.raises(ValueError, match="logp must have rank 2"):
        three = jnp.zeros(3)
        pl.vanilla_policy_loss(cfg, logp=three, old_logp=three, advantages=three, mask=three)
    with pytest.raises(ValueError, match="key"):
        pl.clip_cov_policy_loss(PolicyLossConfig("clip_cov"), logp=z, old_logp=z, advantages=z, mask=z)
    with pytest.raises(ValueError, match="mesh is required"):
        pl.clip_cov_policy_loss(PolicyLossConfig("clip_cov", cov_selection_scope="per_device"),
                                logp=z, old_logp=z, advantages=z, mask=z, key=jax.random.key(0))
    for loss in pl.POLICY_LOSSES.values():  # positional arrays: a logp / old_logp swap would pass silently
        with pytest.raises(TypeError, match="positional"):
            loss(cfg, z, z, z, z)
