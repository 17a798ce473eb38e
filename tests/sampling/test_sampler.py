"""Sampler on the tiny model: decoding equals full-forward recomputation, per-row independence,
stop handling, determinism, no recompilation for new weights, bf16 cache, input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.sampling import Sampler, SamplingParams, decode
from tests.sampling.reference import (
    MAX_BATCH, MAX_LEN, log_softmax, random_state, reference_first_stop, teacher_forced_logits,
)

GREEDY = SamplingParams(greedy=True, max_new_tokens=12)


def assert_matches_full_forward(model, prompt, gen, temperature=1.0, greedy=False, atol=2e-4):
    """Generated tokens' log-probs (and, if greedy, the tokens) equal what one cache-free forward
    over prompt + generation gives."""
    graphdef, state = model
    logits = teacher_forced_logits(graphdef, state, list(prompt) + list(gen.tokens))
    at = logits[len(prompt) - 1: len(prompt) - 1 + len(gen.tokens)]
    expected = log_softmax(at, temperature)[np.arange(len(gen.tokens)), gen.tokens]
    np.testing.assert_allclose(gen.logprobs, expected, atol=atol)
    if greedy:
        np.testing.assert_array_equal(gen.tokens, at.argmax(-1))


def test_greedy_equals_argmax_of_full_forward(sampler, model, prompts):
    gens = sampler.generate(prompts, GREEDY, jax.random.key(0))
    for prompt, gen in zip(prompts, gens):
        assert gen.finish_reason == "length" and len(gen.tokens) == 12
        assert gen.tokens.dtype == np.int32 and gen.logprobs.dtype == np.float32
        assert_matches_full_forward(model, prompt, gen, greedy=True)
    assert len({tuple(g.tokens) for g in gens}) == len(gens)  # the model is not degenerate


def test_sampled_logprobs_equal_teacher_forced_logprobs(sampler, model, prompts, cfg):
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, max_new_tokens=12)
    gens = sampler.generate(prompts, params, jax.random.key(1))
    graphdef, state = model
    for prompt, gen in zip(prompts, gens):
        assert_matches_full_forward(model, prompt, gen, temperature=0.7)
        logits = teacher_forced_logits(graphdef, state, list(prompt) + list(gen.tokens))
        at = logits[len(prompt) - 1: len(prompt) - 1 + len(gen.tokens)]
        ranks = (at > at[np.arange(len(gen.tokens)), gen.tokens][:, None]).sum(-1)
        assert ranks.max() < 40  # every sampled token is inside the top-k set


def test_rows_of_different_lengths_equal_decoding_each_alone(sampler, prompts):
    together = sampler.generate(prompts, GREEDY, jax.random.key(0))
    for prompt, gen in zip(prompts, together):
        (alone,) = sampler.generate([prompt], GREEDY, jax.random.key(0))
        np.testing.assert_array_equal(gen.tokens, alone.tokens)
        np.testing.assert_allclose(gen.logprobs, alone.logprobs, atol=1e-5)


def test_stop_sequences_and_eos_end_exactly_where_they_should(sampler, prompts):
    prompt = prompts[1]
    key = jax.random.key(0)
    (free,) = sampler.generate([prompt], SamplingParams(greedy=True, max_new_tokens=16), key)
    g = [int(t) for t in free.tokens]
    cases = [
        dict(stop_sequences=(tuple(g[4:7]),)),                       # three-token stop
        dict(stop_sequences=((int(prompt[-1]), g[0]), (500, 1))),  # spans the prompt boundary
        dict(eos_ids=(g[5],)),
        dict(eos_ids=(g[9],), stop_sequences=(tuple(g[2:4]),)),
    ]
    for case in cases:
        (gen,) = sampler.generate([prompt], SamplingParams(greedy=True, max_new_tokens=16, **case), key)
        end, reason = reference_first_stop(g, case.get("stop_sequences", ()), case.get("eos_ids", ()))
        end, reason = (16, "length") if end is None else (end, reason)
        assert (len(gen.tokens), gen.finish_reason) == (end, reason), case
        np.testing.assert_array_equal(gen.tokens, g[:end])
        np.testing.assert_allclose(gen.logprobs, free.logprobs[:end], atol=1e-5)
    # the boundary-spanning stop did not end the generation at its first token
    (gen,) = sampler.generate([prompt], SamplingParams(greedy=True, max_new_tokens=16,
                                                       stop_sequences=((int(prompt[-1]), g[0]),)), key)
    assert len(gen.tokens) > 1


def test_max_new_tokens(sampler, prompts):
    gens = sampler.generate(prompts, SamplingParams(greedy=True, max_new_tokens=5), jax.random.key(0))
    assert all(len(g.tokens) == 5 and g.finish_reason == "length" for g in gens)


def test_deterministic_for_a_key_and_different_for_other_keys(sampler, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    a = sampler.generate(prompts, params, jax.random.key(7))
    b = sampler.generate(prompts, params, jax.random.key(7))
    c = sampler.generate(prompts, params, jax.random.key(8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.logprobs, y.logprobs)
    assert any(not np.array_equal(x.tokens, z.tokens) for x, z in zip(a, c))


def test_a_longer_step_budget_draws_the_same_first_tokens(sampler, prompts):
    """Each row's per-step uniforms are drawn once per call for the call's step bucket; entry t
    is the same whatever the bucket, so a 5-token call is the start of a 40-token one."""
    short = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=5), jax.random.key(4))
    long = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=40), jax.random.key(4))
    for s, l in zip(short, long):
        np.testing.assert_array_equal(s.tokens, l.tokens[:5])
        np.testing.assert_allclose(s.logprobs, l.logprobs[:5], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("params", [SamplingParams(top_k=1, max_new_tokens=12),
                                    SamplingParams(top_p=1e-6, temperature=1.3, max_new_tokens=12)])
def test_top_k_one_and_tiny_top_p_equal_greedy(sampler, prompts, params):
    greedy = sampler.generate(prompts, GREEDY, jax.random.key(0))
    other = sampler.generate(prompts, params, jax.random.key(3))
    for g, o in zip(greedy, other):
        np.testing.assert_array_equal(g.tokens, o.tokens)


def test_session_continuation_equals_full_reprefill(sampler, model, prompts, cfg):
    rng = np.random.default_rng(1)
    session = sampler.start_session(4)
    history = [list(p) for p in prompts]
    turns = [
        ([list(p) for p in prompts], SamplingParams(greedy=True, max_new_tokens=6)),
        ([list(rng.integers(0, cfg.vocab_size, n)) for n in (3, 2, 4, 1)],
         SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=6)),
        ([list(rng.integers(0, cfg.vocab_size, 2)), list(rng.integers(0, cfg.vocab_size, 3)), None,
          list(rng.integers(0, cfg.vocab_size, 4))], SamplingParams(greedy=True, max_new_tokens=6)),
    ]
    for turn, (new_tokens, params) in enumerate(turns):
        gens = session.extend_and_generate(new_tokens, params, jax.random.key(10 + turn))
        for b, (new, gen) in enumerate(zip(new_tokens, gens)):
            if new is None:
                assert gen is None
                continue
            if turn > 0:
                history[b] += new
            assert_matches_full_forward(model, history[b], gen, temperature=params.temperature,
                                        greedy=params.greedy)
            history[b] += list(gen.tokens)
        np.testing.assert_array_equal(session.lengths(), [len(h) for h in history])
        np.testing.assert_array_equal(session.device_lengths(), [len(h) for h in history])
    # row 1 ran into the cache capacity: 25 tokens + 3 appended leaves room for 4
    assert len(gens[1].tokens) == 4 and gens[1].finish_reason == "length"
    assert session.lengths()[1] == MAX_LEN
    with pytest.raises(ValueError, match=r"new_tokens\[1\].*does not fit"):
        session.extend_and_generate([None, [1], None, None], GREEDY, jax.random.key(0))
    assert session.extend_and_generate([None] * 4, GREEDY, jax.random.key(0)) == [None] * 4


def test_new_weights_do_not_recompile(cfg, model, prompts):
    graphdef, state = model
    sampler = Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH)
    other = SamplingParams(temperature=0.5, top_k=3, top_p=0.5, max_new_tokens=9, eos_ids=(1, 2),
                           stop_sequences=((3, 4),))
    before = sampler.generate(prompts, GREEDY, jax.random.key(0))
    sampler.generate([p[:3] for p in prompts], other, jax.random.key(1))
    compiled = decode.extend_and_decode._cache_size()
    _, new_state = random_state(cfg, 5)
    sampler.set_params(new_state)
    after = sampler.generate(prompts, GREEDY, jax.random.key(0))
    sampler.generate([p[:3] for p in prompts], other, jax.random.key(1))
    other_values = SamplingParams(temperature=0.9, top_k=5, top_p=0.9, max_new_tokens=10, eos_ids=(5, 6),
                                  stop_sequences=((7, 8),))  # same shapes, other values
    sampler.generate([p[:3] for p in prompts], other_values, jax.random.key(1))
    assert decode.extend_and_decode._cache_size() == compiled
    assert any(not np.array_equal(a.tokens, b.tokens) for a, b in zip(before, after))
    for prompt, gen in zip(prompts, after):
        assert_matches_full_forward((graphdef, new_state), prompt, gen, greedy=True)
    with pytest.raises(ValueError, match="does not match"):
        sampler.set_params(random_state(cfg.replace(hidden_size=64), 0)[1])


@pytest.mark.parametrize("mesh_shape", [dict(data=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_equals_unsharded(cfg, model, sampler, prompts, mesh_shape):
    from spear_jax.sharding import make_mesh

    graphdef, state = model
    sharded = Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH, mesh=make_mesh(**mesh_shape))
    for params in (GREEDY, SamplingParams(temperature=0.8, max_new_tokens=12)):
        ref = sampler.generate(prompts, params, jax.random.key(4))
        got = sharded.generate(prompts, params, jax.random.key(4))
        for r, g in zip(ref, got):
            np.testing.assert_array_equal(r.tokens, g.tokens)
            np.testing.assert_allclose(r.logprobs, g.logprobs, atol=1e-4)


def test_bfloat16_cache(cfg, model, prompts):
    graphdef, state = model
    sampler = Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH, cache_dtype=jnp.bfloat16)
    gens = sampler.generate(prompts, SamplingParams(temperature=0.8, max_new_tokens=12), jax.random.key(0))
    for prompt, gen in zip(prompts, gens):
        assert_matches_full_forward(model, prompt, gen, temperature=0.8, atol=0.1)


def test_bfloat16_weight_copy_changes_nothing_under_bfloat16_compute(cfg, prompts):
    bf16 = cfg.replace(compute_dtype="bfloat16")
    graphdef, state = random_state(bf16, 3)
    as_given = Sampler(graphdef, state, bf16, max_len=MAX_LEN, max_batch=MAX_BATCH)
    copied = Sampler(graphdef, state, bf16, max_len=MAX_LEN, max_batch=MAX_BATCH, weight_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(copied._state)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}  # master untouched
    params = SamplingParams(temperature=0.8, max_new_tokens=12)
    for prompt, ref, got in zip(prompts, as_given.generate(prompts, params, jax.random.key(2)),
                                copied.generate(prompts, params, jax.random.key(2))):
        assert_matches_full_forward((graphdef, state), prompt, got, temperature=0.8, atol=0.1)
        if jax.default_backend() == "cpu":  # XLA:GPU may fuse a float32 weight's cast differently
            np.testing.assert_array_equal(ref.tokens, got.tokens)
            np.testing.assert_array_equal(ref.logprobs, got.logprobs)
    _, new_state = random_state(bf16, 4)
    copied.set_params(new_state)  # the float32 signature is what new weights must match
    assert {x.dtype for x in jax.tree.leaves(copied._state)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="weight_dtype"):
        Sampler(graphdef, state, bf16, max_len=MAX_LEN, max_batch=MAX_BATCH, weight_dtype=jnp.int8)


def test_bad_inputs_name_the_argument(sampler, cfg):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"prompts\[1\].*non-empty"):
        sampler.generate([[1], []], GREEDY, key)
    with pytest.raises(ValueError, match=r"prompts\[0\].*outside"):
        sampler.generate([[cfg.vocab_size]], GREEDY, key)
    with pytest.raises(ValueError, match="max_batch"):
        sampler.generate([[1]] * (MAX_BATCH + 1), GREEDY, key)
    with pytest.raises(ValueError, match="max_len"):
        sampler.generate([[1] * (MAX_LEN + 1)], GREEDY, key)
    with pytest.raises(ValueError, match="stop_sequences"):
        sampler.generate([[1]], SamplingParams(stop_sequences=((cfg.vocab_size,),)), key)
    with pytest.raises(TypeError, match="SamplingParams"):
        sampler.generate([[1]], dict(greedy=True), key)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="empty sequence"):
        SamplingParams(stop_sequences=((),))
    with pytest.raises(ValueError, match="new_tokens has 1 rows"):
        sampler.start_session(2).extend_and_generate([[1]], GREEDY, key)
    with pytest.raises(ValueError, match="max_len"):
        Sampler(*random_state(cfg, 0), cfg, max_len=cfg.max_position_embeddings + 1, max_batch=1)


def test_sharded_session_equals_unsharded_session(cfg, model, sampler, prompts):
    from spear_jax.sharding import make_mesh

    graphdef, state = model
    sharded = Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH,
                      mesh=make_mesh(data=2, fsdp=2, tensor=2))
    sessions = [sampler.start_session(4), sharded.start_session(4)]
    turns = [[list(p) for p in prompts], [[1, 2], None, [3], [4, 5, 6]]]
    params = SamplingParams(temperature=0.8, max_new_tokens=6)
    for turn, new_tokens in enumerate(turns):
        ref, got = (s.extend_and_generate(new_tokens, params, jax.random.key(turn)) for s in sessions)
        for r, g in zip(ref, got):
            assert (r is None) == (g is None)
            if r is not None:
                np.testing.assert_array_equal(r.tokens, g.tokens)
                np.testing.assert_allclose(r.logprobs, g.logprobs, atol=1e-4)
    np.testing.assert_array_equal(sessions[0].lengths(), sessions[1].device_lengths())


def test_session_rows_stop_at_their_own_token_caps(sampler, prompts):
    """Per-row caps bound each row's new tokens below max_new_tokens; the tokens produced are
    the prefix of what the uncapped session decodes (greedy)."""
    capped = sampler.start_session(4).extend_and_generate(
        [list(p) for p in prompts], GREEDY, jax.random.key(0), max_new_tokens=[3, 12, 1, 20])
    free = sampler.start_session(4).extend_and_generate([list(p) for p in prompts], GREEDY, jax.random.key(0))
    for gen, whole, cap in zip(capped, free, [3, 12, 1, 12]):
        assert len(gen.tokens) == cap and gen.finish_reason == "length"
        np.testing.assert_array_equal(gen.tokens, whole.tokens[:cap])
    with pytest.raises(ValueError, match="max_new_tokens must hold 4 entries >= 1"):
        sampler.start_session(4).extend_and_generate([list(p) for p in prompts], GREEDY, jax.random.key(0),
                                                     max_new_tokens=[3, 0, 1, 2])
