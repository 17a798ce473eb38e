"""The replay buffer's public inspection: ``rows()`` and ``recalibrated()`` read the buffer
without triggering, and a triggered replay draws exactly from what they show."""
import numpy as np
import pytest

from host_batches import make_batch
from spear_jax.replay import Recalibration, ReplayBuffer, ReplayConfig


def _buffer(**overrides) -> ReplayBuffer:
    settings = dict(buffer_size=2, baseline_buffer_size=1000, tolerate_steps=5)
    settings.update(overrides)
    return ReplayBuffer(ReplayConfig(**settings))


def _p50_buffer():
    """Step 1: groups with means [0, 2.5, 5, 10] and five stored rows in singleton groups."""
    buffer = _buffer()
    stored = [2.0, 3.75, 5.5, 6.0, 11.0]
    batch = make_batch([0, 0, 1.5, 3.5, 3, 7, 7, 13] + stored, [-1] * 8 + [0.5] * len(stored),
                       group_ids=[0, 0, 1, 1, 2, 2, 3, 3] + list(range(10, 10 + len(stored))),
                       row_uid_start=100)
    buffer.add_step(batch, 1)
    return buffer


def test_recalibrated_shows_the_p50_advantages_and_sign_filter_without_triggering():
    buffer = _p50_buffer()
    before = buffer.state_dict()
    p50 = buffer.history.statistics()["p50_mean"]
    recalibration = buffer.recalibrated()
    assert isinstance(recalibration, Recalibration)
    scores = recalibration.rows["scores"]
    np.testing.assert_array_equal(scores, [2.0, 3.75, 5.5, 6.0, 11.0])
    np.testing.assert_allclose(recalibration.advantages, scores - p50)
    np.testing.assert_array_equal(recalibration.keep, scores >= p50)
    np.testing.assert_array_equal(recalibration.rows["collection_step"], [1] * 5)
    # nothing changed: same rows, history and counters, no replay counted
    after = buffer.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    assert buffer.metrics()["replay/num_replays"] == 0.0


def test_a_triggered_replay_draws_from_the_inspected_recalibration():
    buffer = _p50_buffer()
    buffer.add_step(make_batch([8.0, 9.0], [1.0, 1.0], group_ids=[20, 21], row_uid_start=300), 2)
    recalibration = buffer.recalibrated()
    by_uid = {int(uid): (adv, keep) for uid, adv, keep in
              zip(recalibration.rows["row_uid"], recalibration.advantages, recalibration.keep)}
    replay, metrics = buffer.replay_if_ready(3, np.random.default_rng(0))
    assert metrics["replay/triggered"] == 1.0
    assert metrics["replay/candidates"] == recalibration.keep.sum()
    for uid, advantage in zip(replay["row_uid"], replay["row_advantage"]):
        assert by_uid[int(uid)][1]  # only rows that pass the sign filter are drawn
        assert advantage == pytest.approx(by_uid[int(uid)][0])
    assert buffer.rows() == {}  # emptied by the trigger


def test_rows_are_padded_copies_in_storage_order():
    buffer = _buffer(weight_decay=0.5, tolerate_steps=10)
    buffer.add_step(make_batch([1.0, 1.0], [0.2, 0.4], seq_len=3), 1)
    buffer.add_step(make_batch([1.0], [0.8], seq_len=5, row_uid_start=2), 2)
    rows = buffer.rows()
    np.testing.assert_array_equal(rows["row_uid"], [0, 1, 2])
    np.testing.assert_array_equal(rows["collection_step"], [1, 1, 2])
    assert rows["input_ids"].shape == (3, 5) and np.all(rows["loss_mask"][:2, 3:] == 0)
    rows["scores"][:] = -100.0  # a copy: the buffer keeps its rows
    assert buffer.rows()["scores"].tolist() == [1.0, 1.0, 1.0]
    decay = buffer.recalibrated()  # decay mode: w * stored advantage, every row kept
    np.testing.assert_allclose(decay.advantages, [0.1, 0.2, 0.4])
    assert decay.keep.tolist() == [True, True, True]


def test_an_empty_buffer_inspects_as_empty():
    buffer = _buffer()
    assert buffer.rows() == {}
    recalibration = buffer.recalibrated()
    assert recalibration.rows == {} and recalibration.advantages.shape == (0,)
    assert recalibration.keep.shape == (0,) and recalibration.keep.dtype == bool
