"""Padding rows are not computed: the update skips the model on a micro-batch of padding rows
alone, and the log-prob recomputation skips chunks of padding rows; both as before, to float
rounding (bit for bit at XLA's default optimisation level)."""
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from spear_jax import run_config, sharding, train_step
from spear_jax.model import get_model_config, init_model, logprobs
from spear_jax.trainer_setup import LogProbPass

CFG = get_model_config("tiny", num_layers=1, hidden_size=64, intermediate_size=128, vocab_size=256)
LENGTH, MICRO = 12, 4


def _rows(n_real, n_rows, seed=0):
    """``n_rows`` packed rows, the first ``n_real`` real, the rest padding (as ``batching``)."""
    rng = np.random.default_rng(seed)
    pos = np.arange(LENGTH)[None]
    real = np.arange(n_rows) < n_real
    valid = (pos < rng.integers(8, LENGTH + 1, n_rows)[:, None]) & real[:, None]
    loss_mask = ((pos >= rng.integers(2, 6, n_rows)[:, None]) & valid).astype(np.float32)
    return {
        "tokens": np.where(valid, rng.integers(0, CFG.vocab_size, (n_rows, LENGTH)), 0).astype(np.int32),
        "valid": valid, "loss_mask": loss_mask,
        "old_logprobs": np.where(loss_mask > 0, rng.normal(-5.5, 0.3, (n_rows, LENGTH)), 0).astype(np.float32),
        "ref_logprobs": np.where(loss_mask > 0, rng.normal(-5.5, 0.3, (n_rows, LENGTH)), 0).astype(np.float32),
        "advantages": rng.normal(size=(n_rows, 1)).astype(np.float32) * loss_mask, "row_valid": real,
    }


def _update_config(method, **actor):
    c = importlib.import_module(f"configs.{method}").get_config("twx_tiny")
    c.unlock()
    c.actor.ppo_mini_batch_size, c.actor.ppo_micro_batch_size = 2 * MICRO, MICRO
    c.actor.loss_agg_max_response_length = LENGTH
    c.actor.update(actor)
    return run_config.update_config(c), run_config.optimizer_config(c)


def _update(update_config, optimizer_config, minibatch, replay):
    graphdef, params = nnx.split(init_model(CFG, seed=0))
    optimizer = train_step.make_optimizer(optimizer_config)
    update = train_step.make_update_fn(graphdef, optimizer, update_config, replay)
    keys = train_step.batch_keys(update_config, replay)
    batch = {k: jnp.asarray(v.reshape((2, MICRO) + v.shape[1:])) for k, v in minibatch.items() if k in keys}
    return update(params, optimizer.init(params), batch, jax.random.key(3), jnp.float32(0.7))


def _computing_every_micro_batch(graphdef, params, micro, config):
    return train_step._token_stats(graphdef, params, micro, config)


CASES = [("spear", {}, False), ("spear", {"loss_mode": "clip_cov"}, True),
         ("grpo", {"entropy_coeff": 0.01, "use_kl_loss": True}, False), ("grpo", {"loss_mode": "kl_cov"}, False),
         ("spear", {"loss_agg_scope": "per_micro_batch"}, False),
         ("grpo", {"loss_agg_mode": "seq-mean-token-mean"}, True)]


@pytest.mark.parametrize("method,actor,replay", CASES)
def test_update_skipping_a_padding_micro_batch_equals_computing_it(method, actor, replay, monkeypatch):
    update_config, optimizer_config = _update_config(method, **actor)
    minibatch = _rows(n_real=3, n_rows=2 * MICRO)  # micro-batch 1: rows 4..7, all padding
    skipped = _update(update_config, optimizer_config, minibatch, replay)
    monkeypatch.setattr(train_step, "_real_rows_token_stats", _computing_every_micro_batch)
    computed = _update(update_config, optimizer_config, minibatch, replay)
    # Bit for bit at XLA's default optimisation level; compiled without LLVM's backend passes (the
    # suite's tests/xla.py FAST_COMPILE) the two programs round differently, and AdamW's first
    # step (about lr * g / |g|) magnifies that on gradients near 0, to ~1e-7 of a parameter. A
    # micro-batch wrongly computed or counted would move the parameters by up to lr (5e-4).
    for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(computed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-7)
    assert set(skipped[2]) == set(computed[2])


