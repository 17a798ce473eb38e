import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.objectives import advantages as adv_lib
from spear_jax.objectives.advantages import AdvantageConfig, GroupedRewards

# ------------------------------------------------------------------------------------------------
# numpy references (float64, explicit loops over groups)


def np_traj_value(scores, rows, traj, t, stats_over):
    """The sample of trajectory t among ``rows``: its rows' mean, or its first row in batch order
    (reference: the first row of each (uid, traj_index) pair enters the group's scores)."""
    own = rows & (traj == t)
    return scores[own].mean() if stats_over == "trajectories" else scores[np.flatnonzero(own)[0]]


def np_group_samples(scores, gids, valid, traj, g, stats_over):
    rows = valid & (gids == g)
    if stats_over == "rows":
        return scores[rows]
    return np.array([np_traj_value(scores, rows, traj, t, stats_over) for t in np.unique(traj[rows])])


def np_grpo(scores, gids, valid, traj, normalize, stats_over, eps=1e-6):
    out = np.zeros_like(scores)
    for g in np.unique(gids[valid]):
        rows = valid & (gids == g)
        s = np_group_samples(scores, gids, valid, traj, g, stats_over)
        mean, std = (0.0, 1.0) if len(s) == 1 else (s.mean(), s.std(ddof=1))
        out[rows] = (scores[rows] - mean) / (std + eps) if normalize else scores[rows] - mean
    return out


def np_rloo(scores, gids, valid, traj, stats_over):
    out = np.zeros_like(scores)
    for i in np.flatnonzero(valid):
        rows = valid & (gids == gids[i])
        s = np_group_samples(scores, gids, valid, traj, gids[i], stats_over)
        own = scores[i] if stats_over == "rows" else np_traj_value(scores, rows, traj, traj[i], stats_over)
        baseline = 0.0 if len(s) == 1 else (s.sum() - own) / (len(s) - 1)
        out[i] = scores[i] - baseline
    return out


def np_discounted(rewards, traj, step, valid, gamma):
    out = np.zeros_like(rewards)
    for t in np.unique(traj[valid]):
        idx = np.flatnonzero(valid & (traj == t))
        idx = idx[np.argsort(step[idx], kind="stable")]
        running = 0.0
        for i in idx[::-1]:
            running = rewards[i] + gamma * running
            out[i] = running
    return out


def np_gigpo(scores, gids, valid, traj, step, rewards, sgids, offsets, normalize, stats_over, gamma, w, eps=1e-6):
    episode = np_grpo(scores, gids, valid, traj, normalize, stats_over, eps)
    returns = np_discounted(rewards, traj, step, valid, gamma) + offsets
    step_adv = np.zeros_like(scores)
    for sg in np.unique(sgids[valid]):
        rows = valid & (sgids == sg)
        r = returns[rows]
        if len(r) == 1:
            continue
        c = r - r.mean()
        step_adv[rows] = c / (r.std(ddof=1) + eps) if normalize else c
    return np.where(valid, episode + w * step_adv, 0.0)


# ------------------------------------------------------------------------------------------------
# random batches with a fixed shape (one compilation per config)

N, NUM_GROUPS, NUM_TRAJ = 24, 5, 12
STATS_SCOPES = ["rows", "trajectories", "trajectories_first_row"]


def random_batch(seed, valid_frac=0.85):
    rng = np.random.default_rng(seed)
    traj_group = rng.integers(0, NUM_GROUPS, NUM_TRAJ)
    traj = rng.integers(0, NUM_TRAJ, N).astype(np.int32)
    gids = traj_group[traj].astype(np.int32)
    valid = rng.random(N) < valid_frac
    outcome = rng.integers(0, 3, NUM_TRAJ) * 5.0  # per-trajectory outcome, ties likely
    scores = outcome[traj] - 0.1 * (rng.random(N) < 0.3)  # per-step invalid-action penalty
    step = rng.permutation(N).astype(np.int32)
    rewards = rng.integers(0, 3, N).astype(np.float64) * (rng.random(N) < 0.5)
    anchors = rng.integers(0, 3, N)
    sgids, num_sg = adv_lib.step_group_ids_from_anchors(gids, anchors)
    offsets = -0.1 * (rng.random(N) < 0.2)
    return dict(scores=scores, gids=gids, valid=valid, traj=traj, step=step, rewards=rewards,
                sgids=sgids, num_sg=num_sg, offsets=offsets)


