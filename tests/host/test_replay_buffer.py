import numpy as np
import pytest

from host_batches import make_batch
from spear_jax.replay import (
    ReplayBuffer,
    ReplayConfig,
    nearest_lower_power_of_two,
    validate_row_batch,
)


def _buffer(**overrides) -> ReplayBuffer:
    settings = dict(buffer_size=4, baseline_buffer_size=1000, tolerate_steps=5)
    settings.update(overrides)
    return ReplayBuffer(ReplayConfig(**settings))


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_admission_only_positive_advantage_and_nonempty_mask():
    buffer = _buffer()
    batch = make_batch(scores=[1, 1, 1, 1, 1], advantages=[0.5, 0.0, -0.5, 1e-9, 2.0],
                       mask_lengths=[3, 3, 3, 3, 0])
    metrics = buffer.add_step(batch, 1)
    assert metrics["replay/rows_admitted"] == 2
    stored = buffer.state_dict()["entry0_row_row_uid"]
    assert stored.tolist() == [0, 3]


def test_math_admission_requires_a_tool_call():
    buffer = _buffer(require_tool_call=True)
    batch = make_batch(scores=[1, 1, 1], advantages=[1, 1, 1], num_tool_calls=[0, 1, 3])
    buffer.add_step(batch, 1)
    assert buffer.state_dict()["entry0_row_row_uid"].tolist() == [1, 2]


def test_no_entry_for_a_step_without_positives():
    buffer = _buffer()
    buffer.add_step(make_batch(scores=[0, 0], advantages=[0, -1]), 1)
    assert buffer.entry_steps == [] and buffer.history.steps == [1]


def _add_positive(buffer, step, n=1, score=1.0, uid_start=0):
    buffer.add_step(make_batch(scores=[score] * n, advantages=[1.0] * n, row_uid_start=uid_start), step)


def test_remove_old_spec_example():
    buffer = _buffer(tolerate_steps=5)
    for step in (1, 3, 7):
        _add_positive(buffer, step)
    buffer.remove_old()
    assert buffer.entry_steps == [3, 7]
    boundary = _buffer(tolerate_steps=5)
    for step in (1, 2, 7):
        _add_positive(boundary, step)
    boundary.remove_old()
    assert boundary.entry_steps == [2, 7]  # |2 - 7| = 5 is tolerated, only > 5 is dropped


def test_tolerance_is_capped_at_ten_and_measured_from_newest_entry():
    buffer = _buffer(tolerate_steps=20)
    assert buffer.config.effective_tolerate_steps == 10
    for step in (1, 2, 12):
        _add_positive(buffer, step)
    buffer.remove_old()
    assert buffer.entry_steps == [2, 12]
    # measured against the newest entry (step 12), not the current training step
    buffer.add_step(make_batch(scores=[0.0], advantages=[-1.0]), 40)
    buffer.remove_old()
    assert buffer.entry_steps == [2, 12]


def test_trigger_fires_strictly_above_one_and_a_half_buffer_size_decay_mode():
    buffer = _buffer(buffer_size=4, weight_decay=0.5)
    _add_positive(buffer, 1, n=6)
    assert buffer.valid_count() == 6 and not buffer.is_full_capacity()
    replay, metrics = buffer.replay_if_ready(2, _rng())
    assert replay is None and metrics["replay/triggered"] == 0.0 and buffer.num_rows == 6
    _add_positive(buffer, 2, n=1, uid_start=6)
    assert buffer.is_full_capacity()


def test_p50_mode_counts_rows_strictly_above_p50():
    buffer = _buffer(buffer_size=2)  # fires at > 3 valid rows
    # group means of this batch: 0, 2.5, 5, 10 -> P50 = 3.75
    scores = [0, 0, 2.5, 2.5, 5, 5, 10, 10]
    advantages = [1, 1, 1, 1, 1, 1, 1, 1]
    buffer.add_step(make_batch(scores, advantages, group_ids=[0, 0, 1, 1, 2, 2, 3, 3]), 1)
    assert buffer.history.statistics()["p50_mean"] == pytest.approx(3.75)
    assert buffer.valid_count() == 4  # the rows with R = 5 and R = 10
    assert buffer.is_full_capacity()


def test_p50_count_falls_back_to_entry_mean_when_history_is_empty():
    buffer = _buffer(buffer_size=1)
    buffer.add_step(make_batch([1.0, 2.0, 3.0, 6.0], [1, 1, 1, 1]), 1)
    buffer.history.steps.clear(), buffer.history.means.clear(), buffer.history.stds.clear()
    assert buffer.valid_count() == 1  # only 6.0 > mean 3.0


