import math

import numpy as np
import pytest

from spear_jax import curriculum as cur


def test_cosine_toolcall_factor_spec_points():
    T = 200
    assert cur.toolcall_reward_factor(0, "cosine", T) == 1.0
    assert cur.toolcall_reward_factor(T // 2, "cosine", T) == pytest.approx(0.5, abs=1e-12)
    assert cur.toolcall_reward_factor(T, "cosine", T) == pytest.approx(0.0, abs=1e-12)
    assert cur.toolcall_reward_factor(T + 1, "cosine", T) == 0.0
    assert cur.toolcall_reward_factor(10 * T, "cosine", T) == 0.0


def test_constant_and_none_modes():
    steps = np.array([0, 1, 50, 100, 1000])
    np.testing.assert_array_equal(cur.toolcall_reward_factor(steps, "constant", 100), np.ones(5))
    np.testing.assert_array_equal(cur.toolcall_reward_factor(steps, "none", 100), np.zeros(5))


def test_factor_vectorised_matches_scalar():
    steps = np.arange(0, 260)
    vec = cur.toolcall_reward_factor(steps, "cosine", 200)
    assert vec.shape == steps.shape
    expected = [(math.cos(math.pi * t / 200) + 1) / 2 if t <= 200 else 0.0 for t in steps]
    np.testing.assert_allclose(vec, expected, atol=1e-15)
    assert np.all(np.diff(vec) <= 0)


def test_sil_weight_spec_points():
    assert cur.sil_loss_weight(1, 1.0, 100) == pytest.approx(2.467e-4, rel=1e-3)
    assert cur.sil_loss_weight(1, 1.0, 100) == pytest.approx(math.sin(math.pi / 200) ** 2, rel=1e-12)
    assert cur.sil_loss_weight(50, 1.0, 100) == pytest.approx(0.5, abs=1e-12)
    assert cur.sil_loss_weight(100, 1.0, 100) == pytest.approx(1.0, abs=1e-12)
    assert cur.sil_loss_weight(150, 1.0, 100) == 1.0
    assert cur.sil_loss_weight(0, 1.0, 100) == 0.0
    assert cur.sil_loss_weight(150, 0.001, 100) == 0.001
    weights = cur.sil_loss_weight(np.arange(0, 301), 2.0, 300)
    assert np.all(np.diff(weights) >= 0) and weights[-1] == pytest.approx(2.0)


def test_agent_bonus_spec_examples():
    assert cur.agent_toolcall_bonus(4, cur.toolcall_reward_factor(0, "cosine", 200)) == pytest.approx(0.4)
    assert cur.agent_toolcall_bonus(50, cur.toolcall_reward_factor(0, "cosine", 200)) == pytest.approx(1.0)
    assert cur.agent_toolcall_bonus(10, cur.toolcall_reward_factor(0, "cosine", 200)) == pytest.approx(1.0)
    assert cur.agent_toolcall_bonus(4, cur.toolcall_reward_factor(100, "cosine", 200)) == pytest.approx(0.2)
    assert cur.agent_toolcall_bonus(4, cur.toolcall_reward_factor(250, "cosine", 200)) == 0.0
    assert cur.agent_toolcall_bonus(4, cur.toolcall_reward_factor(250, "constant", 200)) == pytest.approx(0.4)
    assert cur.agent_toolcall_bonus(4, cur.toolcall_reward_factor(0, "none", 200)) == 0.0
    np.testing.assert_allclose(
        cur.agent_toolcall_bonus(np.array([0, 1, 4, 9, 10, 50]), cur.toolcall_reward_factor(0, "cosine", 200)),
        [0.0, 0.1, 0.4, 0.9, 1.0, 1.0],
    )


def test_math_qwen25_recipe():
    assert cur.math_toolcall_score(-1.0, 3, cur.toolcall_reward_factor(0, "cosine", 200), "qwen2.5") == pytest.approx(-1 + 0.3)
    assert cur.math_toolcall_score(-1.0, 15, cur.toolcall_reward_factor(0, "cosine", 200), "qwen2.5") == pytest.approx(-1 + 1.0)
    assert cur.math_toolcall_score(1.0, 15, cur.toolcall_reward_factor(0, "cosine", 200), "qwen2.5") == pytest.approx(2.0)
    assert cur.math_toolcall_score(1.0, 3, cur.toolcall_reward_factor(100, "cosine", 200), "qwen2.5") == pytest.approx(1.15)
    assert cur.math_toolcall_score(1.0, 3, cur.toolcall_reward_factor(201, "cosine", 200), "qwen2.5") == 1.0


def test_math_qwen3_recipe():
    assert cur.math_toolcall_score(1.0, 1, cur.toolcall_reward_factor(0, "cosine", 200), "qwen3") == pytest.approx(2.0)
    assert cur.math_toolcall_score(1.0, 3, cur.toolcall_reward_factor(0, "cosine", 200), "qwen3") == pytest.approx(2.0)
    assert cur.math_toolcall_score(1.0, 0, cur.toolcall_reward_factor(0, "cosine", 200), "qwen3") == 1.0
    assert cur.math_toolcall_score(-1.0, 3, cur.toolcall_reward_factor(0, "cosine", 200), "qwen3") == pytest.approx(-0.7)
    assert cur.math_toolcall_score(-1.0, 30, cur.toolcall_reward_factor(0, "cosine", 200), "qwen3") == pytest.approx(0.0)
    scores = cur.math_toolcall_score(np.array([1.0, -1.0, 1.0]), np.array([2, 2, 0]), cur.toolcall_reward_factor(100, "cosine", 200), "qwen3")
    np.testing.assert_allclose(scores, [1.5, -0.9, 1.0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: cur.toolcall_reward_factor(1, "linear", 100), "toolcall reward mode 'linear'"),
        (lambda: cur.toolcall_reward_factor(1, "cosine", 0), "max_toolcall_steps"),
        (lambda: cur.toolcall_reward_factor(-1, "cosine", 10), "step"),
        (lambda: cur.sil_loss_weight(1, 1.0, 0), "max_replay_loss_steps"),
        (lambda: cur.sil_loss_weight(1, float("nan"), 10), "replay_loss_coef"),
        (lambda: cur.math_toolcall_score(1, 1, cur.toolcall_reward_factor(0, "cosine", 10), "qwen4"), "math recipe 'qwen4'"),
        (lambda: cur.math_toolcall_score(1, -1, cur.toolcall_reward_factor(0, "cosine", 10)), "num_tool_calls"),
        (lambda: cur.agent_toolcall_bonus(-3, cur.toolcall_reward_factor(0, "cosine", 10)), "episode_length"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_step_schedule_computes_each_value_once_per_step():
    lr_ticks = []

    def learning_rate(tick):
        lr_ticks.append(tick)
        return 0.5 / (tick + 1)

    config = cur.ScheduleConfig("cosine", 200, 2.0, 100, learning_rate)
    schedule = cur.step_schedule(100, config)
    assert schedule.toolcall_factor == cur.toolcall_reward_factor(100, "cosine", 200) == pytest.approx(0.5)
    assert schedule.sil_weight == cur.sil_loss_weight(100, 2.0, 100) == 2.0
    assert schedule.learning_rate == 0.5 / 100 and lr_ticks == [99]  # step t trains at lr(t - 1)
    without_replay = cur.step_schedule(100, cur.ScheduleConfig("cosine", 200, None, 100, learning_rate))
    assert without_replay.sil_weight == 0.0
