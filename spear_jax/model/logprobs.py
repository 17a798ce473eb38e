"""Per-token log-probabilities and entropies of a sequence without materialising [B, L, V] logits.

For tokens y_0..y_{L-1} of a row and final hidden states h_t, the statistics of token t come
from the distribution predicted at t - 1:

    logprob[b, t] = log softmax(h_{t-1} W / tau)[y_t],   entropy[b, t] = H(softmax(h_{t-1} W / tau))

(formulas in ``spear_jax.objectives.token_stats``). Both are 0 where token t or token t - 1 is
padding (in particular at each row's first token), so they align with the token ids and their
role masks. A sequence longer than ``chunk_size`` positions is processed in n = ceil(L /
chunk_size) equal chunks inside a ``lax.scan`` whose body is ``jax.checkpoint``-ed: peak memory
holds one chunk's logits [B, ceil(L / n), V] in the forward and in the backward, never [B, L, V].
A sequence that fits one chunk runs as one plain pass (no scan, no recomputation in the backward:
at small vocabularies the chunking would cost more than it saves).

The LM head is a product over one token axis [B * C, D] x [D, V] (``layers.project``): its
weight gradient then contracts the logits' gradient where it lies, where the 3-D form
``bcd,dv->bcv`` makes XLA:CPU write that gradient out transposed first (a copy as large as the
logits).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from spear_jax.model.layers import project
from spear_jax.objectives.token_stats import token_logprobs_and_entropy
from spear_jax.sharding import constrain


def balanced_chunks(length: int, chunk_size: int) -> tuple[int, int]:
    """(n, C): the fewest chunks of at most ``chunk_size`` positions covering ``length``, all of
    one size C = ceil(length / n), so padding is below n positions (not up to chunk_size - 1)."""
    num_chunks = -(-length // chunk_size)
    return num_chunks, -(-length // num_chunks)


def chunked_token_stats(
    hidden: jax.Array,
    targets: jax.Array,
    output_embedding: jax.Array,
    temperature: float = 1.0,
    chunk_size: int = 256,
    rules=(),
) -> tuple[jax.Array, jax.Array]:
    """Log-prob of ``targets`` and entropy under softmax(hidden @ output_embedding / temperature).

    hidden: [B, L, D]; targets: [B, L] int; output_embedding: [D, V].
    Returns (logprobs [B, L], entropy [B, L]) float32, computed at most ``chunk_size`` positions
    at a time (``balanced_chunks``).
    """
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {hidden.shape} and targets {targets.shape} must share [B, L]")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, length, d = hidden.shape
    num_chunks, chunk = balanced_chunks(length, chunk_size)

    def one_chunk(h, y):  # h [B, C, D], y [B, C] -> (logprobs, entropy) [B, C]
        logits = project("nd,dv->nv", h, output_embedding, preferred_element_type=jnp.float32)  # [B, C, V]
        if rules:
            logits = constrain(logits, ("act_batch", "act_length", "act_vocab"), rules)
        return token_logprobs_and_entropy(logits, y, temperature)

    if num_chunks == 1:
        return one_chunk(hidden, targets)
    pad = num_chunks * chunk - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden_chunks = hidden.reshape(b, num_chunks, chunk, d).swapaxes(0, 1)  # [n, B, C, D]
    target_chunks = targets.reshape(b, num_chunks, chunk).swapaxes(0, 1)  # [n, B, C]
    checkpointed = jax.checkpoint(one_chunk)

    def body(carry, xs):
        return carry, checkpointed(*xs)

    _, (logprobs, entropy) = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
    logprobs = logprobs.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :length]
    entropy = entropy.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :length]
    return logprobs, entropy


def sequence_token_stats(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    valid: jax.Array,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """(logprobs [B, L], entropy [B, L]) of ``tokens`` [B, L] under the model, as defined in the
    module docstring (0 where token t or t - 1 is padding). ``valid`` [B, L] bool marks real
    tokens; padding may lead or trail a row but must not interrupt it."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(tokens, valid)
    predictors = jnp.pad(hidden[:, :-1], ((0, 0), (1, 0), (0, 0)))  # h_{t-1} at index t
    logprobs, entropy = chunked_token_stats(
        predictors, tokens, model.output_embedding(), temperature, chunk_size,
        model.cfg.sharding_rules,
    )
    valid = valid.astype(bool)
    scored = valid & jnp.pad(valid[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(scored, logprobs, 0.0), jnp.where(scored, entropy, 0.0)


def selected_token_stats(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    valid: jax.Array,
    selected: jax.Array,
    num_selected: int,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """``sequence_token_stats`` at the ``selected`` [B, L] positions (e.g. a loss mask), 0
    elsewhere, computing logits at only ``num_selected`` positions per row.

    With keep = selected & scored (scored: token t and t - 1 real) and K = ``num_selected``: when
    every row keeps at most K positions, the predictors h_{t-1} of each row's kept positions (in
    order, padded with unkept ones to K) are gathered to [B, K, D], their statistics computed and
    scattered back, so the LM head runs on B x K positions instead of B x L; otherwise (decided
    at run time by ``lax.cond``) the full pass runs. Either way the result equals the full pass
    at the kept positions (up to float32 rounding of the smaller matmul), gradients included."""
    if tokens.shape != selected.shape:
        raise ValueError(f"selected {selected.shape} must have the shape of tokens {tokens.shape}")
    if not 0 < num_selected <= tokens.shape[1]:
        raise ValueError(f"num_selected must be in [1, {tokens.shape[1]}] (the row length), got {num_selected}")
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(tokens, valid)
    predictors = jnp.pad(hidden[:, :-1], ((0, 0), (1, 0), (0, 0)))  # h_{t-1} at index t
    valid = valid.astype(bool)
    keep = selected.astype(bool) & valid & jnp.pad(valid[:, :-1], ((0, 0), (1, 0)))
    stats = functools.partial(chunked_token_stats, output_embedding=model.output_embedding(),
                              temperature=temperature, chunk_size=chunk_size, rules=model.cfg.sharding_rules)

    def at_kept_positions():
        order = jnp.argsort(~keep, axis=1, stable=True)[:, :num_selected]  # [B, K] kept first
        picked = jnp.take_along_axis(predictors, order[..., None], axis=1)
        rows = jnp.arange(tokens.shape[0])[:, None]
        return tuple(jnp.zeros(tokens.shape, jnp.float32).at[rows, order].set(out)
                     for out in stats(picked, jnp.take_along_axis(tokens, order, axis=1)))

    fits = jnp.max(jnp.sum(keep, axis=1)) <= num_selected
    logprobs, entropy = jax.lax.cond(fits, at_kept_positions, lambda: stats(predictors, tokens))
    return jnp.where(keep, logprobs, 0.0), jnp.where(keep, entropy, 0.0)
