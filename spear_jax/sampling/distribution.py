"""Next-token selection on device: temperature, top-k, top-p (nucleus), greedy; one uniform per row.

With scaled logits z = logits / T and tokens ranked by z (descending, rank r = 0, 1, ...; ties
to the lower id, as a stable sort orders them):

    keep_k(r)  = top_k == 0  or  r < top_k
    q_r        = softmax(z restricted to keep_k)_r                (renormalised after top-k)
    keep_p(r)  = top_p >= 1  or  sum_{r' < r} q_r' < top_p        (smallest head with mass >= p)
    token      ~ softmax(z restricted to keep_k and keep_p)
    logprob    = log softmax(z)[token]                            (before truncation)

Exactly ``top_k`` tokens survive top-k. Nothing is sorted: each cut is a threshold on z, found
by bisection over the integer keys that order float32 values (``truncation_mask``; on XLA:CPU,
where a stable argsort of each row cost over ten greedy decode steps, a tiny model's calls at
top-p 0.6 ran 6-11x faster at batch 1-32, SmolLM2-135M's 1.4-3.8x). Greedy takes
argmax(logits), ties to the lowest id (``first_index_of`` the maximum). A draw
inverts the cumulative distribution over the vocabulary in id order with the row's uniform
u ~ U[0, 1) (``inverse_cdf_draw``): with weights w_v = exp(z_v - max z) (0 where truncated)
and C_v = w_0 + ... + w_v, the token is the v with C_{v-1} <= u C_{V-1} < C_v. That is one
random number per row where the Gumbel-max form of ``jax.random.categorical`` needs one per
vocabulary entry (at batch 32 on CPU its noise made a tiny model's decode calls 47% slower
than greedy ones). All knobs are traced values: changing them does not recompile.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingKnobs:
    """Device form of the per-call sampling settings (all scalars, traced)."""

    temperature: jax.Array  # [] float32
    top_p: jax.Array        # [] float32
    top_k: jax.Array        # [] int32, 0 = off
    greedy: jax.Array       # [] bool

    @classmethod
    def make(cls, temperature: float, top_p: float, top_k: int, greedy: bool) -> "SamplingKnobs":
        return cls(
            temperature=jnp.asarray(temperature, jnp.float32), top_p=jnp.asarray(top_p, jnp.float32),
            top_k=jnp.asarray(top_k, jnp.int32), greedy=jnp.asarray(greedy, bool),
        )


def first_index_of(x: jax.Array, value: jax.Array, axis: int = -1) -> jax.Array:
    """The lowest index along ``axis`` where x equals ``value`` (broadcast against x with that
    axis removed), else the last index: int32 with ``axis`` removed.

    With ``value`` = the max along ``axis`` this is argmax with ties to the lowest index, as two
    plain reductions instead of ``jnp.argmax``'s variadic (value, index) reduction, which XLA:CPU
    runs as a scalar loop (a quarter of a decode step's time for a 4,096-token vocabulary at
    batch 32). A NaN maximum gives the last index."""
    ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
    return jnp.min(jnp.where(x == jnp.expand_dims(value, axis), ids, x.shape[axis] - 1), axis=axis)


def _last_positive(x: jax.Array) -> jax.Array:
    """Index of the last positive entry of x [n] (0 when none): int32 []."""
    return jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1], dtype=jnp.int32), 0))


def inverse_cdf_draw(weights: jax.Array, u: jax.Array) -> jax.Array:
    """The index v with C_{v-1} <= u C_{V-1} < C_v, C the cumulative sum of ``weights``.

    weights: [V] >= 0, some positive; u: [] in [0, 1) -> int32 []. A zero-weight entry is never
    picked, whatever the rounding. The sum runs in two levels, block totals and then the
    entries of the block u falls in (blocks of a power of two near sqrt(V)), so the work is
    O(V) and a cumulative sum never spans more than ~sqrt(V) terms."""
    vocab = weights.shape[-1]
    block = 1 << max(0, round(math.log2(vocab) / 2))
    num_blocks = -(-vocab // block)
    blocks = jnp.pad(weights, (0, num_blocks * block - vocab)).reshape(num_blocks, block)
    totals = jnp.sum(blocks, axis=-1)                                  # [num_blocks]
    ends = jnp.cumsum(totals)                                          # C at each block's end
    target = u * ends[-1]
    b = jnp.minimum(jnp.sum(ends <= target, dtype=jnp.int32), _last_positive(totals))
    start = jnp.where(b > 0, ends[jnp.maximum(b - 1, 0)], 0.0)
    inside = jnp.cumsum(blocks[b])                                     # [block]
    j = jnp.minimum(jnp.sum(inside <= target - start, dtype=jnp.int32), _last_positive(blocks[b]))
    return b * block + j


def ordered_keys(x: jax.Array) -> jax.Array:
    """float32 -> int32 keys in the same order: key(a) < key(b) iff a < b, and key(a) == key(b)
    iff a == b (-0.0 and 0.0 share a key). Positive floats' bit patterns already sort as
    integers; a negative one's magnitude bits are flipped, so a larger magnitude sorts lower."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _bisect(lo: jax.Array, hi: jax.Array, holds, steps: int) -> jax.Array:
    """The largest t in [lo, hi] (int32 [B] each) with holds(t) (a [B] bool of a [B] int32,
    monotone: true up to some t, false beyond; true at lo), in ``steps`` halvings (32 cover
    any int32 range). The midpoint rounds up and is taken without overflow: (lo | hi) -
    ((lo ^ hi) >> 1) = ceil((lo + hi) / 2)."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo | hi) - ((lo ^ hi) >> 1)
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    return jax.lax.fori_loop(0, steps, halve, (lo, hi))[0]


def _first_ids(tied: jax.Array, wanted: jax.Array) -> jax.Array:
    """tied [B, V] bool, wanted [B] int32 >= 1 -> the first ``wanted`` ids of each row's tied
    set (all of them when it holds fewer) [B, V]: ties in rank are broken by the lower id. The
    id bound comes from a bisection: the largest m with count(tied & id < m) < wanted."""
    vocab = tied.shape[-1]
    ids = jax.lax.broadcasted_iota(jnp.int32, tied.shape, 1)
    fewer = lambda m: jnp.sum(tied & (ids < m[:, None]), axis=-1, dtype=jnp.int32) < wanted
    bound = _bisect(jnp.zeros_like(wanted), jnp.full_like(wanted, vocab), fewer, max(1, vocab.bit_length()))
    return tied & (ids <= bound[:, None])


def _keep_ties(keys: jax.Array, threshold: jax.Array, tied_kept: jax.Array) -> jax.Array:
    """Keys above ``threshold`` [B], and of the keys equal to it the first ``tied_kept`` [B]
    (>= 1) ids: [B, V] bool. The id search runs only when some row has more ties than it keeps."""
    at = keys == threshold[:, None]
    cut = jnp.sum(at, axis=-1, dtype=jnp.int32) > tied_kept
    tied = jax.lax.cond(jnp.any(cut), lambda: jnp.where(cut[:, None], _first_ids(at, tied_kept), at), lambda: at)
    return (keys > threshold[:, None]) | tied


def _top_k_mask(keys: jax.Array, top_k: jax.Array) -> jax.Array:
    """The top_k largest keys of each row [B, V] (all when top_k is 0 or >= V), ties to the
    lower id. t = the largest key with count(keys >= t) >= k, found by bisection."""
    vocab = keys.shape[-1]
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    at_least_k = lambda t: jnp.sum(keys >= t[:, None], axis=-1, dtype=jnp.int32) >= k
    t = _bisect(jnp.min(keys, axis=-1), jnp.max(keys, axis=-1), at_least_k, 32)
    return _keep_ties(keys, t, k - jnp.sum(keys > t[:, None], axis=-1, dtype=jnp.int32))


def _top_p_mask(keys: jax.Array, probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """The smallest head of each row, in rank order, holding mass >= top_p of ``probs`` [B, V]
    (0 outside the candidates): rank r survives iff the mass before it is < top_p.

    With S(t) = sum of probs over keys > t, the last survivor's key is the smallest key t with
    S(t) < top_p (a bisection over the keys); every key above it survives, and of the n keys
    tied at it, all holding the same probability q, the j-th (by id, from 0) survives while
    S(t) + j q < top_p: ceil((top_p - S(t)) / q) of them."""
    mass_above = lambda t: jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=-1)     # S(t) [B]
    candidate = probs > 0
    lowest = jnp.min(jnp.where(candidate, keys, jnp.iinfo(jnp.int32).max), axis=-1)
    highest = jnp.max(keys, axis=-1)
    reaches = lambda t: mass_above(t) >= top_p
    t = jnp.minimum(_bisect(lowest - 1, highest, reaches, 32) + 1, highest)
    q = jnp.max(jnp.where(keys == t[:, None], probs, 0.0), axis=-1)
    tied_kept = jnp.minimum(jnp.ceil((top_p - mass_above(t)) / q), keys.shape[-1]).astype(jnp.int32)
    return _keep_ties(keys, t, jnp.maximum(tied_kept, 1)) & candidate


def truncation_mask(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Which tokens survive top-k, then top-p on the renormalised survivors: scaled [B, V]
    (logits / T, in vocabulary order) -> bool [B, V]. Ranks are by value, ties to the lower id,
    as a stable descending sort would order them, without the sort: each cut is a threshold
    found by bisection over the values' ``ordered_keys`` (32 passes over [B, V], each a compare
    and a sum), and runs only when its knob is on."""
    keys = ordered_keys(scaled)
    keep_k = jax.lax.cond(top_k > 0, lambda: _top_k_mask(keys, top_k), lambda: jnp.ones_like(keys, dtype=bool))

    def nucleus():
        return _top_p_mask(keys, jax.nn.softmax(jnp.where(keep_k, scaled, -jnp.inf), axis=-1), top_p)

    return jax.lax.cond(top_p < 1.0, nucleus, lambda: keep_k)


