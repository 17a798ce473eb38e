"""Each batch-preparation stage of ``spear_jax.prepare`` on hand-built rows: no model, no
environment, expectations computed by hand."""
import numpy as np
import pytest

from spear_jax import prepare
from spear_jax.objectives.advantages import AdvantageConfig
from spear_jax.prepare import (AdvantageSetup, GroupFilterConfig, PackConfig, PenaltyConfig,
                               QualityFilterConfig)
from spear_jax.rollout import Row

ACTION = "<think>go</think><action>look</action>"


def _row(prompt=(1, 2), response=(3, 4), group_id=0, traj_id=0, **fields) -> Row:
    values = dict(
        prompt_ids=np.asarray(prompt, np.int32), response_ids=np.asarray(response, np.int32),
        loss_mask=np.ones(len(response), np.int8), logprobs=np.full(len(response), -0.5, np.float32),
        group_id=group_id, traj_id=traj_id, step_index=0, reward=0.0, action_valid=True, num_tool_calls=0,
        anchor_obs="room", response_text=ACTION, finish_reason="stop", overlong=False, incomplete=False,
        task_id=0, task_type="coin", episode_return=0.0, episode_length=1)
    values.update(fields)
    return Row(**values)


def _four_rows(**per_row):
    """Two groups of two one-row trajectories; ``per_row`` maps a field to its 4 values."""
    return [_row(group_id=i // 2, traj_id=i, **{k: v[i] for k, v in per_row.items()}) for i in range(4)]


# -- 2. shape rewards ------------------------------------------------------------------------------

def test_shape_rewards_adds_the_agent_bonus_times_kappa():
    rows = [_row(episode_return=1.0, episode_length=4), _row(episode_return=0.0, episode_length=20)]
    scores, metrics = prepare.shape_rewards(rows, 0.5, "agent")
    # R = return + min(1, 0.1 * length) * kappa: 1 + 0.4 * 0.5, 0 + 1 * 0.5
    np.testing.assert_allclose(scores, [1.2, 0.5], rtol=1e-6)
    assert scores.dtype == np.float32
    assert metrics == {"reward/toolcall_factor": 0.5, "reward/shaped_mean": pytest.approx(0.85)}


def test_shape_rewards_math_recipes_and_an_empty_rollout():
    rows = [_row(episode_return=-1.0, num_tool_calls=3), _row(episode_return=1.0, num_tool_calls=3)]
    qwen25, _ = prepare.shape_rewards(rows, 1.0, "qwen2.5")
    np.testing.assert_allclose(qwen25, [-0.7, 1.3], rtol=1e-6)
    qwen3, _ = prepare.shape_rewards(rows, 1.0, "qwen3")  # correct tool users get a flat kappa
    np.testing.assert_allclose(qwen3, [-0.7, 2.0], rtol=1e-6)
    with pytest.raises(RuntimeError, match="no rows"):
        prepare.shape_rewards([], 1.0, "agent")


# -- 3. filter groups ------------------------------------------------------------------------------

def test_filter_groups_keeps_the_varied_group():
    rows = _four_rows()
    scores = np.array([1.0, 1.0, 0.0, 1.0], np.float32)  # group 0: std 0, group 1: std 0.5
    kept, kept_scores, metrics = prepare.filter_groups(rows, scores, GroupFilterConfig(ratio=0.5),
                                                       np.random.default_rng(0))
    assert kept == rows[2:]
    np.testing.assert_array_equal(kept_scores, [0.0, 1.0])
    assert metrics["filter/group_filter/groups_kept"] == 1.0
    assert metrics["filter/group_filter/frac_zero_std_groups"] == 0.5
    everything, _, _ = prepare.filter_groups(rows, scores, GroupFilterConfig(ratio=1.0), np.random.default_rng(0))
    assert everything == rows


def test_filter_groups_power_of_two_truncation_draws_from_the_rng():
    rows = [_row(group_id=i // 3, traj_id=i) for i in range(9)]
    scores = np.array([0, 1, 2, 0, 0, 1, 1, 1, 1], np.float32)  # group 2 has no variance
    config = GroupFilterConfig(ratio=0.7, truncation="power_of_two")  # 2 groups: 6 rows -> 4
    kept, _, metrics = prepare.filter_groups(rows, scores, config, np.random.default_rng(3))
    assert len(kept) == 4 and metrics["filter/group_filter/truncated"] == 1.0
    again, _, _ = prepare.filter_groups(rows, scores, config, np.random.default_rng(3))
    assert again == kept and all(row.group_id < 2 for row in kept)


# -- 3. mask low-quality rows ----------------------------------------------------------------------

def test_mask_low_quality_masks_only_enabled_flags():
    rows = [_row(response=(3, 4, 5), overlong=True, response_text=ACTION),
            _row(response=(3, 4), incomplete=True, response_text="no action here")]
    config = QualityFilterConfig(enabled=("overlong",))
    masked, flags, metrics = prepare.mask_low_quality(rows, config)
    np.testing.assert_array_equal(masked, [True, False])
    np.testing.assert_array_equal(flags["overlong"], [True, False])
    np.testing.assert_array_equal(flags["incomplete"], [False, True])  # flagged, not enabled
    assert metrics["quality/frac_masked"] == 0.5
    assert metrics["quality/frac_overlong"] == metrics["quality/frac_incomplete"] == 0.5
    both = QualityFilterConfig(enabled=("overlong", "incomplete"))
    np.testing.assert_array_equal(prepare.mask_low_quality(rows, both)[0], [True, True])
    with pytest.raises(ValueError, match="unknown quality flags"):
        prepare.mask_low_quality(rows, QualityFilterConfig(enabled=("long",)))


# -- 3. pack ---------------------------------------------------------------------------------------

def test_pack_pads_to_the_bucket_and_row_multiple_and_zeroes_masked_rows():
    rows = [_row(prompt=(1, 2), response=(3, 4, 5)), _row(prompt=(6,), response=(7,), traj_id=1)]
    batch = prepare.pack(rows, np.array([True, False]), PackConfig(length_buckets=(4, 8), pad_id=0, row_multiple=4))
    assert batch["tokens"].shape == (4, 8)  # longest row 5 tokens -> bucket 8; 2 rows -> 4
    np.testing.assert_array_equal(batch["tokens"][0], [1, 2, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], np.zeros(8))  # masked: out of the loss
    np.testing.assert_array_equal(batch["loss_mask"][1], [0, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["logprobs"][0], [0, 0, -0.5, -0.5, -0.5, 0, 0, 0])  # sampler's, kept
    np.testing.assert_array_equal(batch["row_valid"], [True, True, False, False])
    np.testing.assert_array_equal(batch["traj_id"], [0, 1, 0, 0])


# -- 4. old log-probs ------------------------------------------------------------------------------

def _packed(rows=None, masked=None):
    rows = rows or [_row(prompt=(1, 2), response=(3, 4, 5)), _row(prompt=(6,), response=(7,), traj_id=1)]
    masked = np.zeros(len(rows), bool) if masked is None else masked
    return rows, prepare.pack(rows, masked, PackConfig(length_buckets=(8,), pad_id=0, row_multiple=4))


def test_old_logprobs_come_from_the_given_functions_masked_to_the_trained_tokens():
    _, batch = _packed()
    calls = []

    def policy(tokens, valid, selected):
        np.testing.assert_array_equal(selected, batch["loss_mask"] > 0)  # needed on the loss mask only
        calls.append("policy")
        return -tokens.astype(np.float32), tokens * 0.1

    def reference(tokens, valid, selected):
        np.testing.assert_array_equal(selected, batch["loss_mask"] > 0)
        calls.append("reference")
        return -2.0 * tokens.astype(np.float32)

    arrays, metrics = prepare.old_logprobs(batch, policy, reference)
    assert calls == ["policy", "reference"]
    np.testing.assert_array_equal(arrays["old_logprobs"][0], [0, 0, -3, -4, -5, 0, 0, 0])
    np.testing.assert_array_equal(arrays["old_logprobs"][1], [0, -7, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(arrays["ref_logprobs"][1], [0, -14, 0, 0, 0, 0, 0, 0])
    assert arrays["old_logprobs"].dtype == np.float32
    # trained tokens 3, 4, 5, 7: entropy 0.1 x mean = 0.475; |old - sampler(-0.5)| = 2.5 3.5 4.5 6.5
    assert metrics["actor/entropy"] == pytest.approx(0.475)
    assert metrics["actor/behaviour_logprob_gap"] == pytest.approx(4.25)
    no_reference, _ = prepare.old_logprobs(batch, policy)
    assert "ref_logprobs" not in no_reference


def test_old_logprobs_of_a_batch_without_trained_tokens():
    _, batch = _packed(masked=np.array([True, True]))
    arrays, metrics = prepare.old_logprobs(batch, lambda t, v, s: (np.ones(t.shape), np.ones(t.shape)))
    assert not arrays["old_logprobs"].any()
    assert metrics == {"actor/entropy": 0.0, "actor/behaviour_logprob_gap": 0.0}


# -- 5. penalties ----------------------------------------------------------------------------------

def test_penalties_invalid_action_and_kl_in_the_reward():
    rows, batch = _packed([_row(), _row(traj_id=1, action_valid=False)])
    shaped = np.array([1.0, 0.5], np.float32)
    arrays, metrics = prepare.penalties(batch, shaped, PenaltyConfig(invalid_action_coef=0.1))
    np.testing.assert_allclose(arrays["scores"], [1.0, 0.4, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(arrays["step_return_offsets"], [0.0, -0.1, 0.0, 0.0], rtol=1e-6)
    assert metrics == {}
    batch["old_logprobs"] = np.where(batch["loss_mask"] > 0, -1.0, 0.0).astype(np.float32)
    batch["ref_logprobs"] = np.where(batch["loss_mask"] > 0, -1.5, 0.0).astype(np.float32)
    arrays, metrics = prepare.penalties(batch, shaped, PenaltyConfig(kl_coef=0.1, kl_penalty="k1"))
    # k1 = old - ref = 0.5 on each of the 2 trained tokens: R - 0.1 * 1.0
    np.testing.assert_allclose(arrays["scores"], [0.9, 0.4, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(arrays["step_return_offsets"], np.zeros(4))
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(0.5)
    unchanged, _ = prepare.penalties(batch, shaped, PenaltyConfig())
    np.testing.assert_array_equal(unchanged["scores"], [1.0, 0.5, 0.0, 0.0])


# -- 5. advantages ---------------------------------------------------------------------------------

def _scored(scores, **per_row):
    rows = _four_rows(**per_row)
    _, batch = _packed(rows)
    batch["scores"] = prepare.pad_rows(np.asarray(scores, np.float32), 4)
    batch["step_return_offsets"] = np.zeros(4, np.float32)
    return rows, batch


def _setup(estimator="grpo", **options):
    return AdvantageSetup(AdvantageConfig(estimator=estimator, num_groups=2, num_trajectories=4,
                                          expected_group_size=2, **options))


def test_grpo_advantages_broadcast_over_the_loss_mask():
    rows, batch = _scored([1.0, 0.0, 2.0, 2.0])
    arrays, metrics = prepare.advantages(batch, rows, _setup(normalize_by_std=False), all_episodes_ran=True)
    np.testing.assert_allclose(arrays["row_advantage"], [0.5, -0.5, 0.0, 0.0])
    np.testing.assert_allclose(arrays["advantages"], arrays["row_advantage"][:, None] * batch["loss_mask"])
    assert metrics["advantage/mean_abs"] == pytest.approx(0.25)
    assert metrics["advantage/zero_variance_group_fraction"] == 0.5
    normalised, _ = prepare.advantages(batch, rows, _setup(), all_episodes_ran=True)
    np.testing.assert_allclose(normalised["row_advantage"][:2], [0.5 / (0.5 ** 0.5 + 1e-6), -0.5 / (0.5 ** 0.5 + 1e-6)],
                               rtol=1e-5)


def test_group_sizes_are_checked_unless_an_episode_failed():
    rows, batch = _scored([1.0, 0.0, 2.0, 2.0])
    setup = AdvantageSetup(AdvantageConfig(estimator="grpo", num_groups=2, expected_group_size=3))
    with pytest.raises(ValueError, match="expected group size 3"):
        prepare.advantages(batch, rows, setup, all_episodes_ran=True)
    prepare.advantages(batch, rows, setup, all_episodes_ran=False)
    prepare.advantages(batch, rows, AdvantageSetup(setup.config, check_group_sizes=False), all_episodes_ran=True)


def test_gigpo_reads_its_declared_inputs_from_the_providers():
    rows, batch = _scored([1.0, 0.0, 1.0, 1.0], anchor_obs=["a", "b", "a", "a"], reward=[1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(prepare.advantage_input("step_group_ids")(batch, rows), [0, 1, 2, 2])
    arrays, metrics = prepare.advantages(batch, rows, _setup("gigpo", normalize_by_std=False, gamma=0.9),
                                         all_episodes_ran=True)
    # episode part: group 0 (1, 0) -> +-0.5, group 1 alike -> 0; step groups: {0}, {1}, {2, 3} with
    # returns 1, 0 and 0, 0 -> step advantage 0 everywhere (singletons and an equal pair)
    np.testing.assert_allclose(arrays["row_advantage"], [0.5, -0.5, 0.0, 0.0])
    assert metrics["advantage/step_singleton_group_fraction"] == pytest.approx(2 / 3)


def test_an_input_without_a_provider_is_refused():
    with pytest.raises(KeyError, match="no provider for the advantage input 'nowhere'"):
        prepare.advantage_input("nowhere")
    with pytest.raises(ValueError, match="already registered"):
        prepare.register_advantage_input("step_index", lambda batch, rows: batch["step_index"])
