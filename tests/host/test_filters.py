import collections
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from spear_jax import filters as flt
from spear_jax.group_stats import group_trajectory_stats


# ----------------------------------------------------------------------------- quality flags

def _repeated_pattern_row(repeats: int, seed: int, pad: int = 0, length_extra: int = 7):
    rng = np.random.default_rng(seed)
    pattern = rng.choice(np.arange(1000, 5000), size=20, replace=False)
    prefix = rng.integers(5000, 50000, length_extra)
    row = np.concatenate([prefix, np.tile(pattern, repeats), rng.integers(50000, 90000, length_extra)])
    return np.concatenate([row, np.full(pad, pattern[0])]), row.shape[0]


def test_twenty_gram_repeated_ten_times_is_flagged_nine_is_not():
    row10, len10 = _repeated_pattern_row(10, seed=0)
    row9, len9 = _repeated_pattern_row(9, seed=1)
    width = max(row10.shape[0], row9.shape[0])
    ids = np.zeros((2, width), dtype=np.int64)
    ids[0, :len10], ids[1, :len9] = row10, row9
    flags = flt.repetitive_flags(ids, np.array([len10, len9]))
    assert flags.tolist() == [True, False]


def test_repetition_only_counts_valid_tokens():
    row9, len9 = _repeated_pattern_row(9, seed=2, length_extra=0)
    pattern = row9[:20]
    ids = np.concatenate([row9, pattern])[None, :]  # a 10th copy, but beyond the valid length
    assert flt.repetitive_flags(ids, np.array([len9])).tolist() == [False]
    assert flt.repetitive_flags(ids, np.array([len9 + 20])).tolist() == [True]


def test_repetition_counts_overlapping_occurrences():
    ids = np.full((1, 29), 7, dtype=np.int32)  # the all-7 20-gram occurs 10 times (overlapping)
    assert flt.repetitive_flags(ids, np.array([29])).tolist() == [True]
    assert flt.repetitive_flags(ids, np.array([28])).tolist() == [False]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=60), min_size=1, max_size=5),
       st.integers(1, 4), st.integers(2, 6))
def test_repetition_matches_counter_reference(rows, ngram, min_count):
    width = max(len(r) for r in rows) + 2
    ids = np.full((len(rows), width), 1, dtype=np.int64)  # padding repeats a real token id
    for i, tokens in enumerate(rows):
        ids[i, :len(tokens)] = tokens
    expected = []
    for tokens in rows:
        counts = collections.Counter(tuple(tokens[i:i + ngram]) for i in range(len(tokens) - ngram + 1))
        expected.append(bool(counts) and max(counts.values()) >= min_count)
    got = flt.repetitive_flags(ids, np.array([len(r) for r in rows]), ngram=ngram, min_count=min_count)
    assert got.tolist() == expected


def test_repetition_is_fast_on_a_full_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150000, (1024, 512))
    start = time.perf_counter()
    flags = flt.repetitive_flags(ids, np.full(1024, 512))
    assert time.perf_counter() - start < 2.0
    assert not flags.any()


def test_overlong_incomplete_unreadable():
    assert flt.overlong_flags(np.array([511, 512, 513]), 512).tolist() == [False, True, True]
    texts = [
        "<think>go north</think><action>go north</action>",
        "<action>look</action><think>hmm</think>",
        "no tags at all",
        "<action>open door</action>",  # think tags are not required for completeness
        "<think>a</think><action>x</action><think>b</think>",
    ]
    assert flt.agent_incomplete_flags(texts).tolist() == [False, True, True, False, True]
    unreadable = ["fine text", "caf\u00e9 ok", "bad \ufffd char", "ï¿½", "ï¼Ÿ", "xĠï¿½y", "中文也可以"]
    assert flt.unreadable_flags(unreadable).tolist() == [False, False, True, True, True, True, False]


def test_mask_low_quality_rows_only_enabled_flags_and_rewards_untouched():
    ids = np.tile(np.arange(5), (4, 1))
    texts = ["<think>a</think><action>b</action>", "no action", "ok \ufffd <action>b</action>",
             "<action>b</action>"]
    flags = flt.response_quality_flags(ids, np.array([5, 3, 2, 1]), texts, max_response_length=5)
    assert flags.overlong.tolist() == [True, False, False, False]
    assert flags.incomplete.tolist() == [False, True, False, False]
    assert flags.unreadable.tolist() == [False, False, True, False]
    mask = np.ones((4, 5), dtype=np.int32)
    new_mask, metrics = flt.mask_low_quality_rows(mask, flags, ["incomplete", "unreadable"])
    assert new_mask.sum(axis=1).tolist() == [5, 0, 0, 5]
    assert mask.sum() == 20  # input untouched
    assert metrics["quality/frac_masked"] == 0.5 and metrics["quality/frac_overlong"] == 0.25
    all_mask, _ = flt.mask_low_quality_rows(mask, flags, flt.QUALITY_FLAGS)
    assert all_mask.sum(axis=1).tolist() == [0, 0, 0, 5]
    with pytest.raises(ValueError, match="unknown quality flags"):
        flt.mask_low_quality_rows(mask, flags, ["overlong", "toxic"])


