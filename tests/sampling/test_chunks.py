"""Chunked decoding (``max_decode_rows``): rows decoded in chunks of at most that many rows per
program give what decoding them all at once gives, for generate and for sessions."""
import jax
import numpy as np
import pytest

from spear_jax.sampling import Sampler, SamplingParams, decode
from tests.sampling.reference import MAX_BATCH, MAX_LEN

SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=8)


@pytest.fixture
def program_rows(monkeypatch):
    """The batch of every decode program run (recorded around decode.extend_and_decode)."""
    rows = []
    run = decode.extend_and_decode

    def recording(graphdef, state, cache, tokens, *args, **kwargs):
        rows.append(tokens.shape[0])
        return run(graphdef, state, cache, tokens, *args, **kwargs)

    monkeypatch.setattr(decode, "extend_and_decode", recording)
    return rows


def _assert_same(chunked, whole):
    assert len(chunked) == len(whole)
    for c, w in zip(chunked, whole):
        if w is None:
            assert c is None
            continue
        np.testing.assert_array_equal(c.tokens, w.tokens)
        np.testing.assert_allclose(c.logprobs, w.logprobs, atol=1e-5)
        assert c.finish_reason == w.finish_reason


def test_chunks_cover_the_rows_in_order(cfg, model):
    graphdef, state = model
    sampler = Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH, max_decode_rows=3)
    assert sampler.chunks(7) == [(0, 3), (3, 3), (6, 1)]
    assert sampler.chunks(3) == [(0, 3)]
    assert sampler.batch_bucket(3) == 3  # a chunk's program never exceeds max_decode_rows rows
    assert Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH).chunks(7) == [(0, 7)]


def test_chunked_generate_equals_unchunked(cfg, model, prompts, program_rows):
    graphdef, state = model
    rows = prompts + [list(p[:3]) for p in prompts[:2]]  # 6 rows of different lengths
    whole = Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH)
    chunked = Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH, max_decode_rows=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, eos_ids=(3,))
    expected = whole.generate(rows, params, jax.random.key(7))
    program_rows.clear()
    _assert_same(chunked.generate(rows, params, jax.random.key(7)), expected)
    assert program_rows == [4, 2]
    assert len({tuple(g.tokens) for g in expected}) > 1  # the rows drew different tokens


def test_chunked_session_equals_unchunked(cfg, model, prompts, program_rows):
    graphdef, state = model
    rng = np.random.default_rng(2)
    whole = Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH).start_session(5)
    sampler = Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH, max_decode_rows=2)
    chunked = sampler.start_session(5)
    observation = [list(rng.integers(0, cfg.vocab_size, n)) for n in (2, 1, 3, 2, 1)]
    turns = [
        (prompts + [list(prompts[0][:4])], None),
        ([observation[0], observation[1], None, None, observation[4]], [3, 8, 8, 8, 2]),  # rows 2, 3 idle
        ([None, None, observation[2], observation[3], None], None),                          # only rows 2, 3
    ]
    program_rows.clear()
    for turn, (new_tokens, caps) in enumerate(turns):
        expected = whole.extend_and_generate(new_tokens, SAMPLED, jax.random.key(turn), caps)
        _assert_same(chunked.extend_and_generate(new_tokens, SAMPLED, jax.random.key(turn), caps), expected)
        np.testing.assert_array_equal(chunked.lengths(), whole.lengths())
        np.testing.assert_array_equal(chunked.device_lengths(), whole.lengths())
    # per turn: the unchunked program (8 rows), then the chunks with an active row (<= 2 rows each)
    assert program_rows == [8, 2, 2, 1, 8, 2, 1, 8, 2]


def test_max_decode_rows_must_not_be_negative(cfg, model):
    graphdef, state = model
    with pytest.raises(ValueError, match="max_decode_rows"):
        Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH, max_decode_rows=-1)
