"""Synthetic row batches for the host-side tests."""
from __future__ import annotations

import numpy as np


def make_batch(
    scores,
    advantages,
    group_ids=None,
    traj_ids=None,
    mask_lengths=None,
    seq_len: int = 6,
    num_tool_calls=None,
    row_uid_start: int = 0,
) -> dict[str, np.ndarray]:
    """A row batch with carried fields ``row_uid`` (unique id), ``input_ids`` and ``old_logprobs``."""
    scores = np.asarray(scores, dtype=np.float64)
    num_rows = scores.shape[0]
    advantages = np.asarray(advantages, dtype=np.float64)
    group_ids = np.arange(num_rows) if group_ids is None else np.asarray(group_ids)
    traj_ids = np.arange(num_rows) if traj_ids is None else np.asarray(traj_ids)
    mask_lengths = np.full(num_rows, seq_len) if mask_lengths is None else np.asarray(mask_lengths)
    loss_mask = (np.arange(seq_len)[None, :] < mask_lengths[:, None]).astype(np.int32)
    row_uid = np.arange(row_uid_start, row_uid_start + num_rows, dtype=np.int64)
    return {
        "scores": scores,
        "row_advantage": advantages,
        "loss_mask": loss_mask,
        "group_id": group_ids.astype(np.int64),
        "traj_id": traj_ids.astype(np.int64),
        "num_tool_calls": (np.ones(num_rows) if num_tool_calls is None else np.asarray(num_tool_calls)).astype(np.int64),
        "row_uid": row_uid,
        "input_ids": (row_uid[:, None] * 1000 + np.arange(seq_len)[None, :]).astype(np.int32),
        "old_logprobs": (-0.001 * row_uid[:, None] - 0.01 * np.arange(seq_len)[None, :]).astype(np.float32),
    }


def random_batch(rng: np.random.Generator, num_groups: int, group_size: int, seq_len: int, row_uid_start: int,
                 success_rate: float = 0.3, steps_per_traj: int = 1) -> dict[str, np.ndarray]:
    """A GRPO-like batch: rewards 10 * success (+ noise bonus), advantage = R - group mean."""
    num_trajs = num_groups * group_size
    traj_success = rng.random(num_trajs) < success_rate
    traj_reward = 10.0 * traj_success + rng.uniform(0, 1, num_trajs)
    rows_per_traj = rng.integers(1, steps_per_traj + 1, num_trajs)
    traj_index = np.repeat(np.arange(num_trajs), rows_per_traj)
    scores = traj_reward[traj_index]
    group_ids = traj_index // group_size
    group_mean = np.bincount(group_ids, scores) / np.bincount(group_ids)
    advantages = scores - group_mean[group_ids]
    mask_lengths = rng.integers(0, seq_len + 1, scores.shape[0])
    return make_batch(scores, advantages, group_ids, traj_index, mask_lengths, seq_len,
                      num_tool_calls=rng.integers(0, 4, scores.shape[0]), row_uid_start=row_uid_start)


def assert_states_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Exact equality of two state dicts: keys, dtypes, shapes and values."""
    assert sorted(a) == sorted(b)
    for key in a:
        left, right = np.asarray(a[key]), np.asarray(b[key])
        assert left.dtype == right.dtype, key
        assert left.shape == right.shape, key
        np.testing.assert_array_equal(left, right, err_msg=key)