def to_grouped(b):
    return GroupedRewards(
        scores=jnp.asarray(b["scores"], jnp.float32),
        group_ids=jnp.asarray(b["gids"]),
        row_valid=jnp.asarray(b["valid"]),
        traj_ids=jnp.asarray(b["traj"]),
        step_index=jnp.asarray(b["step"]),
        step_rewards=jnp.asarray(b["rewards"], jnp.float32),
        step_group_ids=jnp.asarray(b["sgids"]),
        step_return_offsets=jnp.asarray(b["offsets"], jnp.float32),
    )


@functools.lru_cache(maxsize=None)
def jitted(config):
    return jax.jit(lambda batch: adv_lib.compute_advantages(batch, config))


def compute(batch, config):
    return jitted(config)(batch)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    normalize=st.booleans(),
    stats_over=st.sampled_from(STATS_SCOPES),
)
def test_grpo_matches_numpy(seed, normalize, stats_over):
    b = random_batch(seed)
    cfg = AdvantageConfig("grpo", NUM_GROUPS, normalize, stats_over=stats_over, num_trajectories=NUM_TRAJ)
    got, _ = jitted(cfg)(to_grouped(b))
    want = np_grpo(b["scores"], b["gids"], b["valid"], b["traj"], normalize, stats_over)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), stats_over=st.sampled_from(STATS_SCOPES))
def test_rloo_matches_numpy(seed, stats_over):
    b = random_batch(seed)
    cfg = AdvantageConfig("rloo", NUM_GROUPS, stats_over=stats_over, num_trajectories=NUM_TRAJ)
    got, _ = jitted(cfg)(to_grouped(b))
    want = np_rloo(b["scores"], b["gids"], b["valid"], b["traj"], stats_over)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), normalize=st.booleans(),
                  stats_over=st.sampled_from(STATS_SCOPES))
def test_gigpo_matches_numpy(seed, normalize, stats_over):
    b = random_batch(seed)
    cfg = AdvantageConfig("gigpo", NUM_GROUPS, normalize, stats_over=stats_over, num_trajectories=NUM_TRAJ,
                          gamma=0.95, step_advantage_weight=0.7, num_step_groups=N)
    got, _ = jitted(cfg)(to_grouped(b))
    want = np_gigpo(b["scores"], b["gids"], b["valid"], b["traj"], b["step"], b["rewards"], b["sgids"],
                    b["offsets"], normalize, stats_over, 0.95, 0.7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), gamma=st.sampled_from([0.0, 0.5, 0.95, 1.0]))
def test_discounted_returns_match_numpy(seed, gamma):
    b = random_batch(seed)
    fn = jax.jit(adv_lib.discounted_step_returns, static_argnums=3)
    got = fn(jnp.asarray(b["rewards"], jnp.float32), jnp.asarray(b["traj"]), jnp.asarray(b["step"]),
             gamma, jnp.asarray(b["valid"]))
    want = np_discounted(b["rewards"], b["traj"], b["step"], b["valid"], gamma)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# spec checklist numbers


def grpo(scores, gids, num_groups, **kw):
    batch = GroupedRewards(jnp.asarray(scores, jnp.float32), jnp.asarray(gids, jnp.int32),
                           traj_ids=kw.pop("traj_ids", None))
    return compute(batch, AdvantageConfig("grpo", num_groups, **kw))


@pytest.mark.parametrize("normalize", [True, False])
def test_equal_rewards_give_exactly_zero(normalize):
    a, metrics = grpo([3.0, 3.0, 3.0, 7.0, 7.0], [0, 0, 0, 1, 1], 2, normalize_by_std=normalize)
    assert np.all(np.asarray(a) == 0.0)
    assert metrics["zero_variance_group_fraction"] == 1.0


def test_drbot_advantage_is_reward_minus_group_mean():
    a, _ = grpo([10.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], 1, normalize_by_std=False)
    np.testing.assert_allclose(a, [7.5, -2.5, -2.5, -2.5], rtol=0, atol=1e-6)


