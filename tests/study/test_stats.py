"""The study statistics on hand-made numbers with known answers."""
import numpy as np
import pytest

from spear_jax.study import stats


def test_auc_is_the_mean_of_the_piecewise_linear_curve():
    # 0 -> 1 linearly over [0, 10], then flat at 1 over [10, 20]: area 5 + 10 over span 20.
    assert stats.curve_auc([0, 10, 20], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    # uneven spacing: trapezoids of widths 5 and 15.
    assert stats.curve_auc([0, 5, 20], [0.2, 0.4, 0.0]) == pytest.approx((5 * 0.3 + 15 * 0.2) / 20)
    assert stats.curve_auc([3], [0.4]) == 0.4


@pytest.mark.parametrize("steps, values", [([0, 0], [1.0, 1.0]), ([5, 1], [0.0, 1.0]), ([], []), ([0, 1], [1.0])])
def test_auc_refuses_a_malformed_curve(steps, values):
    with pytest.raises(ValueError, match="curve_auc"):
        stats.curve_auc(steps, values)


def test_curve_summary_final_best_auc():
    assert stats.curve_summary([0, 5, 10], [0.2, 0.6, 0.4]) == {
        "final": 0.4, "best": 0.6, "auc": pytest.approx((5 * 0.4 + 5 * 0.5) / 10)}


def test_bootstrap_interval_is_the_percentiles_of_resampled_means():
    values = [0.1, 0.5, 0.2, 0.9, 0.4]
    low, high = stats.bootstrap_interval(values, resamples=2000, seed=3)
    rng = np.random.default_rng(3)
    means = np.asarray(values)[rng.integers(0, 5, size=(2000, 5))].mean(axis=1)
    assert (low, high) == (np.percentile(means, 2.5), np.percentile(means, 97.5))
    assert min(values) < low < np.mean(values) < high < max(values)


def test_bootstrap_interval_is_deterministic_and_degenerate_without_spread():
    assert stats.bootstrap_interval([0.3, 0.7, 0.1]) == stats.bootstrap_interval([0.3, 0.7, 0.1])
    assert stats.bootstrap_interval([0.25, 0.25, 0.25]) == (0.25, 0.25)
    assert stats.bootstrap_interval([0.4]) == (0.4, 0.4)
    with pytest.raises(ValueError, match="non-empty"):
        stats.bootstrap_interval([])


def test_summarize():
    summary = stats.summarize([0.2, 0.4])
    assert summary["n"] == 2 and summary["mean"] == pytest.approx(0.3)
    assert 0.2 <= summary["ci_low"] <= summary["ci_high"] <= 0.4


def test_paired_differences_use_the_seeds_both_have():
    paired = stats.paired_differences({0: 0.5, 1: 0.7, 2: 0.9}, {1: 0.6, 2: 0.6, 3: 0.1})
    assert paired["seeds"] == [1, 2]
    assert paired["values"] == pytest.approx([0.1, 0.3])
    assert paired["mean"] == pytest.approx(0.2) and paired["n"] == 2
    # a constant shift is an interval of width zero, which unpaired intervals would not give.
    shifted = stats.paired_differences({0: 0.3, 1: 0.9, 2: 0.5}, {0: 0.2, 1: 0.8, 2: 0.4})
    assert shifted["ci_low"] == pytest.approx(0.1) and shifted["ci_high"] == pytest.approx(0.1)
    assert stats.paired_differences({0: 1.0}, {1: 1.0}) is None
