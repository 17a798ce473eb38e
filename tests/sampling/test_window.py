"""Attention window: a call works on a power-of-two prefix of the cache and gives the same
results as working on the whole cache; slots beyond the window are never touched."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.model import KVCache, init_cache
from spear_jax.sampling import Sampler, SamplingParams, decode
from spear_jax.sampling import sampler as sampler_module
from spear_jax.sampling.decode_step import decode_weights
from spear_jax.sampling.distribution import SamplingKnobs
from spear_jax.sampling.sampler import attention_window
from spear_jax.sampling.stops import StopTable
from tests.sampling.reference import log_softmax, teacher_forced_logits


def test_attention_window_is_the_bucket_of_the_most_an_active_row_will_hold():
    held = np.array([40, 3, 10, 0])
    appended = np.array([0, 2, 5, 1])
    budget = np.array([0, 8, 4, 1])
    active = appended > 0
    assert attention_window(72, held, appended, budget, active) == 32      # row 2: 19 -> 32
    assert attention_window(72, held, appended, budget, np.array([False, True, False, True])) == 16
    assert attention_window(24, held, appended, budget, active) == 24      # capped by the cache
    assert attention_window(72, held, appended, np.array([0, 8, 50, 1]), active) == 72  # 65 -> 128 -> 72


def _random_cache(cfg, batch, max_len, lengths, seed):
    """A cache with arbitrary finite contents in every slot (also beyond the lengths)."""
    k_key, v_key = jax.random.split(jax.random.key(seed))
    shape = init_cache(cfg, batch, max_len).k.shape
    return KVCache(k=jax.random.normal(k_key, shape), v=jax.random.normal(v_key, shape),
                   lengths=jnp.asarray(lengths, jnp.int32))


def _stacked(cache):
    """k, v as [layers, B, S, KVH, hd] numpy arrays, and lengths."""
    return dict(k=np.asarray(cache.k), v=np.asarray(cache.v), lengths=np.asarray(cache.lengths))


@pytest.mark.parametrize("form", ["unrolled", "scanned", None])  # decode_step's forms / forward_last
def test_windowed_program_equals_whole_cache_program_and_leaves_the_rest_alone(cfg, model, form):
    graphdef, state = model
    weights = None if form is None else decode_weights(graphdef, state, form == "scanned")
    batch, max_len, window, width = 4, 96, 32, 16
    lengths = [9, 50, 0, 20]  # row 1 is inactive and holds more than the window
    rng = np.random.default_rng(0)
    tokens = np.zeros((batch, width), np.int32)
    valid = np.zeros((batch, width), bool)
    for b, n in enumerate([3, 0, 7, 1]):
        tokens[b, :n] = rng.integers(0, cfg.vocab_size, n)
        valid[b, :n] = True
    budget = np.array([12, 0, 10, 11], np.int32)  # 9+3+12 = 24, 0+7+10 = 17, 20+1+11 = 32 <= window
    knobs = SamplingKnobs.make(0.9, 0.95, 0, False)
    table = StopTable.make((), ())
    results = {}
    for w in (window, max_len):
        cache = _random_cache(cfg, batch, max_len, lengths, seed=3)
        before = jax.device_get(cache)
        out = decode.extend_and_decode(
            graphdef, state, cache, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(budget), knobs,
            table, jax.random.key(5), weights=weights, max_steps=16, window=w, rules=cfg.sharding_rules)
        results[w] = jax.device_get(out)
    (t_w, lp_w, n_w, f_w, c_w), (t_f, lp_f, n_f, f_f, c_f) = results[window], results[max_len]
    before, c_w, c_f = map(_stacked, (before, c_w, c_f))
    np.testing.assert_array_equal(t_w, t_f)
    np.testing.assert_allclose(lp_w, lp_f, atol=1e-5)
    np.testing.assert_array_equal(n_w, budget)
    np.testing.assert_array_equal(n_w, n_f)
    np.testing.assert_array_equal(f_w, f_f)
    np.testing.assert_array_equal(c_w["lengths"], np.array(lengths) + valid.sum(1) + budget)
    np.testing.assert_array_equal(c_w["lengths"], c_f["lengths"])
    np.testing.assert_allclose(c_w["k"][:, :, :window], c_f["k"][:, :, :window], atol=1e-5)
    np.testing.assert_allclose(c_w["v"][:, :, :window], c_f["v"][:, :, :window], atol=1e-5)
    # beyond the window nothing changed; the inactive row changed nowhere
    np.testing.assert_array_equal(c_w["k"][:, :, window:], before["k"][:, :, window:])
    np.testing.assert_array_equal(c_w["v"][:, :, window:], before["v"][:, :, window:])
    np.testing.assert_array_equal(c_w["k"][:, 1], before["k"][:, 1])
    np.testing.assert_array_equal(c_w["v"][:, 1], before["v"][:, 1])
    with pytest.raises(ValueError, match="window"):
        decode.extend_and_decode(
            graphdef, state, _random_cache(cfg, batch, max_len, lengths, 3), jnp.asarray(tokens),
            jnp.asarray(valid), jnp.asarray(budget), knobs, table, jax.random.key(5), weights=weights,
            max_steps=16, window=max_len + 1, rules=cfg.sharding_rules)


GREEDY4 = SamplingParams(greedy=True, max_new_tokens=4)
SAMPLED8 = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=8)
GREEDY16 = SamplingParams(greedy=True, max_new_tokens=16)


def _turns(cfg, prompts):
    rng = np.random.default_rng(2)

    def obs(n):
        return list(rng.integers(0, cfg.vocab_size, n))

    return [
        ([list(p) for p in prompts], GREEDY4),             # holds <= 11 + 4 = 15: window 16
        ([obs(3), obs(2), obs(4), obs(1)], SAMPLED8),        # <= 15 + 2 + 8 = 25: window 32
        ([None, obs(30), None, obs(1)], GREEDY4),            # row 1: 25 + 30 + 4 = 59: window 64
        ([obs(2), None, obs(3), None], SAMPLED8),            # <= 20 + 2 + 8; row 1 (59 held) inactive: 32
        ([None, obs(2), None, None], GREEDY16),              # row 1 fills the cache: window 72
    ]


def _run_session(sampler, turns, monkeypatch, windowed):
    used = []

    def spy(cache_len, *args):
        used.append(attention_window(cache_len, *args) if windowed else cache_len)
        return used[-1]

    with monkeypatch.context() as m:
        m.setattr(sampler_module, "attention_window", spy)
        session = sampler.start_session(4)
        gens = [session.extend_and_generate(rows, params, jax.random.key(20 + t))
                for t, (rows, params) in enumerate(turns)]
    return gens, session.lengths(), used


def test_session_with_window_equals_session_without_and_full_forward(cfg, model, prompts, monkeypatch):
    graphdef, state = model
    sampler = Sampler(graphdef, state, cfg, max_len=72, max_batch=4)
    turns = _turns(cfg, prompts)
    windowed, lengths_w, used_w = _run_session(sampler, turns, monkeypatch, windowed=True)
    whole, lengths_f, used_f = _run_session(sampler, turns, monkeypatch, windowed=False)
    assert used_w == [16, 32, 64, 32, 72] and used_f == [72] * 5
    np.testing.assert_array_equal(lengths_w, lengths_f)
    history = [[] for _ in prompts]
    for (rows, params), gens_w, gens_f in zip(turns, windowed, whole):
        for b, (row, gw, gf) in enumerate(zip(rows, gens_w, gens_f)):
            if row is None:
                assert gw is None and gf is None
                continue
            history[b] += row
            np.testing.assert_array_equal(gw.tokens, gf.tokens)
            np.testing.assert_allclose(gw.logprobs, gf.logprobs, atol=1e-5)
            assert gw.finish_reason == gf.finish_reason
            logits = teacher_forced_logits(graphdef, state, history[b] + list(gw.tokens))
            at = logits[len(history[b]) - 1: len(history[b]) - 1 + len(gw.tokens)]
            expected = log_softmax(at, params.temperature)[np.arange(len(gw.tokens)), gw.tokens]
            np.testing.assert_allclose(gw.logprobs, expected, atol=2e-4)
            if params.greedy:
                np.testing.assert_array_equal(gw.tokens, at.argmax(-1))
            history[b] += list(gw.tokens)
    np.testing.assert_array_equal(lengths_w, [len(h) for h in history])
    # the last turn ran row 1 into the cache capacity: 59 held + 2 appended leaves 11 slots
    assert len(windowed[-1][1].tokens) == 11 and windowed[-1][1].finish_reason == "length"
    assert lengths_w[1] == 72


@pytest.mark.parametrize("query_chunk", [0, 3])
def test_cache_attention_paths_equal_cache_free_forward(cfg, query_chunk):
    """Cached appends longer than ``attention_query_chunk`` (query-chunked attention) and short
    ones (decode steps) give the logits of one cache-free forward."""
    from flax import nnx

    from spear_jax.model import forward, init_model

    chunk_cfg = cfg.replace(attention_query_chunk=query_chunk)
    graphdef, state = nnx.split(init_model(chunk_cfg, 3))
    toks = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    want, _ = forward(graphdef, state, toks, jnp.ones_like(toks, bool))
    cache = init_cache(chunk_cfg, 2, 16)
    got = []
    for lo, hi in ((0, 7), (7, 9), (9, 10), (10, 12)):
        part = toks[:, lo:hi]
        logits, cache = forward(graphdef, state, part, jnp.ones_like(part, bool), cache)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(cache.lengths, [12, 12])
