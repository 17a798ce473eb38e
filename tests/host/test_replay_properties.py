"""Property tests of the replay buffer driven through the trainer's call order."""
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from host_batches import assert_states_equal, make_batch
from spear_jax.replay import ReplayBuffer, ReplayConfig, nearest_lower_power_of_two

_row = st.tuples(
    st.floats(-2, 12, allow_nan=False),  # score
    st.sampled_from([-1.0, 0.0, 0.5, 2.0]),  # advantage (exact 0 included)
    st.integers(0, 4),  # mask length
    st.integers(0, 3),  # group id
    st.integers(0, 2),  # tool calls
)
_steps = st.lists(st.lists(_row, min_size=0, max_size=12), min_size=1, max_size=12)
_configs = st.builds(
    ReplayConfig,
    buffer_size=st.sampled_from([1, 2, 3, 4, 8]),
    baseline_buffer_size=st.integers(1, 20),
    tolerate_steps=st.integers(0, 12),
    weight_decay=st.sampled_from([-1.0, 0.0, 0.3, 1.0, 2.0]),
    norm_adv_by_std=st.booleans(),
    baseline_std_ddof=st.sampled_from([0, 1]),
    require_tool_call=st.booleans(),
)


def _batch(rows, uid_start, seq_len):
    return make_batch(
        scores=[r[0] for r in rows], advantages=[r[1] for r in rows],
        group_ids=[r[3] for r in rows], mask_lengths=[min(r[2], seq_len) for r in rows],
        seq_len=seq_len, num_tool_calls=[r[4] for r in rows], row_uid_start=uid_start,
    )


def _stored_rows(buffer):
    state = buffer.state_dict()
    rows = {}
    for i in range(int(state["num_entries"])):
        for j, uid in enumerate(state[f"entry{i}_row_row_uid"]):
            rows[int(uid)] = {key[len(f"entry{i}_row_"):]: state[key][j] for key in state
                              if key.startswith(f"entry{i}_row_")}
    return rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs, _steps, st.integers(0, 2**31 - 1))
def test_buffer_invariants_along_a_run(config, steps, seed):
    buffer = ReplayBuffer(config)
    uid = 0
    for step, rows in enumerate(steps, start=1):
        before = _stored_rows(buffer)
        replay, metrics = buffer.replay_if_ready(step, np.random.default_rng([seed, step]))
        if metrics["replay/triggered"]:
            assert buffer.num_rows == 0  # emptied after every attempt
        if replay is not None:
            n = replay["scores"].shape[0]
            assert n == min(nearest_lower_power_of_two(int(metrics["replay/candidates"])), config.buffer_size)
            if config.buffer_size & (config.buffer_size - 1) == 0:
                assert n & (n - 1) == 0  # a power of two whenever buffer_size is one
            assert len(set(replay["row_uid"].tolist())) == n  # without replacement
            for i, row_uid in enumerate(replay["row_uid"].tolist()):
                stored = before[row_uid]  # a subset of the stored rows, fields carried intact
                width = stored["input_ids"].shape[0]
                np.testing.assert_array_equal(replay["input_ids"][i, :width], stored["input_ids"])
                np.testing.assert_array_equal(replay["old_logprobs"][i, :width], stored["old_logprobs"])
                assert replay["scores"][i] == stored["scores"]
                assert replay["collection_step"][i] < step
                if config.mode == "p50":
                    assert replay["row_advantage"][i] >= 0
                else:
                    assert replay["row_advantage"][i] == config.weight_decay * stored["row_advantage"]
        seq_len = 3 + step % 4  # T varies between steps
        batch = _batch(rows, uid, seq_len)
        uid += len(rows)
        buffer.remove_old()
        buffer.add_step(batch, step)
        admitted = (batch["row_advantage"] > 0) & (batch["loss_mask"].sum(1) > 0)
        if config.require_tool_call:
            admitted &= batch["num_tool_calls"] > 0
        newest = {k: v for k, v in _stored_rows(buffer).items() if k >= uid - len(rows)}
        assert sorted(newest) == batch["row_uid"][admitted].tolist()
        for row in _stored_rows(buffer).values():
            assert row["row_advantage"] > 0 and row["loss_mask"].sum() > 0
        tolerate = config.effective_tolerate_steps
        assert len(buffer.entry_steps) <= tolerate + 2
        restored = ReplayBuffer.from_state_dict(config, buffer.state_dict())
        assert_states_equal(restored.state_dict(), buffer.state_dict())
        assert restored.metrics() == buffer.metrics()
