"""The engine on the real KV-cache sampler with the tiny model: rows carry the behaviour
log-probs of their own tokens (recomputed by one teacher-forced forward over prompt + response),
for step rows and for trajectory rows built incrementally on a persistent session."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rollout_scripted import chatml_tokenizer, SayNumberEnv
from spear_jax.model import forward, get_model_config, init_model
from spear_jax.model.tokenizer import tiny_tokenizer
from spear_jax.rollout import RolloutConfig, RolloutEngine
from spear_jax.sampling import Sampler, SamplingParams

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model():
    cfg = get_model_config("tiny")
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    return cfg, graphdef, state


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer(tiny_tokenizer())  # the tiny preset's own vocabulary


PADDED = 512


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef, state, ids, valid):
    logits, _ = forward(graphdef, state, ids, valid)
    logp = jax.nn.log_softmax(logits[0, :-1] / TEMPERATURE, axis=-1)
    return jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1)[:, 0]


def teacher_forced_logprobs(graphdef, state, tokens):
    """log softmax(logits / T) of tokens[1:] given their prefixes, by one cache-free forward
    (right-padded to a fixed length so it compiles once)."""
    n = len(tokens)
    ids = np.zeros((1, PADDED), np.int32)
    ids[0, :n] = tokens
    valid = np.arange(PADDED)[None] < n
    return np.asarray(_token_logprobs(graphdef, state, jnp.asarray(ids), jnp.asarray(valid)))[: n - 1]


def check_row_logprobs(graphdef, state, row):
    stream = np.concatenate([row.prompt_ids, row.response_ids])
    expected = teacher_forced_logprobs(graphdef, state, stream)[row.prompt_ids.shape[0] - 1:]
    model_tokens = row.loss_mask == 1
    np.testing.assert_allclose(row.logprobs[model_tokens], expected[model_tokens], atol=2e-4, rtol=1e-4)
    assert np.all(row.logprobs[~model_tokens] == 0)


@pytest.mark.parametrize("layout", ["step", "trajectory"])
def test_real_sampler_rows(model, tok, layout):
    cfg, graphdef, state = model
    sampler = Sampler(graphdef, state, cfg, max_len=512, max_batch=8)
    sampling = SamplingParams(temperature=TEMPERATURE, max_new_tokens=8, stop_sequences=(tok.assistant_end_ids,))
    config = RolloutConfig(group_size=2, layout=layout, max_sequence_length=512)
    envs = [SayNumberEnv(episode_length=2) for _ in range(4)]
    result = RolloutEngine(sampler, tok, config).run(envs, [3, 4], sampling, jax.random.key(0))
    assert not any(e.failed for e in result.episodes)
    assert len(result.rows) == (8 if layout == "step" else 4)
    for row in result.rows:
        check_row_logprobs(graphdef, state, row)
        assert row.loss_mask.sum() >= 2 and np.all(row.response_ids < cfg.vocab_size)
    if layout == "trajectory":
        for row in result.rows:  # two generated turns around one observation message
            assert row.num_turns == 2 and (row.loss_mask == 0).any()
    again = RolloutEngine(sampler, tok, config).run(envs, [3, 4], sampling, jax.random.key(0))
    for a, b in zip(result.rows, again.rows):  # deterministic for a key
        np.testing.assert_array_equal(a.response_ids, b.response_ids)