STORED = [2.0, 3.0, 3.2, 3.5, 3.75, 5.5, 6.0, 11.0, 12.0]


def _p50_buffer(**overrides):
    """History group means [0, 2.5, 5, 10] + the stored rows' own (singleton) groups: P50 3.75."""
    buffer = _buffer(**{"buffer_size": 2, **overrides})  # size 2 fires at > 3 rows with R > P50
    scores = [0, 0, 1.5, 3.5, 3, 7, 7, 13]
    batch = make_batch(scores + STORED, [-1] * 8 + [0.5] * len(STORED),
                       group_ids=[0, 0, 1, 1, 2, 2, 3, 3] + list(range(10, 10 + len(STORED))),
                       row_uid_start=100)
    return buffer, batch


def test_p50_recalibration_and_sign_filter():
    buffer, batch = _p50_buffer()
    buffer.add_step(batch, 1)
    stats = buffer.history.statistics()
    means = np.array([0, 2.5, 5, 10] + STORED)
    assert stats["p50_mean"] == pytest.approx(np.percentile(means, 50)) == pytest.approx(3.75)
    assert buffer.valid_count() == 4  # strictly above: 5.5, 6, 11, 12
    replay, metrics = buffer.replay_if_ready(2, _rng())
    assert metrics["replay/triggered"] == 1.0
    assert metrics["replay/candidates"] == 5  # R = 3.75 is kept (A~ = 0)
    assert metrics["replay/sign_filtered"] == 4
    assert replay["scores"].shape == (2,)  # min(npo2(5), buffer_size 2)
    assert set(replay["scores"].tolist()) <= {3.75, 5.5, 6.0, 11.0, 12.0}
    np.testing.assert_allclose(replay["row_advantage"], replay["scores"] - 3.75)
    assert buffer.num_rows == 0


def test_p50_history_median_spec_example():
    buffer = _buffer()
    buffer.add_step(make_batch([0.0, 2.5, 5.0, 10.0], [-1.0] * 4, group_ids=[0, 1, 2, 3]), 1)
    assert buffer.history.statistics()["p50_mean"] == 3.75


def test_sign_filter_keeps_rows_equal_to_p50():
    buffer, batch = _p50_buffer(buffer_size=1)
    buffer.add_step(batch, 1)
    survivors = []
    for seed in range(20):
        probe = ReplayBuffer.from_state_dict(buffer.config, buffer.state_dict())
        replay, _ = probe.replay_if_ready(2, _rng(seed))
        survivors += replay["scores"].tolist()
    assert 3.75 in survivors and min(survivors) == 3.75


def test_std_normalised_recalibration():
    buffer, batch = _p50_buffer(norm_adv_by_std=True)
    buffer.add_step(batch, 1)
    p50_std = buffer.history.statistics()["p50_std"]
    assert p50_std == 0.0  # 13 groups, 9 of which are singletons with std 0
    replay, _ = buffer.replay_if_ready(2, _rng())
    np.testing.assert_allclose(replay["row_advantage"], (replay["scores"] - 3.75) / (0.0 + 1e-6))


def test_std_normalised_with_nonzero_p50_std():
    buffer = _buffer(buffer_size=1, norm_adv_by_std=True)
    # two groups of two trajectories: means 1 and 5, population stds 1 and 3 -> P50 3 and 2
    batch = make_batch([0.0, 2.0, 2.0, 8.0], [-1, 1, -1, 1], group_ids=[0, 0, 1, 1])
    buffer.add_step(batch, 1)
    stats = buffer.history.statistics()
    assert stats["p50_mean"] == 3.0 and stats["p50_std"] == 2.0
    buffer.add_step(make_batch([8.0, 9.0], [1, 1], group_ids=[7, 7], row_uid_start=10), 2)
    stats = buffer.history.statistics()
    replay, _ = buffer.replay_if_ready(3, _rng())
    np.testing.assert_allclose(replay["row_advantage"], (replay["scores"] - stats["p50_mean"]) / (stats["p50_std"] + 1e-6))


@pytest.mark.parametrize("weight, mode", [(0.5, "decay"), (1.0, "decay"), (0.0, "p50"), (-1.0, "p50"), (1.5, "p50")])
def test_weight_selects_mode(weight, mode):
    assert ReplayConfig(weight_decay=weight).mode == mode


