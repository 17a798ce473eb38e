"""The replay buffer through hundreds of synthetic training steps."""
import tempfile

import numpy as np
import pytest

from host_batches import assert_states_equal, random_batch
from spear_jax.replay import ReplayBuffer, ReplayConfig

NUM_STEPS = 300
MAX_GROUPS, GROUP_SIZE, MAX_STEPS_PER_TRAJ = 8, 4, 3


def _batch_for(step: int, success_rate: float = 0.3):
    rng = np.random.default_rng([123, step])
    num_groups = int(rng.integers(2, MAX_GROUPS + 1))
    return random_batch(rng, num_groups, GROUP_SIZE, seq_len=4 + step % 7, row_uid_start=step * 10_000,
                        success_rate=success_rate, steps_per_traj=MAX_STEPS_PER_TRAJ)


def _run(buffer, steps, success_rate=0.3, check=None):
    """Trainer call order; returns the per-step (replay row uids, advantages, metrics)."""
    log = []
    for step in steps:
        replay, metrics = buffer.replay_if_ready(step, np.random.default_rng([9, step]), min_rows=2)
        buffer.remove_old()
        buffer.add_step(_batch_for(step, success_rate), step)
        if check is not None:
            check(buffer, step)
        log.append((None if replay is None else (replay["row_uid"].copy(), replay["row_advantage"].copy()),
                    metrics))
    return log


def _bounds_check(config):
    max_rows = MAX_GROUPS * GROUP_SIZE * MAX_STEPS_PER_TRAJ
    tolerate = config.effective_tolerate_steps

    def check(buffer, step):
        assert len(buffer.entry_steps) <= tolerate + 2
        assert buffer.num_rows <= (tolerate + 2) * max_rows
        assert buffer.history.num_values <= config.baseline_buffer_size + MAX_GROUPS
        steps = buffer.entry_steps
        assert steps == sorted(set(steps))
        # entries older than the one just added lie within the staleness window of each other
        older = steps[:-1] if steps and steps[-1] == step else steps
        assert not older or older[-1] - older[0] <= tolerate
    return check


@pytest.mark.parametrize("weight_decay", [-1.0, 0.5])
def test_long_run_bounded_triggering_and_resume(weight_decay):
    config = ReplayConfig(buffer_size=16, baseline_buffer_size=48, tolerate_steps=3, weight_decay=weight_decay)
    buffer = ReplayBuffer(config)
    first = _run(buffer, range(1, 151), check=_bounds_check(config))
    snapshot = buffer.state_dict()
    resumed = ReplayBuffer.from_state_dict(config, snapshot)
    tail = _run(buffer, range(151, NUM_STEPS + 1), check=_bounds_check(config))
    tail_resumed = _run(resumed, range(151, NUM_STEPS + 1))
    replays = [entry for entry, _ in first + tail if entry is not None]
    assert len(replays) > 20  # the buffer does fire regularly
    for (a, ma), (b, mb) in zip(tail, tail_resumed):
        assert ma == mb
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
    assert_states_equal(buffer.state_dict(), resumed.state_dict())
    assert buffer.history.steps[0] > NUM_STEPS - 48  # old steps were evicted from the history
    uids = np.concatenate([r[0] for r in replays])
    assert np.unique(uids).shape[0] == uids.shape[0]  # each row replayed at most once
    if weight_decay <= 0:
        assert all(np.all(r[1] >= 0) for r in replays)


def test_never_triggering_buffer_stays_bounded():
    config = ReplayConfig(buffer_size=100_000, baseline_buffer_size=30, tolerate_steps=10)
    buffer = ReplayBuffer(config)
    log = _run(buffer, range(1, NUM_STEPS + 1), check=_bounds_check(config))
    assert all(entry is None and m["replay/triggered"] == 0 for entry, m in log)
    assert len(buffer.entry_steps) == 12  # tolerate + 2 with a contributing step every step


def test_empty_buffer_never_triggers():
    config = ReplayConfig(buffer_size=1, baseline_buffer_size=30)
    empty = ReplayBuffer(config)
    for step in range(1, 101):
        replay, metrics = empty.replay_if_ready(step, np.random.default_rng(step))
        assert replay is None and metrics["replay/buffer_rows"] == 0
        batch = _batch_for(step)
        batch["row_advantage"] = -np.abs(batch["row_advantage"])
        empty.remove_old()
        empty.add_step(batch, step)
    assert empty.num_rows == 0 and empty.history.num_values <= 30 + MAX_GROUPS


def test_staleness_in_a_run_with_gaps():
    config = ReplayConfig(buffer_size=10_000, tolerate_steps=5)
    buffer = ReplayBuffer(config)
    contributing = [1, 2, 4, 9, 10, 17, 30, 31]
    for step in range(1, 33):
        buffer.remove_old()
        batch = _batch_for(step)
        if step not in contributing:
            batch["row_advantage"] = -np.abs(batch["row_advantage"]) - 1.0
        buffer.add_step(batch, step)
        if step == 10:
            assert buffer.entry_steps == [4, 9, 10]  # remove_old at 10 saw newest 9: drops 1, 2
        if step == 17:
            assert buffer.entry_steps == [9, 10, 17]  # newest entry 10 at remove time
    assert buffer.entry_steps == [30, 31]


def test_orbax_round_trip_mid_run():
    ocp = pytest.importorskip("orbax.checkpoint")
    config = ReplayConfig(buffer_size=16, baseline_buffer_size=48, tolerate_steps=3)
    buffer = ReplayBuffer(config)
    _run(buffer, range(1, 41))
    with tempfile.TemporaryDirectory() as directory:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(f"{directory}/replay", buffer.state_dict())
        checkpointer.wait_until_finished()
        restored_state = checkpointer.restore(f"{directory}/replay")
    restored = ReplayBuffer.from_state_dict(config, restored_state)
    assert_states_equal(restored.state_dict(), buffer.state_dict())
    a, b = _run(buffer, range(41, 61)), _run(restored, range(41, 61))
    assert [m for _, m in a] == [m for _, m in b]