def test_grpo_std_norm_uses_unbiased_std_and_eps():
    a, _ = grpo([10.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], 1, normalize_by_std=True)
    np.testing.assert_allclose(a, np.array([1.5, -0.5, -0.5, -0.5]) / (1 + 2e-7), rtol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_singleton_group_advantage_is_raw_score(normalize):
    a, metrics = grpo([4.0, 1.0, 3.0], [0, 1, 1], 2, normalize_by_std=normalize)
    np.testing.assert_allclose(a[0], 4.0 / (1 + 1e-6) if normalize else 4.0, rtol=1e-6)
    assert metrics["singleton_group_fraction"] == 0.5


def test_agent_step_weighting_counts_every_row():
    scores = [10.0] * 3 + [0.0] * 5
    traj = jnp.asarray([0] * 3 + [1] * 5, jnp.int32)
    a, _ = grpo(scores, [0] * 8, 1, normalize_by_std=False, traj_ids=traj)
    np.testing.assert_allclose(a, [6.25] * 3 + [-3.75] * 5, rtol=1e-6)
    a, _ = grpo(scores, [0] * 8, 1, normalize_by_std=False, traj_ids=traj, stats_over="trajectories",
                num_trajectories=2)
    np.testing.assert_allclose(a, [5.0] * 3 + [-5.0] * 5, rtol=1e-6)


def first_row_case():
    """Group 0: trajectory 0 (success, its first step invalid: 9.9 then 10.0) and trajectory 1
    (failure: 0.0, then two invalid steps -0.1), rows interleaved, plus a padding row of
    trajectory 1 at position 0 that must not count as its first row."""
    scores = [99.0, 9.9, 0.0, 10.0, -0.1, -0.1]
    traj = [1, 0, 1, 0, 1, 1]
    valid = [False, True, True, True, True, True]
    return GroupedRewards(jnp.asarray(scores, jnp.float32), jnp.zeros(6, jnp.int32),
                          row_valid=jnp.asarray(valid), traj_ids=jnp.asarray(traj, jnp.int32))


@pytest.mark.parametrize("normalize", [True, False])
def test_first_row_statistics_take_each_trajectorys_first_valid_row(normalize):
    # Samples 9.9 (trajectory 0) and 0.0 (trajectory 1): mean 4.95, std 9.9 / sqrt(2).
    cfg = AdvantageConfig("grpo", 1, normalize, stats_over="trajectories_first_row", num_trajectories=2)
    a, _ = compute(first_row_case(), cfg)
    centred = np.array([0.0, 4.95, -4.95, 5.05, -5.05, -5.05])
    want = centred / (9.9 / np.sqrt(2) + 1e-6) if normalize else centred
    np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6)
    # The mean rule differs: samples 9.95 and -0.2 / 3 (mean 4.941667).
    mean_rule, _ = compute(first_row_case(), AdvantageConfig("grpo", 1, False, stats_over="trajectories",
                                                             num_trajectories=2))
    np.testing.assert_allclose(mean_rule[1], 9.9 - (9.95 - 0.2 / 3) / 2, rtol=1e-5)


def test_first_row_rloo_baseline_is_the_other_trajectorys_first_row():
    cfg = AdvantageConfig("rloo", 1, stats_over="trajectories_first_row", num_trajectories=2)
    a, _ = compute(first_row_case(), cfg)
    np.testing.assert_allclose(a, [0.0, 9.9, -9.9, 10.0, -10.0, -10.0], rtol=1e-6, atol=1e-6)


def test_gigpo_episode_part_uses_the_first_row_rule():
    batch = first_row_case()._replace(
        step_index=jnp.asarray([9, 0, 0, 1, 1, 2], jnp.int32), step_rewards=jnp.zeros(6, jnp.float32),
        step_group_ids=jnp.arange(6, dtype=jnp.int32))  # singleton step groups: step part 0
    cfg = AdvantageConfig("gigpo", 1, False, stats_over="trajectories_first_row", num_trajectories=2,
                          num_step_groups=6)
    a, _ = compute(batch, cfg)
    np.testing.assert_allclose(a, [0.0, 4.95, -4.95, 5.05, -5.05, -5.05], rtol=1e-5, atol=1e-6)


def test_broadcast_masks_tokens():
    mask = jnp.asarray([[1, 1, 0], [0, 0, 0], [0, 1, 1]], jnp.int32)
    out = adv_lib.broadcast_to_tokens(jnp.asarray([2.0, -1.0, 0.5]), mask)
    np.testing.assert_array_equal(out, [[2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.5]])


def test_gigpo_discounted_returns_checklist():
    g = adv_lib.discounted_step_returns(jnp.asarray([0.0, 0.0, 10.0]), jnp.zeros(3, jnp.int32),
                                        jnp.arange(3), 0.95)
    np.testing.assert_allclose(g, [9.025, 9.5, 10.0], rtol=1e-6)


