"""The device program: append tokens to a KV cache, then decode in one ``lax.while_loop``.

``extend_and_decode`` is jitted once per shape bucket (batch, appended length, cache length,
attention window, step budget, stop-table size). The weights ``state`` are an argument, never a
constant, so new weights reuse the compiled program; the cache is donated and updated in place.

Per row b, with budget[b] new tokens allowed:

    logits <- forward_last(appended tokens of row b)       (prefill / observation append)
    repeat while some row is live and step < max_steps:
        t, logp <- sample_tokens(u[b, step], logits[:, b])     u[b] = uniform(fold_in(key, first_row + b), [max_steps])
        out[b, step] <- t;  row finishes on eos > stop sequence > length (n == budget[b])
        logits, cache <- decode_step(t), written for every row live before this step
                         (the final token of a row also enters its cache, so a later turn
                         continues after it)

The prefill runs the model's ``forward_last``. Given ``weights`` (``decode_step.DecodeWeights``,
which the sampler makes where ``decode_step_form`` names a form: whole layers on every device)
the loop runs ``decode_step.decode_step``, the same computation for one token per row,
feature-major over those output-major weights and head-major K/V buffers (``LayerKV``, split
from the window once per call and written back at the end), one per layer with the layers
unrolled, or stacked with a layer scan; otherwise (``weights`` None) ``forward_last`` again.

The loop holds the logits vocab-major, [V, B] (``Transformer.logits_vocab_major``: the LM head
as embed [V, D] x hidden^T, the faster product on XLA:CPU at the decode loop's batch sizes).

Rows without appended tokens (``valid[b]`` all False) are inactive: untouched, nothing generated.

Attention window. The program works on the first ``window`` slots of the cache only (a static
prefix): it slices them out, appends and decodes there, and writes them back into the donated
full cache with one ``dynamic_update_slice``. Every active row must hold all its tokens, the
appended ones and its whole budget within the window (the caller picks ``window`` >= max over
active rows of held + appended + budget); slots beyond it are neither read nor written, so a
session with ``max_len`` slots pays attention and KV reads for the filled prefix only. An
inactive row may hold more than ``window`` tokens: it writes nothing (its slots are dropped)
and its meaningless logits are never used.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from spear_jax.model import KVCache, forward_last
from spear_jax.model.kv_cache import LayerKV, merge_layers, split_layers
from spear_jax.model.transformer import SCAN_UNROLLED_MAX_LAYERS
from spear_jax.sampling import stops
from spear_jax.sampling.decode_step import LAYER_KEY_AXES, LAYER_VALUE_AXES, DecodeWeights, decode_step
from spear_jax.sampling.distribution import SamplingKnobs, sample_tokens
from spear_jax.sharding import constrain

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
FINISH_CODES = {EOS: "eos", STOP: "stop", LENGTH: "length"}

CACHE_AXES = ("layers", "act_batch", "act_length", "act_kv_heads", None)  # the stacked k or v buffer


def _constrain_cache(cache: KVCache, rules) -> KVCache:
    return cache.map_buffers(lambda x: constrain(x, CACHE_AXES, rules))


def _prefix(cache: KVCache, window: int) -> KVCache:
    """The first ``window`` slots of every row (same lengths)."""
    return cache.map_buffers(lambda x: x[:, :, :window])


def _write_prefix(full: KVCache, prefix: KVCache) -> KVCache:
    """``full`` with its first ``prefix.max_len`` slots replaced by ``prefix`` (in place when
    ``full`` is donated), lengths taken from ``prefix``."""
    def put(whole, part):
        return jax.lax.dynamic_update_slice(whole, part, (0,) * whole.ndim)

    return KVCache(k=put(full.k, prefix.k), v=put(full.v, prefix.v), lengths=prefix.lengths)


def _decode_path(graphdef, state, full: KVCache, cache: KVCache, window: int, rules,
                 weights: DecodeWeights | None):
    """(the loop's cache, step (token [B], live [B], cache) -> (logits [V, B], cache), write-back
    of the loop's cache into ``full``) for the window ``cache`` after the prefill.

    weights given: ``decode_step`` over head-major buffers and those weights, per layer or stacked
    over layers as the weights are (``split_layers``); None: the
    model's ``forward_last`` over the stacked window (its layer scan gathers a sharded layer's
    weights inside the loop, one layer at a time)."""
    if weights is not None:
        def step(token, live, c):
            logits, c = decode_step(graphdef, state, weights, token, live, c)
            return logits, _constrain_layers(c, rules)

        def write_back(c):
            return _constrain_cache(merge_layers(full, c), rules)

        return _constrain_layers(split_layers(cache, window, weights.stacked), rules), step, write_back

    def stacked_step(token, live, c):
        logits, c = forward_last(graphdef, state, token[:, None], live[:, None], c, vocab_major=True)
        return logits, _constrain_cache(c, rules)

    def stacked_write_back(c):
        return c if window == full.max_len else _constrain_cache(_write_prefix(full, c), rules)

    return cache, stacked_step, stacked_write_back


def _constrain_layers(cache: LayerKV, rules) -> LayerKV:
    def each(buffers, axes):
        if cache.stacked:
            return constrain(buffers, ("layers", *axes), rules)
        return tuple(constrain(x, axes, rules) for x in buffers)

    return LayerKV(k=each(cache.k, LAYER_KEY_AXES), v=each(cache.v, LAYER_VALUE_AXES), lengths=cache.lengths)


def _row_uniforms(key: jax.Array, rows: jax.Array, steps: int) -> jax.Array:
    """[B, steps] float32 in [0, 1): row ``rows[b]``'s uniform for each decode step, drawn once
    per call as ``uniform(fold_in(key, rows[b]), (steps,))`` (no per-step key derivation, which
    XLA:CPU ran as a loop of threefry rounds at every step, greedy steps included). Entry t
    does not depend on ``steps`` (JAX's default threefry with ``jax_threefry_partitionable``,
    its default: counter t, whatever the shape), so calls with different step budgets draw
    alike (tested)."""
    def per_row(row):
        return jax.random.uniform(jax.random.fold_in(key, row), (steps,), jnp.float32)

    return jax.vmap(per_row)(rows)


DECODE_LAYERS = ("auto", "unrolled", "scanned")  # Sampler(decode_layers=...), config.rollout.decode_layers


def whole_layers_per_device(axis_sizes) -> bool:
    """True when no mesh axis but ``data`` is larger than 1 (every device holds whole layers).
    axis_sizes: mesh axis -> size (a ``Mesh``'s ``shape``, or the config's resolved mesh); None
    for no mesh."""
    return all(size == 1 for axis, size in (axis_sizes or {}).items() if axis != "data")


def decode_step_form(cfg, mesh, decode_layers: str = "auto", platform: str | None = None) -> str | None:
    """How the decode loop runs the blocks: "unrolled" (``decode_step`` over per-layer weights
    and buffers, one traced step per layer: no per-token copy of a layer's weights or cache),
    "scanned" (``decode_step``'s layer scan over the same weights and buffers stacked: a compile
    time independent of the depth, each layer's weights sliced out of the stack every step), or
    None (the model's scanned ``forward_last``).

    The step needs every device to hold whole layers (no mesh axis but ``data`` larger than 1:
    otherwise XLA gathers every layer's sharded weights at once): None otherwise. "unrolled" and
    "scanned" name the form. "auto" unrolls on CPU (``platform``: the mesh's devices', else JAX's
    default backend) and wherever the model's own blocks are unrolled (``scan_layers`` False, or
    at most ``SCAN_UNROLLED_MAX_LAYERS`` layers). On CPU the layer scan copies every layer's
    weights out of the stack at every step (XLA:CPU does not read a dynamically sliced operand
    of a product in place), which costs more than the unrolled program's longer compile once a
    program has run 200-1,100 decode steps (SmolLM2-135M, B = 1 to 32, two runs; an RL run
    reuses its programs every iteration; ``bench.decode_layers`` prints the break-even). A
    scanned deep model on an accelerator keeps ``forward_last`` (a compile time independent of
    the depth; the step's copy of the weights is not measured to pay there)."""
    if decode_layers not in DECODE_LAYERS:
        raise ValueError(f"decode_layers must be one of {DECODE_LAYERS}, got {decode_layers!r}")
    if not whole_layers_per_device(None if mesh is None else mesh.shape):
        return None
    if decode_layers != "auto":
        return decode_layers
    platform = platform or (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
    if platform == "cpu" or not cfg.scan_layers or cfg.num_layers <= SCAN_UNROLLED_MAX_LAYERS:
        return "unrolled"
    return None


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps", "window", "rules"),
                   donate_argnames=("cache",))
def extend_and_decode(graphdef, state, cache: KVCache, tokens, valid, budget, knobs: SamplingKnobs,
                      table: stops.StopTable, key, first_row=0, weights: DecodeWeights | None = None, *,
                      max_steps: int, window: int, rules):
    """Append then decode.

    tokens, valid: [B, L] int32 / bool, the tokens appended to each row (any padding layout);
    budget: [B] int32, most tokens row b may generate (0 for inactive rows); key: PRNG key;
    first_row: int32 scalar, the index of row 0 among all rows of the call (row b draws with
    fold_in(key, first_row + b), so a batch decoded in chunks draws what it draws at once);
    window: cache slots the program works on (<= cache.max_len; see the module docstring);
    rules: the model's sharding rules (for the cache layout under a mesh); weights: the step's
    ``decode_step.decode_weights(graphdef, state, stacked)``, or None for the model's scanned
    ``forward_last`` (the sampler passes them where ``decode_step_form`` names a form; ``_decode_path``).
    Returns (out_tokens [B, max_steps] int32, out_logprobs [B, max_steps] float32,
    num_generated [B] int32, finish [B] int32 in {RUNNING (inactive), EOS, STOP, LENGTH}, cache).
    """
    batch = tokens.shape[0]
    if not 0 < window <= cache.max_len:
        raise ValueError(f"window must be in [1, cache.max_len={cache.max_len}], got {window}")
    full = _constrain_cache(cache, rules)
    cache = full if window == full.max_len else _constrain_cache(_prefix(full, window), rules)
    logits, cache = forward_last(graphdef, state, tokens, valid, cache, vocab_major=True)
    cache, one_token, write_back = _decode_path(graphdef, state, full, cache, window, rules, weights)
    uniforms = _row_uniforms(key, first_row + jnp.arange(batch, dtype=jnp.int32), max_steps)
    active = jnp.any(valid, axis=1)
    finish = jnp.where(active & (budget <= 0), LENGTH, RUNNING).astype(jnp.int32)
    done = ~active | (budget <= 0)
    carry = dict(
        step=jnp.int32(0), cache=cache, logits=logits, done=done, finish=finish,
        num=jnp.zeros((batch,), jnp.int32), window=stops.empty_window(batch, table),
        out_tokens=jnp.zeros((batch, max_steps), jnp.int32),
        out_logprobs=jnp.zeros((batch, max_steps), jnp.float32),
    )

    def keep_going(c):
        return (c["step"] < max_steps) & ~jnp.all(c["done"])

    def step(c):
        u = jax.lax.dynamic_index_in_dim(uniforms, c["step"], axis=1, keepdims=False)
        token, logprob = sample_tokens(u, c["logits"], knobs)
        live = ~c["done"]
        token = jnp.where(live, token, 0)
        num = c["num"] + live.astype(jnp.int32)
        window = stops.push(c["window"], token, live)
        reason = jnp.where(
            stops.is_eos(token, table), EOS,
            jnp.where(stops.ends_with_stop(window, table), STOP,
                      jnp.where(num >= budget, LENGTH, RUNNING)))
        logits, cache = one_token(token, live, c["cache"])
        return dict(
            step=c["step"] + 1, cache=cache, logits=logits,
            done=c["done"] | (live & (reason != RUNNING)),
            finish=jnp.where(live, reason, c["finish"]).astype(jnp.int32), num=num, window=window,
            out_tokens=jax.lax.dynamic_update_slice_in_dim(c["out_tokens"], token[:, None], c["step"], 1),
            out_logprobs=jax.lax.dynamic_update_slice_in_dim(
                c["out_logprobs"], jnp.where(live, logprob, 0.0)[:, None], c["step"], 1),
        )

    c = jax.lax.while_loop(keep_going, step, carry)
    return c["out_tokens"], c["out_logprobs"], c["num"], c["finish"], write_back(c["cache"])