def _sample_truncated(uniforms, scaled, top_k, top_p):
    """One draw per row from softmax(scaled) restricted to ``truncation_mask``: scaled [B, V]."""
    keep = truncation_mask(scaled, top_k, top_p)
    weights = jnp.where(keep, jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0)
    return jax.vmap(inverse_cdf_draw)(weights, uniforms)


LANES = 128  # row length of the lane-dense view in ``exp_weights``


def exp_weights(logits: jax.Array, top: jax.Array, inv_t: jax.Array) -> jax.Array:
    """w = exp((logits - top) * inv_t) for logits [V, B], top [B], inv_t []: on the lane-dense
    view [V B / LANES, LANES] of the row-major logits (top repeated along each row) when B
    divides LANES, V B is a multiple of it and the trace runs on one device, else on [V, B]
    itself. ``column_sums`` gives the per-row sums [B] from either.

    XLA:CPU vectorises an elementwise loop along its minor axis: over [V, B] with B = 1 every
    exponential runs scalar (a 4,096-token vocabulary, jitted alone: 97 us over [V, 1], 10 us
    over the view; B = 8: 95 against 31 us). The view is taken behind an optimization barrier:
    without it XLA moves the reshape past the exponential and loops over [V, B] again. Under a
    mesh of several devices (``jax.set_mesh``) the rows may be sharded, and the view would
    gather every row's logits onto every device: there it keeps [V, B]."""
    vocab, batch = logits.shape
    if LANES % batch or (vocab * batch) % LANES or jax.sharding.get_abstract_mesh().size > 1:
        return jnp.exp((logits - top) * inv_t)
    view = jax.lax.optimization_barrier(logits.reshape(-1, LANES))
    return jnp.exp((view - jnp.tile(top, LANES // batch)) * inv_t)


def column_sums(weights: jax.Array, batch: int) -> jax.Array:
    """Per-row sums [B] of ``exp_weights``' result (the lane-dense view or [V, B])."""
    return jnp.sum(weights, axis=0).reshape(-1, batch).sum(axis=0)


def sample_tokens(uniforms: jax.Array, logits: jax.Array, knobs: SamplingKnobs) -> tuple[jax.Array, jax.Array]:
    """uniforms [B] float32 in [0, 1) (one per row, read by draws only), logits [V, B] float32,
    vocab-major (the decode loop's layout, ``Transformer.logits_vocab_major``) ->
    (tokens [B] int32, logprobs [B] float32 = log softmax(logits / temperature) at the tokens).

    Without truncation: the maximum m of the logits; greedy's first index holding m, or a draw
    from the weights w = exp((logits - m) / T) (softmax(logits / T) up to its sum), laid out
    [B, V] for the per-row draws; and the sum of w for the log-probs, over the lane-dense view
    (``exp_weights``). On the sampled path w is computed twice, inside the draw's branch and
    for the sum (XLA does not share work across the ``cond``): a greedy call then never writes
    w out, it only sums it. (The draw over the lane-dense view, reshaped back to [V, B], made
    tiny's sampled calls 0.82x at B = 8 and 0.87x at B = 32.)"""
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=0)                                                # [B]
    inv_t = 1.0 / knobs.temperature
    truncate = (knobs.top_k > 0) | (knobs.top_p < 1.0)

    def draw():
        return jax.lax.cond(
            truncate,
            lambda: _sample_truncated(uniforms, logits.T * inv_t, knobs.top_k, knobs.top_p),
            lambda: jax.vmap(inverse_cdf_draw)(jnp.exp((logits.T - top[:, None]) * inv_t), uniforms),
        )

    tokens = jax.lax.cond(knobs.greedy, lambda: first_index_of(logits, top, axis=0), draw).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, tokens[None, :], axis=0)[0]
    total = column_sums(exp_weights(logits, top, inv_t), logits.shape[1])
    logprobs = (picked - top) * inv_t - jnp.log(total)
    return tokens, logprobs
