"""Quality flags of a rollout batch: overlong / incomplete come from the rows (computed once, in the
rollout) and agree with the filters' standalone computation on the same responses."""
import dataclasses

import jax
import numpy as np
import pytest

from rollout_scripted import SayNumberEnv, ScriptedSampler, chatml_tokenizer
from spear_jax import filters, rewards
from spear_jax.rollout import RolloutConfig, RolloutEngine
from spear_jax.sampling import SamplingParams

MAX_NEW_TOKENS = 24


def mixed_policy(context: str) -> str:
    """By the number shown: a right answer, no action (incomplete), a rambling answer that runs
    past the token cap (overlong), or one with a replacement character (unreadable)."""
    n = int(context.rsplit("Number: ", 1)[1].split()[0].rstrip("'.,"))
    return [f"<think>ok</think><action>say {n}</action>", "<think>hmm, no idea</think>",
            "<think>" + "say say say " * 20 + "</think>", f"<think>\ufffd</think><action>say {n}</action>"][n % 4]


@pytest.fixture(scope="module")
def rows():
    tok = chatml_tokenizer()
    engine = RolloutEngine(ScriptedSampler(tok, mixed_policy), tok, RolloutConfig(group_size=2))
    sampling = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, stop_sequences=(tok.assistant_end_ids,))
    envs = [SayNumberEnv(episode_length=4) for _ in range(8)]
    return engine.run(envs, [0, 1, 2, 3], sampling, jax.random.key(0)).rows


def test_flags_equal_the_standalone_computation(rows):
    lengths = np.array([r.response_length for r in rows])
    ids = np.zeros((len(rows), lengths.max()), np.int64)
    for i, r in enumerate(rows):
        ids[i, : lengths[i]] = r.response_ids
    standalone = filters.response_quality_flags(ids, lengths, [r.response_text for r in rows], MAX_NEW_TOKENS)
    flags = rewards.quality_flags(rows)
    for name, values in flags.as_dict().items():
        np.testing.assert_array_equal(values, standalone.as_dict()[name], err_msg=name)
    for name in ("incomplete", "overlong", "unreadable"):  # the batch exercises both values
        assert 0 < flags.as_dict()[name].sum() < len(rows), name


def test_overlong_and_incomplete_are_the_rows_own_flags(rows):
    flipped = [dataclasses.replace(r, overlong=not r.overlong, incomplete=not r.incomplete) for r in rows]
    before, after = rewards.quality_flags(rows), rewards.quality_flags(flipped)
    np.testing.assert_array_equal(after.overlong, ~before.overlong)
    np.testing.assert_array_equal(after.incomplete, ~before.incomplete)
    np.testing.assert_array_equal(after.unreadable, before.unreadable)