def test_gigpo_combines_std_normalised_episode_and_step_parts():
    # Group 0: trajectories 0 (success, 2 steps) and 1 (failure, 2 steps); both start from anchor
    # "s0" (one step group of 2 rows), the second steps have different anchors (singletons).
    scores = np.array([10.0, 10.0, 0.0, 0.0])
    batch = GroupedRewards(
        scores=jnp.asarray(scores, jnp.float32), group_ids=jnp.zeros(4, jnp.int32),
        traj_ids=jnp.asarray([0, 0, 1, 1], jnp.int32), step_index=jnp.asarray([0, 1, 0, 1], jnp.int32),
        step_rewards=jnp.asarray([0.0, 10.0, 0.0, 0.0], jnp.float32),
        step_group_ids=jnp.asarray([0, 1, 0, 2], jnp.int32),
    )
    cfg = AdvantageConfig("gigpo", 1, True, num_trajectories=2, num_step_groups=3, gamma=0.95)
    a, metrics = compute(batch, cfg)
    episode = (scores - 5.0) / (np.std(scores, ddof=1) + 1e-6)
    returns_first = np.array([9.5, 0.0])
    step_first = (returns_first - 4.75) / (np.std(returns_first, ddof=1) + 1e-6)
    want = episode + np.array([step_first[0], 0.0, step_first[1], 0.0])  # singleton steps: 0
    np.testing.assert_allclose(a, want, rtol=1e-5)
    assert metrics["step_singleton_group_fraction"] == pytest.approx(2 / 3)


def test_padding_rows_are_excluded_and_get_zero():
    batch = GroupedRewards(jnp.asarray([10.0, 0.0, 99.0]), jnp.asarray([0, 0, 0], jnp.int32),
                           row_valid=jnp.asarray([True, True, False]))
    a, _ = compute(batch, AdvantageConfig("grpo", 1, normalize_by_std=False))
    np.testing.assert_allclose(a, [5.0, -5.0, 0.0])


def test_group_size_metrics_expose_wrong_grouping():
    # 8 rows that should be one group of 8 but were grouped by a per-row id -> singletons.
    batch = GroupedRewards(jnp.arange(8.0), jnp.arange(8, dtype=jnp.int32))
    _, metrics = compute(batch, AdvantageConfig("grpo", 8, expected_group_size=8))
    assert metrics["group_size_mismatch_fraction"] == 1.0
    assert metrics["singleton_group_fraction"] == 1.0
    batch = GroupedRewards(jnp.arange(8.0), jnp.zeros(8, jnp.int32))
    _, metrics = compute(batch, AdvantageConfig("grpo", 8, expected_group_size=8))
    assert metrics["group_size_mismatch_fraction"] == 0.0
    assert metrics["group_size_min"] == metrics["group_size_max"] == 8


def test_out_of_range_group_ids_are_counted():
    batch = GroupedRewards(jnp.asarray([1.0, 3.0, 4.0, 9.0]), jnp.asarray([0, 0, 2, 5], jnp.int32))
    for estimator in ("grpo", "rloo"):
        a, metrics = compute(batch, AdvantageConfig(estimator, 3, normalize_by_std=False))
        assert int(metrics["num_rows_with_out_of_range_id"]) == 1
        assert float(a[3]) == 0.0 and float(a[0]) == (-1.0 if estimator == "grpo" else -2.0)


def test_zero_variance_fraction_counts_groups_of_two_or_more():
    scores = [1.0, 1.0, 0.0, 2.0, 5.0]
    _, metrics = grpo(scores, [0, 0, 1, 1, 2], 3)
    assert metrics["zero_variance_group_fraction"] == 0.5


def test_host_validator():
    adv_lib.validate_group_sizes([0, 0, 1, 1], 2)
    with pytest.raises(ValueError, match="expected group size 2"):
        adv_lib.validate_group_sizes([0, 1, 2, 3], 2)
    # agent rows: members are trajectories, not rows
    adv_lib.validate_group_sizes([0, 0, 0, 0, 0], 2, traj_ids=[5, 5, 5, 6, 6])
    with pytest.raises(ValueError, match="1 of 1 groups"):
        adv_lib.validate_group_sizes([0, 0, 0], 2, traj_ids=[5, 5, 5])
    adv_lib.validate_group_sizes([0, 0, 1, 1, 1], 2, row_valid=[1, 1, 1, 1, 0])


def test_step_group_ids_are_per_group_and_anchor():
    ids, k = adv_lib.step_group_ids_from_anchors([0, 0, 1, 0], ["a", "b", "a", "a"])
    assert k == 3 and ids[0] == ids[3] and len({ids[0], ids[1], ids[2]}) == 3


