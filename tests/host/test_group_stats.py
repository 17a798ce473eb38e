import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from spear_jax.group_stats import (
    group_reward_metrics,
    group_trajectory_stats,
    positional_group_ids,
    resolve_group_ids,
)


def _naive(scores, group_ids, traj_ids, ddof):
    out = {}
    for g in sorted(set(group_ids.tolist())):
        trajs = {}
        for s, gi, ti in zip(scores, group_ids, traj_ids):
            if gi == g:
                trajs.setdefault(ti, []).append(s)
        means = np.array([np.mean(v) for v in trajs.values()])
        std = 0.0 if len(means) - ddof <= 0 else float(np.std(means, ddof=ddof))
        out[g] = (float(np.mean(means)), std, len(means))
    return out


def test_step_rows_use_trajectory_means():
    # Success trajectory with 3 rows (R=10), failure trajectory with 5 rows (R=0): one value per
    # trajectory, so mean 5 and population std 5 (a step-weighted mean would be 3.75).
    scores = np.array([10.0] * 3 + [0.0] * 5)
    stats = group_trajectory_stats(scores, np.zeros(8, int), np.array([0] * 3 + [1] * 5), ddof=0)
    assert stats.means.tolist() == [5.0] and stats.stds.tolist() == [5.0]
    unbiased = group_trajectory_stats(scores, np.zeros(8, int), np.array([0] * 3 + [1] * 5), ddof=1)
    assert unbiased.stds[0] == pytest.approx(np.sqrt(50.0))
    assert stats.num_trajectories.tolist() == [2] and stats.num_rows.tolist() == [8]


def test_singleton_group_std_zero_under_both_conventions():
    for ddof in (0, 1):
        stats = group_trajectory_stats(np.array([3.0, 1.0, 2.0]), np.array([7, 8, 8]), None, ddof=ddof)
        assert stats.group_keys.tolist() == [7, 8]
        assert stats.stds[0] == 0.0 and np.isfinite(stats.stds).all()


def test_order_invariance_and_traj_ids_shared_across_groups():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=40)
    groups = rng.integers(0, 5, 40)
    trajs = rng.integers(0, 3, 40)  # the same traj id in different groups is a different trajectory
    perm = rng.permutation(40)
    a = group_trajectory_stats(scores, groups, trajs)
    b = group_trajectory_stats(scores[perm], groups[perm], trajs[perm])
    np.testing.assert_allclose(a.means, b.means)
    np.testing.assert_allclose(a.stds, b.stds)
    np.testing.assert_array_equal(a.group_keys[a.row_group][perm], b.group_keys[b.row_group])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3), st.floats(-20, 20)), min_size=1, max_size=40),
    st.sampled_from([0, 1]),
)
def test_matches_naive_reference(rows, ddof):
    groups = np.array([r[0] for r in rows])
    trajs = np.array([r[1] for r in rows])
    scores = np.array([r[2] for r in rows])
    stats = group_trajectory_stats(scores, groups, trajs, ddof=ddof)
    reference = _naive(scores, groups, trajs, ddof)
    assert stats.group_keys.tolist() == sorted(reference)
    for g, mean, std, n in zip(stats.group_keys, stats.means, stats.stds, stats.num_trajectories):
        assert mean == pytest.approx(reference[g][0], abs=1e-9)
        assert std == pytest.approx(reference[g][1], abs=1e-7)
        assert n == reference[g][2]


def test_positional_grouping_option():
    np.testing.assert_array_equal(positional_group_ids(6, 3), [0, 0, 0, 1, 1, 1])
    ids = np.array([5, 9, 5, 9])
    assert resolve_group_ids(ids, "uid") is ids
    np.testing.assert_array_equal(resolve_group_ids(ids, "positional", 2), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="grouping 'rows'"):
        resolve_group_ids(ids, "rows")
    with pytest.raises(ValueError, match="group_size"):
        resolve_group_ids(ids, "positional")
    with pytest.raises(ValueError, match="multiple of group_size"):
        positional_group_ids(5, 2)


def test_metrics_helper():
    stats = group_trajectory_stats(np.array([1.0, 1.0, 0.0, 10.0]), np.array([0, 0, 1, 1]))
    metrics = group_reward_metrics(stats)
    assert metrics["reward_groups/num_groups"] == 2.0
    assert metrics["reward_groups/frac_zero_std"] == 0.5
    assert metrics["reward_groups/mean_of_stds"] == pytest.approx(2.5)
    assert group_reward_metrics(group_trajectory_stats(np.zeros(0), np.zeros(0, int))) == {
        "reward_groups/num_groups": 0.0
    }


def test_bad_input():
    with pytest.raises(ValueError, match="group_ids has 2 rows, expected 3"):
        group_trajectory_stats(np.zeros(3), np.zeros(2, int))
    with pytest.raises(ValueError, match="scores must be 1-D"):
        group_trajectory_stats(np.zeros((3, 2)), np.zeros(3, int))
    with pytest.raises(ValueError, match="ddof"):
        group_trajectory_stats(np.zeros(3), np.zeros(3, int), ddof=2)
    with pytest.raises(TypeError, match="scores must be real"):
        group_trajectory_stats(np.array(["a", "b"]), np.zeros(2, int))
