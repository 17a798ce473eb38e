"""Gradients at the non-differentiable points of the objectives follow the reference's torch
semantics: clamp passes the full gradient at its bounds, |x| has derivative 0 at 0, and
min(lc, -A c) splits the gradient at a tie. Hand-computed cases first, then a direct comparison
with torch implementations of the reference formulas (skipped when torch is absent)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.objectives import _elementwise, regularizers
from spear_jax.objectives import policy_losses as pl
from spear_jax.objectives.objective import ObjectiveConfig, SILConfig, sil_objective
from spear_jax.objectives.policy_losses import PolicyLossConfig

f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731


def loss_grad(cfg, logp, old, adv, mask=None):
    """Summed per-token loss of ``cfg`` and its gradient with respect to ``logp``."""
    mask = np.ones(np.shape(logp)) if mask is None else mask
    fn = pl.get_policy_loss(cfg.loss_mode)

    def total(lp):
        return jnp.sum(fn(cfg, logp=lp, old_logp=f32(old), advantages=f32(adv), mask=f32(mask),
                          key=jax.random.key(0))[0])

    value, grad = jax.value_and_grad(total)(f32(logp))
    return float(value), np.asarray(grad)


def raw_low_var_kl(x):
    """``exp(-d) + d - 1`` for ``d = x - 0``, computed as ``kl_penalty`` does before its clamp."""
    d = f32([x]) - f32([0.0])
    return (jnp.exp(-d) + d - 1.0)[0]


def float32_input_where(fn, target, start, steps=4000):
    """A float32 ``x`` near ``start`` with ``fn(x) == target`` exactly (searched ulp by ulp)."""
    below = above = np.float32(start)
    for _ in range(steps):
        for x in (below, above):
            if float(fn(x)) == target:
                return x
        below = np.nextafter(below, np.float32(-np.inf))
        above = np.nextafter(above, np.float32(np.inf))
    raise AssertionError(f"no float32 input near {start} gives exactly {target}")


# ------------------------------------------------------------------------------------------------
# elementwise helpers


def test_clamp_passes_the_full_gradient_on_the_closed_interval():
    grad = jax.vmap(jax.grad(lambda x: _elementwise.clamp(x, -2.0, 3.0)))
    np.testing.assert_array_equal(grad(f32([-2.5, -2.0, 0.0, 3.0, 3.5])), [0.0, 1.0, 1.0, 1.0, 0.0])
    np.testing.assert_array_equal(_elementwise.clamp(f32([-2.5, -2.0, 0.5, 3.0, 9.0]), -2.0, 3.0),
                                  [-2.0, -2.0, 0.5, 3.0, 3.0])


def test_abs_has_zero_derivative_at_zero():
    grad = jax.vmap(jax.grad(_elementwise.abs_))
    np.testing.assert_array_equal(grad(f32([-1.5, 0.0, 2.0])), [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(_elementwise.abs_(f32([-1.5, 0.0, 2.0])), [1.5, 0.0, 2.0])


def test_tie_split_min_halves_the_gradient_at_a_tie():
    grad = jax.vmap(jax.grad(lambda x: _elementwise.tie_split_min(x, f32(1.0))))
    np.testing.assert_array_equal(grad(f32([0.5, 1.0, 1.5])), [1.0, 0.5, 0.0])


# ------------------------------------------------------------------------------------------------
# KL-Cov and the abs KL penalty at log r = 0


def test_kl_cov_at_unit_ratio_is_plain_policy_gradient_on_selected_tokens():
    # On the first on-policy minibatch logp == old_logp: the selected tokens' |lr| term must not
    # push them (reference: d|lr|/dlr = 0 at 0), so the gradient is -A everywhere.
    cfg = PolicyLossConfig("kl_cov", kl_cov_ratio=0.5, kl_cov_coef=0.1)
    logp = np.array([[-0.5, -1.0, -2.0, -3.0]])
    adv = np.array([[2.0, 2.0, -1.0, -1.0]])
    _, grad = loss_grad(cfg, logp, logp, adv)
    np.testing.assert_array_equal(grad, -adv)


def test_sil_kl_cov_at_unit_ratio_is_plain_policy_gradient():
    config = ObjectiveConfig(policy=PolicyLossConfig("kl_cov", kl_cov_coef=0.1))
    logp = f32([[-0.5, -1.0, -2.0, -3.0]])
    adv = f32([[2.0, 2.0, -1.0, -1.0]])

    def total(lp):
        loss_sum, normaliser, _ = sil_objective(config, SILConfig(kl_cov_ratio=0.5), 1.0, logp=lp, old_logp=logp,
                                                advantages=adv, mask=jnp.ones_like(lp), key=jax.random.key(0))
        return loss_sum / normaliser

    np.testing.assert_allclose(jax.grad(total)(logp), -adv / 4.0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["abs", "k1", "kl"])
def test_kl_penalty_gradient_at_zero_difference(kind):
    grad = jax.grad(lambda lp: jnp.sum(regularizers.kl_penalty(lp, f32([[-1.0, -2.0]]), kind)))
    want = {"abs": [[0.0, 0.0]], "k1": [[1.0, 1.0]], "kl": [[1.0, 1.0]]}[kind]
    np.testing.assert_array_equal(grad(f32([[-1.0, -2.0]])), want)


def test_kl_is_an_alias_of_k1():
    logp, ref = f32([[-1.0, -0.2]]), f32([[-1.5, -3.0]])
    np.testing.assert_array_equal(regularizers.kl_penalty(logp, ref, "kl"),
                                  regularizers.kl_penalty(logp, ref, "k1"))
    assert ObjectiveConfig(kl_penalty="kl").kl_penalty == "kl"


# ------------------------------------------------------------------------------------------------
# clamps at their bounds


@pytest.mark.parametrize("loss_mode", ["vanilla", "clip_cov", "kl_cov"])
@pytest.mark.parametrize("log_ratio, adv", [(20.0, -1.0), (-20.0, 1.0)])
def test_log_ratio_clamp_passes_the_full_gradient_at_its_bound(loss_mode, log_ratio, adv):
    # lr exactly at +-20 is inside torch.clamp's interval: d loss / d logp = -A r (unclipped by the
    # PPO clip: A < 0 above, A > 0 below; no dual clip; KL-Cov selects nothing with ratio ~ 0).
    cfg = PolicyLossConfig(loss_mode, dual_clip_c=None, kl_cov_ratio=1e-4, kl_cov_coef=0.0)
    logp, old = (log_ratio, 0.0) if log_ratio > 0 else (0.0, -log_ratio)
    _, grad = loss_grad(cfg, [[logp]], [[old]], [[adv]])
    np.testing.assert_allclose(grad, [[-adv * math.exp(log_ratio)]], rtol=1e-5)


def test_low_var_kl_clamp_passes_the_full_gradient_at_10():
    # d ~ 11 with exp(-d) + d - 1 == 10 exactly in float32 (the d ~ -2.61 crossing has no exact
    # float32 hit).
    ref = f32(0.0)
    d = float32_input_where(raw_low_var_kl, 10.0, 11.0)
    grad = jax.grad(lambda lp: regularizers.kl_penalty(lp[None], ref[None], "low_var_kl")[0])(f32(d))
    np.testing.assert_allclose(grad, 1.0 - np.exp(-np.float64(d)), rtol=1e-5)  # d/dd (e^-d + d - 1)


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_ppo_ratio_at_its_clip_bound_passes_the_full_gradient(adv):
    # r exactly at 1 + eps_high (A > 0) or 1 - eps_low (A < 0): l1 == l2, torch's max splits the
    # gradient between l1 and the clamp's l2, both -A r, so the whole gradient is -A r.
    log_ratio = 0.25 if adv > 0 else -0.25
    r = float(jnp.exp(f32(log_ratio)))
    eps = dict(eps_high=r - 1.0) if adv > 0 else dict(eps_low=1.0 - r)
    cfg = PolicyLossConfig("vanilla", dual_clip_c=None, **eps)
    _, grad = loss_grad(cfg, [[log_ratio]], [[0.0]], [[adv]])
    np.testing.assert_allclose(grad, [[-adv * r]], rtol=1e-6)


def test_dual_clip_tie_passes_half_the_gradient():
    # lc = -A r == -A c exactly: torch.min gives lc half the gradient.
    r = float(jnp.exp(f32(1.0)))
    cfg = PolicyLossConfig("vanilla", dual_clip_c=r)
    value, grad = loss_grad(cfg, [[1.0]], [[0.0]], [[-2.0]])
    assert value == pytest.approx(2.0 * r, rel=1e-6)
    np.testing.assert_allclose(grad, [[0.5 * 2.0 * r]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# direct comparison with torch implementations of the reference formulas


def torch_vanilla(logp, old, adv, eps_low, eps_high, c):
    torch = pytest.importorskip("torch")
    lr = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(lr)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    lc = torch.maximum(l1, l2)
    if c is None:
        return lc
    return torch.where(adv < 0, torch.min(-adv * c, lc), lc)


def torch_kl_cov(logp, old, adv, selected, coef):
    torch = pytest.importorskip("torch")
    lr = logp - old
    return -adv * torch.exp(lr) + torch.where(selected, coef * lr.abs(), torch.zeros_like(lr))


def torch_low_var_kl(logp, ref):
    torch = pytest.importorskip("torch")
    kl = ref - logp
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def torch_grad(fn, logp, *args):
    torch = pytest.importorskip("torch")
    x = torch.tensor(np.asarray(logp, np.float32), requires_grad=True)
    fn(x, *[torch.tensor(np.asarray(a)) for a in args]).sum().backward()
    return x.grad.numpy()


def test_vanilla_gradients_equal_torch_at_kinks_and_between():
    torch = pytest.importorskip("torch")
    r = float(jnp.exp(f32(1.0)))
    if float(torch.exp(torch.tensor(1.0))) != r:
        pytest.skip("torch and XLA exp differ at 1.0; the dual-clip tie is not a tie in both")
    log_ratio = np.array([[20.0, -20.0, 1.0, 0.1, -0.1, 0.0, 0.5, -0.5]], np.float32)
    adv = np.array([[-1.0, 1.0, -2.0, 1.5, -1.5, 3.0, 2.0, -2.0]], np.float32)
    old = np.zeros_like(log_ratio)
    cfg = PolicyLossConfig("vanilla", eps_low=0.2, eps_high=0.28, dual_clip_c=r)
    _, grad = loss_grad(cfg, log_ratio, old, adv)
    want = torch_grad(lambda x, o, a: torch_vanilla(x, o, a, 0.2, 0.28, r), log_ratio, old, adv)
    np.testing.assert_allclose(grad, want, rtol=1e-6)


def test_kl_cov_gradients_equal_torch():
    pytest.importorskip("torch")
    logp = np.array([[-0.5, -1.0, -2.0, -3.0, -1.2, -0.7]], np.float32)
    old = logp.copy()
    old[0, 3:] += np.array([0.3, -0.2, 0.0], np.float32)  # three moved tokens, three at lr = 0
    adv = np.array([[2.0, 2.0, -1.0, 1.0, 1.0, 1.0]], np.float32)
    cfg = PolicyLossConfig("kl_cov", kl_cov_ratio=1.0, kl_cov_coef=0.1)  # every token selected
    _, grad = loss_grad(cfg, logp, old, adv)
    selected = np.ones_like(logp, bool)
    want = torch_grad(lambda x, o, a, s: torch_kl_cov(x, o, a, s, 0.1), logp, old, adv, selected)
    np.testing.assert_allclose(grad, want, rtol=1e-6)


def test_low_var_kl_gradients_equal_torch():
    pytest.importorskip("torch")
    at_ten = float32_input_where(raw_low_var_kl, 10.0, 11.0)
    logp = np.array([at_ten, 0.0, 1.5, -0.5, 20.0], np.float32)
    ref = np.zeros_like(logp)
    grad = jax.grad(lambda lp: jnp.sum(regularizers.kl_penalty(lp, f32(ref), "low_var_kl")))(f32(logp))
    want = torch_grad(torch_low_var_kl, logp, ref)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
