"""Bucketed padding of rollout rows: layout, metadata, truncation, errors, round trip."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout_scripted import SayNumberEnv, ScriptedSampler, chatml_tokenizer, say_number_policy
from spear_jax.batching import ROW_FIELDS, BatchingConfig, bucket_length, pack_rows
from spear_jax.rollout import RolloutConfig, RolloutEngine, Row
from spear_jax.sampling import SamplingParams


def make_row(prompt, response, mask=None, logprobs=None, **meta):
    response = np.asarray(response, dtype=np.int32)
    mask = np.ones(response.shape, np.int8) if mask is None else np.asarray(mask, np.int8)
    if logprobs is None:
        logprobs = -np.arange(1, response.shape[0] + 1, dtype=np.float32) * mask
    defaults = dict(group_id=0, traj_id=0, step_index=0, reward=0.0, action_valid=True, num_tool_calls=0,
                    anchor_obs="", response_text="", finish_reason="stop", overlong=False, incomplete=False,
                    task_id=0, task_type="t")
    defaults.update(meta)
    return Row(prompt_ids=np.asarray(prompt, dtype=np.int32), response_ids=response, loss_mask=mask,
               logprobs=np.asarray(logprobs, np.float32), **defaults)


def test_layout_and_metadata():
    rows = [
        make_row([5, 6, 7], [8, 9], group_id=3, traj_id=7, reward=1.5, anchor_id=4, won=True),
        make_row(list(range(1, 11)), [11, 12, 13, 14], mask=[1, 0, 0, 1], traj_id=8, num_tool_calls=2),
        make_row([4], [3], episode_return=2.0, step_index=5),
    ]
    batches = pack_rows(rows, BatchingConfig(buckets=(8, 16), pad_id=99))
    assert [b.length for b in batches] == [8, 16]
    short, long = batches
    a = short.arrays
    assert a["tokens"].shape == (2, 8) and list(a["row_index"]) == [0, 2]
    np.testing.assert_array_equal(a["tokens"][0], [5, 6, 7, 8, 9, 99, 99, 99])
    np.testing.assert_array_equal(a["valid"][0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(a["loss_mask"][0], [0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(a["logprobs"][0], [0, 0, 0, -1, -2, 0, 0, 0])
    assert list(a["prompt_length"]) == [3, 1] and list(a["response_length"]) == [2, 1]
    assert a["group_id"][0] == 3 and a["traj_id"][0] == 7 and a["reward"][0] == 1.5
    assert a["anchor_id"][0] == 4 and a["won"][0] and a["episode_return"][1] == 2.0 and a["step_index"][1] == 5
    b = long.arrays
    np.testing.assert_array_equal(b["loss_mask"][0, 10:14], [1, 0, 0, 1])
    np.testing.assert_array_equal(b["logprobs"][0, 10:14], [-1, 0, 0, -4])
    assert b["num_tool_calls"][0] == 2 and b["traj_id"][0] == 8
    assert set(ROW_FIELDS) <= set(a)


def test_row_multiple_pads_with_empty_rows():
    rows = [make_row([1, 2], [3]) for _ in range(5)]
    (batch,) = pack_rows(rows, BatchingConfig(buckets=(4,), row_multiple=4))
    a = batch.arrays
    assert a["tokens"].shape == (8, 4) and batch.num_rows == 5
    assert not a["row_valid"][5:].any() and not a["valid"][5:].any() and not a["loss_mask"][5:].any()
    assert list(a["row_index"][5:]) == [-1, -1, -1]


def test_overflow_truncates_prompt_from_the_left():
    row = make_row(list(range(1, 13)), [20, 21, 22])
    (batch,) = pack_rows([row], BatchingConfig(buckets=(4, 8)))
    a = batch.arrays
    assert batch.length == 8 and a["prompt_truncated"][0] and a["prompt_length"][0] == 5
    np.testing.assert_array_equal(a["tokens"][0], [8, 9, 10, 11, 12, 20, 21, 22])
    np.testing.assert_array_equal(a["loss_mask"][0], [0] * 5 + [1] * 3)
    with pytest.raises(ValueError, match="overflow='error'"):
        pack_rows([row], BatchingConfig(buckets=(4, 8), overflow="error"))
    with pytest.raises(ValueError, match="leave room for at least one prompt token"):
        pack_rows([make_row([1], list(range(8)))], BatchingConfig(buckets=(8,)))


def test_bad_config_and_rows():
    with pytest.raises(ValueError, match="strictly increasing"):
        BatchingConfig(buckets=(16, 8))
    with pytest.raises(ValueError, match="overflow"):
        BatchingConfig(overflow="drop")
    with pytest.raises(ValueError, match="row_multiple"):
        BatchingConfig(row_multiple=0)
    bad = make_row([1, 2], [3, 4])
    bad.loss_mask = np.ones(3, np.int8)
    with pytest.raises(ValueError, match=r"rows\[0\].loss_mask has shape"):
        pack_rows([bad], BatchingConfig())
    with pytest.raises(ValueError, match="prompt_ids must be a non-empty"):
        pack_rows([make_row([], [1])], BatchingConfig())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 20), st.integers(0, 2**31 - 1)), min_size=1, max_size=12),
       st.integers(1, 4))
def test_round_trip(specs, multiple):
    buckets = (8, 16, 32)
    rows = []
    for i, (p, r, seed) in enumerate(specs):
        rng = np.random.default_rng(seed)
        rows.append(make_row(rng.integers(1, 1000, p), rng.integers(1, 1000, r), mask=rng.integers(0, 2, r),
                             traj_id=i, reward=float(rng.normal())))
    batches = pack_rows(rows, BatchingConfig(buckets=buckets, row_multiple=multiple))
    seen = []
    for batch in batches:
        a = batch.arrays
        assert a["tokens"].shape[0] % multiple == 0 and batch.length in buckets
        for b in range(a["tokens"].shape[0]):
            if not a["row_valid"][b]:
                continue
            row = rows[a["row_index"][b]]
            seen.append(int(a["row_index"][b]))
            p, r = int(a["prompt_length"][b]), int(a["response_length"][b])
            total = row.prompt_ids.shape[0] + row.response_length
            assert batch.length == bucket_length(total, buckets)
            np.testing.assert_array_equal(a["tokens"][b, :p], row.prompt_ids[row.prompt_ids.shape[0] - p:])
            np.testing.assert_array_equal(a["tokens"][b, p:p + r], row.response_ids)
            np.testing.assert_array_equal(a["loss_mask"][b, p:p + r], row.loss_mask)
            np.testing.assert_array_equal(a["logprobs"][b, p:p + r], row.logprobs * row.loss_mask)
            assert a["valid"][b].sum() == p + r == min(total, 32)
            assert a["loss_mask"][b, :p].sum() == 0 and a["loss_mask"][b, p + r:].sum() == 0
            assert a["prompt_truncated"][b] == (total > 32) and a["reward"][b] == np.float32(row.reward)
    assert sorted(seen) == list(range(len(rows)))
    assert [b.length for b in batches] == sorted(b.length for b in batches)


@pytest.mark.parametrize("layout", ["step", "trajectory"])
def test_rollout_rows_pack_losslessly(layout):
    tok = chatml_tokenizer()
    engine = RolloutEngine(ScriptedSampler(tok, say_number_policy), tok,
                           RolloutConfig(group_size=2, layout=layout, max_sequence_length=512))
    sampling = SamplingParams(max_new_tokens=32, stop_sequences=(tok.assistant_end_ids,))
    envs = [SayNumberEnv(episode_length=n) for n in (2, 3, 1, 2)]
    rows = engine.run(envs, [0, 1], sampling, jax.random.key(0)).rows
    batches = pack_rows(rows, BatchingConfig(buckets=(64, 128, 256, 512), row_multiple=2))
    assert sum(b.num_rows for b in batches) == len(rows)
    for batch in batches:
        a = batch.arrays
        for b in np.flatnonzero(a["row_valid"]):
            row = rows[a["row_index"][b]]
            n = a["valid"][b].sum()
            np.testing.assert_array_equal(a["tokens"][b, :n], np.concatenate([row.prompt_ids, row.response_ids]))
            assert a["loss_mask"][b].sum() == row.loss_mask.sum()
            assert (a["group_id"][b], a["traj_id"][b], a["anchor_id"][b]) == (row.group_id, row.traj_id, row.anchor_id)
            assert a["episode_return"][b] == row.episode_return and a["won"][b] == row.won