def test_update_runs_the_model_on_micro_batches_with_a_real_row_only(monkeypatch):
    calls = []
    real_stats = logprobs.sequence_token_stats

    def counted(*args):
        jax.debug.callback(lambda: calls.append(1))
        return real_stats(*args)

    monkeypatch.setattr(train_step, "sequence_token_stats", counted)
    update_config, optimizer_config = _update_config("grpo")
    jax.block_until_ready(_update(update_config, optimizer_config, _rows(n_real=3, n_rows=2 * MICRO), False))
    assert len(calls) == 1
    jax.block_until_ready(_update(update_config, optimizer_config, _rows(n_real=5, n_rows=2 * MICRO), False))
    assert len(calls) == 3


def _logprob_pass(micro, positions=LENGTH):
    c = ml_collections.ConfigDict({"rollout": {"temperature": 0.7, "max_response_length": positions},
                                   "model": {"logprob_chunk_size": 8}, "actor": {"ppo_micro_batch_size": micro}})
    graphdef, params = nnx.split(init_model(CFG, seed=0))
    return LogProbPass(graphdef, c, sharding.make_mesh(data=-1)), graphdef, params


def test_logprob_pass_computes_chunks_with_a_real_row_only_and_zeros_the_rest():
    micro = jax.device_count()  # one row per device
    lp, graphdef, params = _logprob_pass(micro)
    rows = _rows(n_real=micro + micro // 2, n_rows=3 * micro)  # chunks: real, half real, padding
    calls = []
    compute = lp._with_entropy
    lp._with_entropy = lambda *args: calls.append(1) or compute(*args)
    logp, entropy = lp.with_entropy(params, rows["tokens"], rows["valid"])
    assert len(calls) == 2 and logp.shape == entropy.shape == (3 * micro, LENGTH)
    direct = train_step.make_token_stats_fn(graphdef, 0.7, 8)
    for start in (0, micro):
        tokens, valid = (jax.device_put(rows[k][start:start + micro], lp.sharding) for k in ("tokens", "valid"))
        want_logp, want_entropy = direct(params, tokens, valid)
        np.testing.assert_array_equal(logp[start:start + micro], np.asarray(want_logp))
        np.testing.assert_array_equal(entropy[start:start + micro], np.asarray(want_entropy))
    assert not logp[2 * micro:].any() and not entropy[2 * micro:].any()
    reference = lp.logprobs(params, rows["tokens"], rows["valid"])
    np.testing.assert_allclose(reference[:2 * micro], logp[:2 * micro], rtol=1e-6)
    assert not reference[2 * micro:].any()


@pytest.mark.parametrize("positions", [10, 4])  # every row's loss mask fits in 10; some exceed 4 (full pass)
def test_logprob_pass_at_the_loss_mask_equals_the_full_pass_there(positions):
    micro = jax.device_count()
    lp, graphdef, params = _logprob_pass(micro, positions)
    rows = _rows(n_real=2 * micro, n_rows=2 * micro, seed=1)
    selected = rows["loss_mask"] > 0
    assert selected.sum(axis=1).max() == 10
    logp, entropy = lp.with_entropy(params, rows["tokens"], rows["valid"], selected)
    full_logp, full_entropy = lp.with_entropy(params, rows["tokens"], rows["valid"])
    np.testing.assert_allclose(logp[selected], full_logp[selected], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropy[selected], full_entropy[selected], rtol=1e-5, atol=1e-6)
    assert not logp[~selected].any() and not entropy[~selected].any()
    reference = lp.logprobs(params, rows["tokens"], rows["valid"], selected)
    np.testing.assert_allclose(reference, logp, rtol=1e-6, atol=1e-7)