def test_math_incomplete_flag_from_caller():
    flags = flt.response_quality_flags(np.zeros((2, 3), int), np.array([1, 1]), ["a", "b"], 10,
                                       incomplete=np.array([True, False]))
    assert flags.incomplete.tolist() == [True, False]
    with pytest.raises(ValueError, match="incomplete must be bool"):
        flt.response_quality_flags(np.zeros((2, 3), int), np.array([1, 1]), ["a", "b"], 10,
                                   incomplete=np.array([1, 0]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-5, 15), st.booleans()), min_size=1, max_size=30))
def test_masked_rows_keep_reward_in_group_statistics(rows):
    groups = np.array([r[0] for r in rows])
    scores = np.array([r[1] for r in rows])
    bad = np.array([r[2] for r in rows])
    flags = flt.QualityFlags(incomplete=bad, overlong=np.zeros_like(bad), repetitive=np.zeros_like(bad),
                             unreadable=np.zeros_like(bad))
    mask, _ = flt.mask_low_quality_rows(np.ones((len(rows), 4)), flags, ["incomplete"])
    assert np.all(mask[bad] == 0) and np.all(mask[~bad] == 1)
    before = group_trajectory_stats(scores, groups)
    after_filter = flt.low_variance_group_filter(scores, groups, None, ratio=1.0)
    assert after_filter.kept_rows.tolist() == list(range(len(rows)))  # masked rows are not deleted
    stats = group_trajectory_stats(scores[after_filter.kept_rows], groups[after_filter.kept_rows])
    np.testing.assert_array_equal(stats.means, before.means)


# ----------------------------------------------------------------------------- group filter

def _groups_with_stds(num_groups: int, group_size: int, rng):
    """Group g has rewards {0, s_g} split evenly, so its population std is s_g / 2."""
    spreads = rng.permutation(num_groups).astype(float)
    scores = np.concatenate([np.where(np.arange(group_size) % 2 == 0, 0.0, s) for s in spreads])
    group_ids = np.repeat(np.arange(num_groups) * 3 + 100, group_size)
    return scores, group_ids, spreads / 2


def test_keeps_int_075_groups_with_largest_std():
    rng = np.random.default_rng(0)
    scores, group_ids, stds = _groups_with_stds(32, 8, rng)
    perm = rng.permutation(scores.shape[0])  # ordering must not matter
    result = flt.low_variance_group_filter(scores[perm], group_ids[perm], None, ratio=0.75)
    kept_groups = np.unique(group_ids[perm][result.kept_rows])
    assert kept_groups.shape[0] == 24
    expected = np.sort((np.argsort(-stds)[:24]) * 3 + 100)
    np.testing.assert_array_equal(kept_groups, expected)
    assert result.kept_rows.shape[0] == 24 * 8  # whole groups by default
    assert result.metrics["group_filter/groups_kept"] == 24
    assert result.metrics["group_filter/truncated"] == 0.0
    assert result.metrics["group_filter/frac_zero_std_groups"] == pytest.approx(1 / 32)
    rev = flt.low_variance_group_filter(scores, group_ids, None, ratio=0.75, filter_type="std_rev")
    np.testing.assert_array_equal(np.unique(group_ids[rev.kept_rows]), np.sort(np.argsort(stds)[:24] * 3 + 100))


def test_trajectory_means_decide_group_std():
    # Group 0: traj A 3 rows of 10, traj B 1 row of 0 -> traj means {10, 0}, std 5.
    # Group 1: four single-row trajectories 10, 10, 10, 0 -> std 4.33: group 0 must win.
    scores = np.array([10, 10, 10, 0, 10, 10, 10, 0], dtype=float)
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    trajs = np.array([0, 0, 0, 1, 0, 1, 2, 3])
    result = flt.low_variance_group_filter(scores, groups, trajs, ratio=0.5)
    assert result.kept_rows.tolist() == [0, 1, 2, 3]


def test_ratio_one_is_a_no_op():
    rng = np.random.default_rng(1)
    scores, group_ids, _ = _groups_with_stds(5, 3, rng)
    result = flt.low_variance_group_filter(scores, group_ids, None, ratio=1.0, truncation="power_of_two", rng=rng)
    assert result.kept_rows.tolist() == list(range(15))
    assert result.metrics["group_filter/truncated"] == 0.0


def test_power_of_two_truncation():
    rng = np.random.default_rng(2)
    scores, group_ids, stds = _groups_with_stds(32, 7, rng)
    result = flt.low_variance_group_filter(scores, group_ids, None, 0.75, truncation="power_of_two",
                                           rng=np.random.default_rng(5))
    assert result.kept_rows.shape[0] == 128  # 24 * 7 = 168 rows -> 128
    assert result.metrics["group_filter/truncated"] == 1.0
    kept_groups = set(np.sort(np.argsort(-stds)[:24] * 3 + 100).tolist())
    assert set(group_ids[result.kept_rows].tolist()) <= kept_groups
    assert np.unique(result.kept_rows).shape[0] == 128
    again = flt.low_variance_group_filter(scores, group_ids, None, 0.75, truncation="power_of_two",
                                          rng=np.random.default_rng(5))
    np.testing.assert_array_equal(result.kept_rows, again.kept_rows)


