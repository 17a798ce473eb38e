"""One batch schema: the packer, the update step and the replay buffer use its names."""
import numpy as np
import pytest

from spear_jax import batch_schema, batching, replay, replay_rows, train_step
from tests.trainer.test_prepare import _row


def test_the_packer_writes_exactly_the_declared_fields_with_their_dtypes_and_ranks():
    (packed,) = batching.pack_rows([_row(), _row(traj_id=1)], batching.BatchingConfig(buckets=(8,)))
    assert set(packed.arrays) == set(batch_schema.PACKED)
    for name, array in packed.arrays.items():
        spec = batch_schema.PACKED[name]
        assert array.dtype == spec.dtype and array.ndim == (2 if spec.per_token else 1), name


def test_update_and_replay_keys_are_schema_fields():
    assert train_step.MINIBATCH_KEYS == batch_schema.UPDATE_FIELDS
    assert replay.REQUIRED_ROW_KEYS == batch_schema.REPLAY_ROW_FIELDS
    assert set(batch_schema.UPDATE_FIELDS + batch_schema.REPLAY_ROW_FIELDS) <= set(batch_schema.FIELDS)
    assert train_step.REFERENCE_KEY in batch_schema.FIELDS


def test_replay_rows_round_trip_and_undeclared_arrays_are_refused():
    carried = replay_rows.carried_arrays(batch_schema.UPDATE_FIELDS)
    assert carried == ("tokens", "valid", "loss_mask", "old_logprobs")
    batch = {name: np.zeros((4, 3) if spec.per_token else (4,), spec.dtype)
             for name, spec in batch_schema.FIELDS.items()}
    batch["row_valid"][:3] = True
    batch["row_advantage"][:3] = [1.0, -1.0, 2.0]
    batch["loss_mask"][:3] = 1.0
    stored = replay_rows.buffer_rows(batch, carried)
    assert set(stored) == set(carried) | set(batch_schema.REPLAY_ROW_FIELDS)
    assert all(value.shape[0] == 3 for value in stored.values())
    replay.validate_row_batch(stored)
    padded = replay_rows.replay_batch(stored, carried, row_multiple=4)
    np.testing.assert_array_equal(padded["row_valid"], [True, True, True, False])
    np.testing.assert_array_equal(padded["advantages"][:, 0], [1.0, -1.0, 2.0, 0.0])
    with pytest.raises(KeyError, match="not batch fields"):
        replay_rows.carried_arrays(batch_schema.UPDATE_FIELDS + ("token_weights",))