def test_decay_mode_scales_stored_advantages_without_refiltering():
    buffer = _buffer(buffer_size=2, weight_decay=0.5)
    buffer.add_step(make_batch([-5.0, -5.0, -5.0, 1.0], [0.2, 0.4, 0.8, 1.6]), 1)
    replay, metrics = buffer.replay_if_ready(2, _rng())
    assert metrics["replay/candidates"] == 4 and replay["scores"].shape == (2,)
    stored = {0: 0.2, 1: 0.4, 2: 0.8, 3: 1.6}
    for uid, adv in zip(replay["row_uid"], replay["row_advantage"]):
        assert adv == pytest.approx(0.5 * stored[int(uid)])


def test_gigpo_recalibrated_advantage_is_episode_level_only():
    buffer = _buffer(buffer_size=1)
    # same episode reward R = 10 for every row; stored advantages differ by their step term
    batch = make_batch([10.0, 10.0, 10.0, 0.0], [5.0 + 0.3, 5.0 - 0.2, 5.0 + 1.0, -5.0],
                       group_ids=[0, 0, 0, 0], traj_ids=[0, 0, 0, 1])
    buffer.add_step(batch, 1)
    p50 = buffer.history.statistics()["p50_mean"]
    replay, _ = buffer.replay_if_ready(2, _rng())
    assert replay["row_advantage"].shape == (1,)
    np.testing.assert_allclose(replay["row_advantage"], [10.0 - p50])  # not 5.3, 4.8 or 6.0


def test_subsample_size_rule():
    assert [nearest_lower_power_of_two(n) for n in (0, 1, 2, 3, 4, 7, 8, 13, 2048, 3073)] == [
        0, 0, 2, 2, 4, 4, 8, 8, 2048, 2048]
    for size, stored, expected in [(8, 13, 8), (16, 25, 16), (16, 30, 16), (32, 60, 32), (64, 99, 64)]:
        buffer = _buffer(buffer_size=size, weight_decay=1.0)
        _add_positive(buffer, 1, n=stored)
        replay, _ = buffer.replay_if_ready(2, _rng())
        assert replay["scores"].shape[0] == min(expected, nearest_lower_power_of_two(stored))
    buffer = _buffer(buffer_size=8, weight_decay=1.0)
    _add_positive(buffer, 1, n=13)
    replay, _ = buffer.replay_if_ready(2, _rng())
    assert replay["scores"].shape[0] == 8


def test_a_triggered_p50_replay_always_has_at_least_two_rows():
    # count(R > P50) > 1.5 * size >= 1.5 and every such row survives the sign filter, so the
    # npo2(x <= 1) = 0 branch never meets a triggered buffer.
    buffer = _buffer(buffer_size=1)
    buffer.add_step(make_batch([0.0, 0.0, 0.0, 9.0, 8.0, 1.0], [1, 1, 1, 1, 1, -1],
                               group_ids=[0, 1, 2, 3, 4, 5]), 1)
    replay, metrics = buffer.replay_if_ready(2, _rng())
    assert metrics["replay/candidates"] >= 2 and replay["scores"].shape == (1,)


def test_an_empty_batch_leaves_the_history_untouched():
    buffer = _buffer(baseline_buffer_size=1)
    buffer.add_step(make_batch([0.0, 5.0, 7.0], [-1.0, 1.0, 1.0], group_ids=[0, 1, 2]), 1)
    buffer.add_step(make_batch(np.zeros(0), np.zeros(0)), 2)
    assert buffer.history.steps == [1] and buffer.entry_steps == [1]
    assert buffer.history.statistics()["p50_mean"] == 5.0


def test_buffer_is_empty_after_a_discarded_replay():
    buffer = _buffer(buffer_size=4, weight_decay=1.0)
    _add_positive(buffer, 1, n=7)
    replay, metrics = buffer.replay_if_ready(2, _rng(), min_rows=8)  # 4 rows < 8 devices
    assert replay is None and metrics["replay/discarded"] == 1.0
    assert buffer.num_rows == 0 and buffer.entry_steps == []
    assert buffer.history.steps == [1]  # the baseline history survives the reset