def test_positional_grouping_reproduces_math_reordering_bug():
    scores = np.array([0.0, 10.0, 5.0, 6.0])
    uid = np.array([0, 0, 1, 1])
    by_uid = flt.low_variance_group_filter(scores, uid, None, 0.5, ddof=1)
    assert by_uid.kept_rows.tolist() == [0, 1]
    order = np.array([0, 2, 1, 3])  # rows reordered (length balancing) before the filter
    positional = flt.low_variance_group_filter(scores[order], uid[order], None, 0.5, ddof=1,
                                               grouping="positional", group_size=2)
    # positional "groups" are {0, 5} and {10, 6}: the kept one mixes two prompts
    assert uid[order][positional.kept_rows].tolist() == [0, 1]
    by_uid_reordered = flt.low_variance_group_filter(scores[order], uid[order], None, 0.5, ddof=1)
    assert uid[order][by_uid_reordered.kept_rows].tolist() == [0, 0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2), st.floats(0, 10)), min_size=1, max_size=60),
       st.floats(0.05, 1.0), st.sampled_from(["std", "std_rev"]))
def test_group_filter_keeps_exactly_k_whole_groups(rows, ratio, filter_type):
    groups = np.array([r[0] for r in rows])
    trajs = np.array([r[1] for r in rows])
    scores = np.array([r[2] for r in rows])
    num_groups = np.unique(groups).shape[0]
    result = flt.low_variance_group_filter(scores, groups, trajs, ratio, filter_type=filter_type)
    k = num_groups if ratio == 1.0 else int(ratio * num_groups)
    kept_groups = np.unique(groups[result.kept_rows])
    assert kept_groups.shape[0] == k
    np.testing.assert_array_equal(result.kept_rows, np.flatnonzero(np.isin(groups, kept_groups)))
    stats = group_trajectory_stats(scores, groups, trajs)
    kept_std = stats.stds[np.isin(stats.group_keys, kept_groups)]
    dropped_std = stats.stds[~np.isin(stats.group_keys, kept_groups)]
    if kept_std.size and dropped_std.size:
        if filter_type == "std":
            assert kept_std.min() >= dropped_std.max()
        else:
            assert kept_std.max() <= dropped_std.min()
    truncated = flt.low_variance_group_filter(scores, groups, trajs, ratio, filter_type=filter_type,
                                              truncation="power_of_two", rng=np.random.default_rng(0))
    n = truncated.kept_rows.shape[0]
    if ratio < 1.0:
        assert n == flt.largest_power_of_two_at_most(result.kept_rows.shape[0])
    assert set(truncated.kept_rows.tolist()) <= set(result.kept_rows.tolist())


def test_group_filter_bad_input():
    s, g = np.zeros(4), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="ratio"):
        flt.low_variance_group_filter(s, g, None, 0.0)
    with pytest.raises(ValueError, match="filter_type 'var'"):
        flt.low_variance_group_filter(s, g, None, 0.5, filter_type="var")
    with pytest.raises(ValueError, match="truncation 'pow2'"):
        flt.low_variance_group_filter(s, g, None, 0.5, truncation="pow2")
    with pytest.raises(ValueError, match="needs rng"):
        flt.low_variance_group_filter(s, g, None, 0.5, truncation="power_of_two")
    with pytest.raises(ValueError, match="group_ids has 3 rows"):
        flt.low_variance_group_filter(s, g[:3], None, 0.5)
    with pytest.raises(ValueError, match="response_ids must be a 2-D integer"):
        flt.repetitive_flags(np.zeros((2, 3)), np.array([1, 1]))
    with pytest.raises(ValueError, match="response_lengths must lie"):
        flt.repetitive_flags(np.zeros((2, 3), int), np.array([1, 4]))
    with pytest.raises(ValueError, match="max_response_length"):
        flt.overlong_flags(np.array([1]), 0)


# ----------------------------------------------------------------------------- invalid actions

def test_invalid_action_penalty_is_exactly_point_one():
    scores = np.array([10.4, 10.4, 0.3])
    steps = np.array([9.025, 9.5, 0.0])
    valid = np.array([True, False, False])
    new_scores, new_steps = flt.apply_invalid_action_penalty(scores, valid, step_rewards=steps)
    assert new_scores[0] - new_scores[1] == pytest.approx(0.1, abs=1e-12)
    np.testing.assert_allclose(new_scores, [10.4, 10.3, 0.2])
    np.testing.assert_allclose(new_steps, [9.025, 9.4, -0.1])
    assert scores.tolist() == [10.4, 10.4, 0.3]  # inputs untouched
    assert flt.apply_invalid_action_penalty(scores, valid)[1] is None
    with pytest.raises(ValueError, match="is_action_valid must be bool"):
        flt.apply_invalid_action_penalty(scores, np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="step_rewards must have shape"):
        flt.apply_invalid_action_penalty(scores, valid, step_rewards=np.zeros(2))
