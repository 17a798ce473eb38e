"""Loss terms: the registry, the default term lists against numpy references (values and
gradients), and the ablations that are one config line (entropy on replay rows only, KL-Cov on
replay rows)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import spear
from spear_jax import run_config
from spear_jax.objectives import terms as loss_terms
from spear_jax.objectives.aggregation import AggregationConfig, finalize
from spear_jax.objectives.objective import ObjectiveConfig, SILConfig, policy_objective, sil_objective
from spear_jax.objectives.policy_losses import PolicyLossConfig
from spear_jax.run_config import ConfigError

B, T = 6, 5
EPS_LOW, EPS_HIGH, DUAL_C = 0.2, 0.28, 10.0


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 1.0, (B, T))
    logp = old + rng.normal(0.0, 0.25, (B, T))
    adv = np.repeat(rng.normal(0.0, 2.0, (B, 1)), T, axis=1)
    mask = (rng.random((B, T)) < 0.8).astype(np.float64)
    mask[0, :2] = 1.0
    entropy = rng.uniform(0.0, 3.0, (B, T))
    ref = old + rng.normal(0.0, 0.2, (B, T))
    return {k: v.astype(np.float32) for k, v in
            dict(logp=logp, old=old, adv=adv, mask=mask, entropy=entropy, ref=ref).items()}


def _numpy_vanilla(x):
    """Per-token vanilla PPO loss (clip-higher, dual clip) and its derivative in logp (float64)."""
    lr = np.clip(x["logp"].astype(np.float64) - x["old"], -20, 20)
    r, a = np.exp(lr), x["adv"].astype(np.float64)
    l1, l2 = -a * r, -a * np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH)
    clipped = l2 > l1
    surrogate = np.where(clipped, l2, l1)
    dual = (a < 0) & (surrogate > -a * DUAL_C)
    loss = np.where(dual, -a * DUAL_C, surrogate)
    grad = np.where(clipped | dual, 0.0, -a * r)
    return loss, grad


def _numpy_low_var_kl(x):
    d = x["logp"].astype(np.float64) - x["ref"]
    return np.exp(-d) + d - 1.0, 1.0 - np.exp(-d)  # |value| < 10 here: the clamp is inactive


def _value_and_grad(fn, x):
    def scalar(lp):
        loss_sum, normaliser, metrics = fn(lp)
        return finalize(loss_sum, normaliser), metrics

    (value, metrics), grad = jax.jit(jax.value_and_grad(scalar, has_aux=True))(jnp.asarray(x["logp"]))
    return float(value), np.asarray(grad), metrics


def _arrays(x, **extra):
    return dict(logp=None, old_logp=jnp.asarray(x["old"]), advantages=jnp.asarray(x["adv"]),
                mask=jnp.asarray(x["mask"]), entropy=jnp.asarray(x["entropy"]), key=jax.random.key(0), **extra)


def _objective(config, x, **extra):
    arrays = _arrays(x, **extra)
    return lambda lp: policy_objective(config, **dict(arrays, logp=lp))


def _sil(config, sil, weight, x, **extra):
    arrays = _arrays(x, **extra)
    return lambda lp: sil_objective(config, sil, weight, **dict(arrays, logp=lp))


POLICY = PolicyLossConfig(eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip_c=DUAL_C)


def test_default_on_policy_list_matches_the_numpy_objective():
    """(pg, 1), (entropy, c_H), (kl, c_KL): loss = token-mean(pg - c_H H + c_KL KL)."""
    x = _inputs(0)
    config = ObjectiveConfig(POLICY, AggregationConfig("token-mean"),
                             terms=(("pg", 1.0), ("entropy", 0.01), ("kl", 0.1)))
    value, grad, metrics = _value_and_grad(_objective(config, x, inputs={"ref_logprobs": jnp.asarray(x["ref"])}), x)
    pg, pg_grad = _numpy_vanilla(x)
    kl, kl_grad = _numpy_low_var_kl(x)
    m = x["mask"] > 0
    total = pg - 0.01 * x["entropy"] + 0.1 * kl
    assert value == pytest.approx(total[m].mean(), rel=1e-5)
    np.testing.assert_allclose(grad, np.where(m, pg_grad + 0.1 * kl_grad, 0.0) / m.sum(), rtol=1e-4, atol=1e-7)
    assert float(metrics["pg_loss"]) == pytest.approx(pg[m].mean(), rel=1e-5)
    assert float(metrics["entropy"]) == pytest.approx(x["entropy"][m].mean(), rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(kl[m].mean(), rel=1e-4)
    assert int(metrics["num_valid_tokens"]) == m.sum()


def test_a_zero_coefficient_term_is_logged_but_not_added():
    x = _inputs(1)
    with_zero = ObjectiveConfig(POLICY, terms=(("pg", 1.0), ("entropy", 0.0)))
    value, grad, metrics = _value_and_grad(_objective(with_zero, x), x)
    plain_value, plain_grad, plain_metrics = _value_and_grad(_objective(ObjectiveConfig(POLICY), x), x)
    assert value == plain_value and np.array_equal(grad, plain_grad)
    assert "entropy" in metrics and "entropy" not in plain_metrics


def test_default_replay_list_matches_the_numpy_sil_objective():
    """SIL: lambda * sum(pg - c_H H) over the normaliser, with the replay parameters."""
    x = _inputs(2)
    x["adv"] = np.abs(x["adv"])
    config = ObjectiveConfig(POLICY, AggregationConfig("seq-mean-token-sum-norm", norm_length=T))
    sil = SILConfig(terms=(("pg", 1.0), ("entropy", 0.01)))
    loss_sum, normaliser, metrics = jax.jit(_sil(config, sil, 0.3, x))(jnp.asarray(x["logp"]))
    grad = np.asarray(jax.jit(jax.grad(lambda lp: _sil(config, sil, 0.3, x)(lp)[0]))(jnp.asarray(x["logp"])))
    pg, pg_grad = _numpy_vanilla(x)
    m = x["mask"] > 0
    assert float(normaliser) == B * T
    assert float(loss_sum) == pytest.approx(0.3 * (pg - 0.01 * x["entropy"])[m].sum(), rel=1e-5)
    np.testing.assert_allclose(grad, 0.3 * np.where(m, pg_grad, 0.0), rtol=1e-4, atol=1e-7)
    assert float(metrics["sil_weight"]) == pytest.approx(0.3)
    assert float(metrics["loss"]) == pytest.approx((pg - 0.01 * x["entropy"])[m].sum() / (B * T), rel=1e-5)


def _spear_config(**overrides):
    c = spear.get_config("twx_tiny")
    for path, value in overrides.items():
        section, name = path.split(".")
        c[section][name] = value
    run_config.validate(c, num_devices=8)
    return c


def test_default_config_lists_reproduce_the_objectives():
    c = _spear_config(**{"actor.entropy_coeff": 0.001})
    update = run_config.update_config(c)
    assert update.objective.terms == (("pg", 1.0), ("entropy", 0.001))  # kl is off: use_kl_loss False
    assert update.sil.terms == (("pg", 1.0), ("entropy", 0.001))
    c = _spear_config(**{"actor.use_kl_loss": True, "actor.kl_loss_coef": 0.02})
    assert run_config.objective_config(c).terms == (("pg", 1.0), ("entropy", 0.0), ("kl", 0.02))
    assert run_config.sil_config(c).terms == (("pg", 1.0), ("entropy", 0.0))  # no KL on replay rows


def test_entropy_bonus_on_replay_rows_only_is_one_config_line():
    c = _spear_config(**{"actor.entropy_coeff": 0.05, "actor.loss_terms": ("pg",)})
    update = run_config.update_config(c)
    assert update.objective.terms == (("pg", 1.0),)
    assert update.sil.terms == (("pg", 1.0), ("entropy", 0.05))
    x = _inputs(3)
    x["adv"] = np.abs(x["adv"])
    config = ObjectiveConfig(POLICY, AggregationConfig("token-mean"), terms=update.objective.terms)
    sil = SILConfig(terms=update.sil.terms)
    pg, _ = _numpy_vanilla(x)
    m = x["mask"] > 0
    on_value, _, on_metrics = _value_and_grad(_objective(config, x), x)
    assert on_value == pytest.approx(pg[m].mean(), rel=1e-5) and "entropy" not in on_metrics
    replay_value, _, replay_metrics = _value_and_grad(_sil(config, sil, 1.0, x), x)
    assert replay_value == pytest.approx((pg - 0.05 * x["entropy"])[m].mean(), rel=1e-5)
    assert float(replay_metrics["entropy"]) == pytest.approx(x["entropy"][m].mean(), rel=1e-5)


def _numpy_kl_cov(x, ratio, coef):
    """KL-Cov: -A r, plus coef |lr| on the max(floor(ratio |V|), 1) top-covariance valid tokens."""
    m = x["mask"] > 0
    lp, a = x["logp"].astype(np.float64), x["adv"].astype(np.float64)
    lr = lp - x["old"]
    cov = np.where(m, (a - a[m].mean()) * (lp - lp[m].mean()), -np.inf)
    k = max(int(m.sum() * ratio), 1)
    selected = np.zeros(m.size, bool)
    selected[np.argsort(-cov.ravel(), kind="stable")[:k]] = True
    selected = selected.reshape(m.shape)
    return -a * np.exp(lr) + np.where(selected, coef * np.abs(lr), 0.0), selected


def test_kl_cov_on_replay_rows_is_one_config_line():
    c = _spear_config(**{"replay.loss_terms": ("pg_kl_cov", "entropy")})
    update = run_config.update_config(c)
    assert update.objective.policy.loss_mode == "clip_cov"  # on-policy keeps its own mode
    assert update.sil.terms == (("pg_kl_cov", 1.0), ("entropy", 0.0))
    x = _inputs(4)
    x["adv"] = np.abs(x["adv"])
    config = ObjectiveConfig(PolicyLossConfig("clip_cov", eps_high=EPS_HIGH, kl_cov_coef=0.5),
                             AggregationConfig("token-mean"), terms=update.objective.terms)
    sil = SILConfig(terms=update.sil.terms, kl_cov_ratio=0.25)
    value, _, metrics = _value_and_grad(_sil(config, sil, 1.0, x), x)
    want, selected = _numpy_kl_cov(x, ratio=0.25, coef=0.5)
    m = x["mask"] > 0
    assert value == pytest.approx(want[m].mean(), rel=1e-5)
    assert int(metrics["cov_num_selected"]) == selected.sum() == max(int(m.sum() * 0.25), 1)
    np.testing.assert_array_equal(np.asarray(metrics["cov_selected"]), selected)
    on_value, _, on_metrics = _value_and_grad(_objective(config, x), x)  # clip_cov on-policy
    assert on_value != pytest.approx(value) and "cov_selected" in on_metrics


# ------------------------------------------------------------------------------------------------
# registry and start-up validation


@pytest.fixture
def registered():
    """Registers terms for one test and removes them afterwards."""
    names = []

    def register(term):
        loss_terms.register_loss_term(term)
        names.append(term.name)
        return term

    yield register
    for name in names:
        loss_terms.LOSS_TERMS.pop(name, None)


def _half_logp(config, inputs):
    return loss_terms.TermValue(0.5 * inputs.logp, inputs.logp)


def test_registry_errors_name_the_problem(registered):
    with pytest.raises(ValueError, match=r"unknown loss term 'entropy_bonus'; registered: \[.*'entropy'.*'pg'"):
        loss_terms.get_loss_term("entropy_bonus")
    registered(loss_terms.LossTerm("half_logp", _half_logp, metric="half_logp"))
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        loss_terms.register_loss_term(loss_terms.LossTerm("half_logp", _half_logp, metric="half_logp"))
    with pytest.raises(ValueError, match="metric 'loss' is reserved"):
        loss_terms.LossTerm("bad", _half_logp, metric="loss")
    with pytest.raises(ValueError, match=r"inputs \['entropy'\] are standard inputs"):
        loss_terms.LossTerm("bad", _half_logp, metric="bad", inputs=("entropy",))
    assert loss_terms.declared_inputs((("pg", 1.0), ("kl", 0.1), ("kl", 0.1))) == ("ref_logprobs",)


def test_config_lists_are_validated_at_start_up(registered):
    with pytest.raises(ConfigError, match=r"config.replay.loss_terms=.*registered loss terms, not 'entropy_bonus'; "
                                          r"registered: \[.*'pg_kl_cov'"):
        _spear_config(**{"replay.loss_terms": ("pg", "entropy_bonus")})
    with pytest.raises(ConfigError, match=r"config.actor.loss_terms=.*\(name, coefficient\) pairs, not \('pg',\)"):
        _spear_config(**{"actor.loss_terms": (("pg",),)})
    with pytest.raises(ConfigError, match="both report 'pg_loss'"):
        _spear_config(**{"actor.loss_terms": ("pg", "pg_vanilla")})
    registered(loss_terms.LossTerm("needs_rewardz", _half_logp, metric="rewardz", inputs=("rewardz",)))
    with pytest.raises(ConfigError, match=r"config.replay.loss_terms: loss term 'needs_rewardz' reads \['rewardz'\], "
                                          r"which the training batch does not hold; declare inputs among .*'reward'"):
        _spear_config(**{"replay.loss_terms": ("pg", ("needs_rewardz", 1.0))})
    registered(loss_terms.LossTerm("typo_field", _half_logp, metric="typo", coefficient_field="actor.entropy_coef"))
    with pytest.raises(ConfigError, match="declares the field config.actor.entropy_coef, which the config does not"):
        _spear_config(**{"actor.loss_terms": ("pg", ("typo_field", 1.0))})


def test_an_explicit_kl_pair_on_replay_turns_on_the_reference_policy():
    c = _spear_config(**{"replay.loss_terms": ("pg", ("kl", 0.01))})
    assert not c.actor.use_kl_loss and run_config.uses_reference_policy(c)
    update = run_config.update_config(c)
    assert ("kl", 0.01) in update.sil.terms and all(name != "kl" for name, _ in update.objective.terms)
    from spear_jax import train_step
    assert train_step.batch_keys(update, replay=True)[-1] == "ref_logprobs"
    assert "ref_logprobs" not in train_step.batch_keys(update, replay=False)
    assert math.isclose(dict(update.sil.terms)["kl"], 0.01)