def test_replayed_rows_carry_collection_step_fields_and_padding():
    buffer = _buffer(buffer_size=4, weight_decay=1.0, tolerate_steps=10)
    short = make_batch([1.0] * 4, [1.0] * 4, seq_len=3, row_uid_start=0)
    long = make_batch([1.0] * 4, [1.0] * 4, seq_len=6, mask_lengths=[6, 5, 4, 3], row_uid_start=4)
    buffer.add_step(short, 1)
    buffer.add_step(long, 2)
    replay, _ = buffer.replay_if_ready(3, _rng(1))
    assert replay["input_ids"].shape == (4, 6) and replay["loss_mask"].shape == (4, 6)
    for i, uid in enumerate(replay["row_uid"]):
        source = short if uid < 4 else long
        j = int(uid) - (0 if uid < 4 else 4)
        width = source["input_ids"].shape[1]
        np.testing.assert_array_equal(replay["input_ids"][i, :width], source["input_ids"][j])
        np.testing.assert_array_equal(replay["old_logprobs"][i, :width], source["old_logprobs"][j])
        np.testing.assert_array_equal(replay["loss_mask"][i, :width], source["loss_mask"][j])
        assert np.all(replay["loss_mask"][i, width:] == 0) and np.all(replay["input_ids"][i, width:] == 0)
        assert replay["collection_step"][i] == (1 if uid < 4 else 2)
    assert replay["old_logprobs"].dtype == np.float32 and replay["input_ids"].dtype == np.int32


def test_baseline_eviction_by_whole_steps_may_exceed_cap_by_one_step():
    buffer = _buffer(baseline_buffer_size=5)
    for step in (1, 2, 3, 4):
        buffer.add_step(make_batch([0.0, 1.0, 2.0], [-1, -1, -1], group_ids=[0, 1, 2]), step)
        assert buffer.history.num_values <= 5 + 3
    # after step 1: 3 values; step 2: 6 (no eviction before appending, 3 <= 5);
    # step 3: 6 > 5 -> pop step 1, append -> [2, 3]; step 4: pop 2 -> [3, 4]
    assert buffer.history.steps == [3, 4] and buffer.history.num_values == 6
    at_cap = _buffer(baseline_buffer_size=6)
    for step in (1, 2, 3, 4):
        at_cap.add_step(make_batch([0.0, 1.0, 2.0], [-1, -1, -1], group_ids=[0, 1, 2]), step)
    # exactly 6 stored values is not over the cap: step 3 is appended without eviction (9 values)
    assert at_cap.history.steps == [2, 3, 4] and at_cap.history.num_values == 9


def test_replay_works_when_entry_steps_left_the_history():
    buffer = _buffer(buffer_size=2, baseline_buffer_size=1, weight_decay=-1, tolerate_steps=10)
    for step in range(1, 5):
        buffer.add_step(make_batch([5.0, 6.0, 0.0], [1.0, 1.0, -1.0], group_ids=[0, 1, 2],
                                   row_uid_start=10 * step), step)
    assert buffer.history.steps == [4] and buffer.entry_steps == [1, 2, 3, 4]
    replay, metrics = buffer.replay_if_ready(5, _rng())
    assert replay is not None and metrics["replay/rows"] == 2


def test_replay_before_add_is_enforced():
    buffer = _buffer(weight_decay=1.0)
    _add_positive(buffer, 3, n=10)
    with pytest.raises(ValueError, match="before add_step"):
        buffer.replay_if_ready(3, _rng())
    with pytest.raises(ValueError, match="greater than the previous added step 3"):
        _add_positive(buffer, 3)


def test_simulated_training_loop_follows_call_order():
    """step t: replay check -> (update) -> remove_old -> add_step; rows replayed once, later."""
    rng = np.random.default_rng(0)
    buffer = _buffer(buffer_size=4, weight_decay=1.0, tolerate_steps=2)
    collected_at, replayed = {}, []
    uid = 0
    for step in range(1, 40):
        replay, _ = buffer.replay_if_ready(step, np.random.default_rng([7, step]), min_rows=2)
        if replay is not None:
            for row_uid, collected in zip(replay["row_uid"], replay["collection_step"]):
                assert collected_at[int(row_uid)] == collected < step
                replayed.append(int(row_uid))
        batch = make_batch(rng.normal(size=6), rng.normal(size=6), row_uid_start=uid)
        for k, a in zip(batch["row_uid"], batch["row_advantage"]):
            if a > 0:
                collected_at[int(k)] = step
        uid += 6
        buffer.remove_old()
        buffer.add_step(batch, step)
    assert len(replayed) > 10 and len(set(replayed)) == len(replayed)


# ----------------------------------------------------------------------------- bad input