def test_registry_and_config_errors():
    assert adv_lib.get_advantage_estimator("rloo") is adv_lib.rloo_advantages
    # the built-in names are listed (test modules may have registered more)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'; valid: \[.*'gigpo', 'grpo'.*'rloo'"):
        adv_lib.get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="estimator"):
        AdvantageConfig("gae", 4)
    with pytest.raises(ValueError, match="num_groups"):
        AdvantageConfig("grpo", 0)
    with pytest.raises(ValueError, match="num_trajectories"):
        AdvantageConfig("grpo", 2, stats_over="trajectories")
    with pytest.raises(ValueError, match="stats_over"):
        AdvantageConfig("grpo", 2, stats_over="tokens")
    with pytest.raises(ValueError, match="num_step_groups"):
        AdvantageConfig("gigpo", 2, num_trajectories=2, num_step_groups=0)
    with pytest.raises(ValueError, match="gamma"):
        AdvantageConfig("gigpo", 2, num_trajectories=2, num_step_groups=2, gamma=1.5)


def test_bad_inputs_name_the_argument():
    cfg = AdvantageConfig("grpo", 2)
    with pytest.raises(ValueError, match="group_ids must have shape"):
        adv_lib.compute_advantages(GroupedRewards(jnp.zeros(4), jnp.zeros(3, jnp.int32)), cfg)
    with pytest.raises(TypeError, match="group_ids must be an integer"):
        adv_lib.compute_advantages(GroupedRewards(jnp.zeros(4), jnp.zeros(4)), cfg)
    with pytest.raises(TypeError, match="scores must be a floating"):
        adv_lib.compute_advantages(GroupedRewards(jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32)), cfg)
    with pytest.raises(ValueError, match="row_valid must have shape"):
        adv_lib.compute_advantages(GroupedRewards(jnp.zeros(4), jnp.zeros(4, jnp.int32), jnp.ones(2, bool)), cfg)
    gigpo = AdvantageConfig("gigpo", 2, num_trajectories=2, num_step_groups=2)
    with pytest.raises(ValueError, match="traj_ids is required"):
        adv_lib.compute_advantages(GroupedRewards(jnp.zeros(4), jnp.zeros(4, jnp.int32)), gigpo)
    with pytest.raises(ValueError, match="step_index is required"):
        adv_lib.compute_advantages(
            GroupedRewards(jnp.zeros(4), jnp.zeros(4, jnp.int32), traj_ids=jnp.zeros(4, jnp.int32)), gigpo)
    with pytest.raises(ValueError, match="row_advantages must have shape"):
        adv_lib.broadcast_to_tokens(jnp.zeros(3), jnp.ones((4, 2)))


def test_sharded_over_8_devices_equals_single_device():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    b = random_batch(7)
    batch = to_grouped(b)
    cfg = AdvantageConfig("gigpo", NUM_GROUPS, True, num_trajectories=NUM_TRAJ, num_step_groups=N)
    single, _ = jitted(cfg)(batch)
    sharded_batch = jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
    sharded, _ = jitted(cfg)(sharded_batch)
    assert len(sharded_batch.scores.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "gigpo"])
def test_explicit_axis_mesh_inputs_give_the_same_advantages(estimator):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    batch = to_grouped(random_batch(11))
    cfg = AdvantageConfig(estimator, NUM_GROUPS, True, stats_over="trajectories", num_trajectories=NUM_TRAJ,
                          num_step_groups=N)
    single, _ = jitted(cfg)(batch)
    with jax.set_mesh(mesh):
        sharded_batch = jax.tree.map(
            lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))), batch)
        sharded, _ = jitted(cfg)(sharded_batch)
    np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)


def test_gigpo_without_num_step_groups_allows_one_step_group_per_row():
    batch = to_grouped(random_batch(5))
    sized = AdvantageConfig("gigpo", NUM_GROUPS, True, num_trajectories=NUM_TRAJ, num_step_groups=N)
    per_row = AdvantageConfig("gigpo", NUM_GROUPS, True, num_trajectories=NUM_TRAJ)
    np.testing.assert_array_equal(adv_lib.compute_advantages(batch, per_row)[0],
                                  adv_lib.compute_advantages(batch, sized)[0])


def test_registered_estimators_declare_their_inputs():
    assert adv_lib.ADVANTAGE_ESTIMATORS["gigpo"].inputs == (
        "step_index", "step_rewards", "step_group_ids", "step_return_offsets")
    assert adv_lib.ADVANTAGE_ESTIMATORS["grpo"].inputs == ()
    with pytest.raises(ValueError, match="already registered"):
        adv_lib.register_advantage_estimator("grpo", adv_lib.grpo_advantages)
    with pytest.raises(ValueError, match="given to every estimator"):
        adv_lib.register_advantage_estimator("grpo_again", adv_lib.grpo_advantages, inputs=("scores",))