def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="buffer_size must be an integer >= 1"):
        ReplayConfig(buffer_size=0)
    with pytest.raises(ValueError, match="baseline_buffer_size"):
        ReplayConfig(baseline_buffer_size=-3)
    with pytest.raises(ValueError, match="tolerate_steps"):
        ReplayConfig(tolerate_steps=-1)
    with pytest.raises(ValueError, match="baseline_std_ddof"):
        ReplayConfig(baseline_std_ddof=2)
    with pytest.raises(ValueError, match="grouping 'prompt'"):
        ReplayConfig(grouping="prompt")
    with pytest.raises(ValueError, match="group_size"):
        ReplayConfig(grouping="positional")
    with pytest.raises(ValueError, match="weight_decay must be finite"):
        ReplayConfig(weight_decay=float("nan"))
    with pytest.raises(TypeError, match="config must be a ReplayConfig"):
        ReplayBuffer({"buffer_size": 4})


def test_bad_batches_name_the_key():
    good = make_batch([1.0, 2.0], [1.0, 1.0])
    validate_row_batch(good)
    missing = dict(good)
    del missing["traj_id"]
    with pytest.raises(KeyError, match="traj_id"):
        validate_row_batch(missing)
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] has 1 rows"):
        validate_row_batch({**good, "input_ids": good["input_ids"][:1]})
    with pytest.raises(TypeError, match=r"batch\['scores'\] must be a 1-D float"):
        validate_row_batch({**good, "scores": np.array([1, 2])})
    with pytest.raises(TypeError, match=r"batch\['group_id'\] must be a 1-D integer"):
        validate_row_batch({**good, "group_id": np.array([0.0, 1.0])})
    with pytest.raises(ValueError, match=r"batch\['loss_mask'\] must be \[B, T\]"):
        validate_row_batch({**good, "loss_mask": np.ones(2)})
    with pytest.raises(TypeError, match=r"batch\['messages'\] must be numeric"):
        validate_row_batch({**good, "messages": np.array(["a", "b"], dtype=object)})
    with pytest.raises(ValueError, match=r"batch\['row_advantage'\] contains non-finite"):
        validate_row_batch({**good, "row_advantage": np.array([np.nan, 1.0])})
    with pytest.raises(KeyError, match="collection_step"):
        validate_row_batch({**good, "collection_step": np.zeros(2, int)})
    buffer = _buffer()
    buffer.add_step(good, 1)
    with pytest.raises(KeyError, match="differ from the stored row keys"):
        buffer.add_step({k: v for k, v in good.items() if k != "input_ids"}, 2)
    with pytest.raises(TypeError, match="input_ids"):
        buffer.add_step({**good, "input_ids": good["input_ids"].astype(np.int64)}, 2)
    with pytest.raises(TypeError, match="rng must be a numpy Generator"):
        buffer.replay_if_ready(5, 0)
    with pytest.raises(ValueError, match="min_rows"):
        buffer.replay_if_ready(5, _rng(), min_rows=0)
    with pytest.raises(KeyError, match="state is missing"):
        ReplayBuffer.from_state_dict(buffer.config, {"num_entries": np.asarray(0)})


def test_replay_rows_use_the_batch_schema_names():
    from spear_jax import batch_schema, replay
    assert replay.REQUIRED_ROW_KEYS == batch_schema.REPLAY_ROW_FIELDS
    assert all(key in batch_schema.FIELDS for key in replay.REQUIRED_ROW_KEYS)
    batch = make_batch([1.0, 2.0], [1.0, 1.0])
    earlier = {"row_advantage": "advantages", "group_id": "group_ids", "traj_id": "traj_ids"}
    with pytest.raises(KeyError, match="missing required row keys"):
        validate_row_batch({earlier.get(k, k): v for k, v in batch.items()})


def test_a_replay_state_with_the_earlier_row_names_is_read_under_the_schema_names():
    buffer = _buffer()
    buffer.add_step(make_batch([1.0, 2.0], [1.0, 1.0]), 1)
    state = buffer.state_dict()
    earlier = {"entry0_row_row_advantage": "entry0_row_advantages", "entry0_row_group_id": "entry0_row_group_ids",
               "entry0_row_traj_id": "entry0_row_traj_ids"}
    old_state = {earlier.get(k, k): v for k, v in state.items()}
    assert "entry0_row_advantages" in old_state and "entry0_row_row_advantage" not in old_state
    restored = ReplayBuffer.from_state_dict(buffer.config, old_state)
    assert restored.state_dict().keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(restored.state_dict()[key], value)
    with pytest.raises(KeyError, match="hold both"):
        ReplayBuffer.from_state_dict(buffer.config, {**state, "entry0_row_advantages": state["entry0_row_row_advantage"]})
