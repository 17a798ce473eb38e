"""One decode step of the model: a single new token per row against a per-layer KV window.

Computes what ``forward_last(graphdef, state, token[:, None], live[:, None], cache,
vocab_major=True)`` computes for a one-token chunk (the logits of the next token, [V, B]; the
token's key and value written at slot ``lengths[b]`` of every layer for the live rows),
specialised to that shape:

* the activations are feature-major, [features, B], and every product is W h with the weights
  output-major (``DecodeWeights``: an [out, in] copy of each block weight, made once per set of
  weights by ``decode_weights``, outside the decode program). With 1-32 rows XLA:CPU runs
  W [out, in] x h [in, B] 1.2-1.4x faster than h^T [B, in] x W [in, out]: the long operand is
  read in place, the short one is the one packed. (Transposing the stored weights inside the
  program does not do it: XLA folds the transpose back into the product's operand layout.)
* unrolled (``DecodeWeights.layers`` a tuple), the layers run as a Python loop over
  ``LayerKV``'s one buffer per layer and one weight record per layer: no ``lax.scan`` carrying
  a stacked cache, no per-layer slice of the weights or the cache copied out and written back.
  Scanned (``DecodeWeights.stacked``, with ``split_layers(..., stacked=True)``'s buffers), a
  ``lax.scan`` over the stacked weights carries the stacked buffers: each layer writes its
  token into its slice of the stack in place and attends over that slice, and XLA copies each
  layer's weights out of the stack every step (the price of a compile time independent of the
  depth);
* each layer's window is head-major (transposed once per call by ``split_layers``), the keys
  slot-minor, K [B, KVH, hd, W], the values V [B, KVH, W, hd], so the single query's attention
  is two batched dots over (row, kv head) whose operands lie in place, each in the plain
  [m, k] x [k, n] form:

      s[b, k, g, s'] = sum_d q[b, k, g, d] K[b, k, d, s'] / sqrt(hd)     for s' <= lengths[b]
      out[b, k, g, :] = sum_s' softmax_s'(s)[b, k, g, s'] V[b, k, s', :]

  (on the token-major window XLA:CPU copied K and V transposed for the dots at every layer and
  step; multiply-and-reduce over that layout ran about half as fast as these dots; and keys
  held [W, hd] like the values made the scores' dot, q K^T, about 2x slower at 8-32 rows).

Rows that are not live write nothing; their logits are meaningless (finite). The model must be
the base architecture (no LoRA adapters: the sampler decodes merged weights).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spear_jax.model.config import ModelConfig
from spear_jax.model.kv_cache import LayerKV
from spear_jax.model.layers import rms_norm, rope_angles, rope_inverse_frequencies, rotate_halves
from spear_jax.sharding import constrain

LAYER_KEY_AXES = ("act_batch", "act_kv_heads", None, "act_length")     # one layer's k buffer
LAYER_VALUE_AXES = ("act_batch", "act_kv_heads", "act_length", None)   # one layer's v buffer
RESIDUAL_AXES = ("act_embed", "act_batch")  # the feature-major residual stream [D, B]


class DecodeLayer(NamedTuple):
    """One block's weights, output-major: each projection as [out features, in features]."""

    input_norm: jax.Array          # [D]
    qkv: jax.Array                 # [(H + 2 KVH) hd, D]: the q, k, v projections' rows, in order
    qkv_bias: jax.Array | None     # [(H + 2 KVH) hd] (qwen2), else None
    q_norm: jax.Array | None       # [hd] (qwen3), else None
    k_norm: jax.Array | None       # [hd] (qwen3), else None
    o: jax.Array                   # [D, H hd]
    post_norm: jax.Array           # [D]
    gate_up: jax.Array             # [2 F, D]: the gate rows, then the up rows
    down: jax.Array                # [D, F]


class DecodeWeights(NamedTuple):
    """The decode step's copy of the block weights, and the untied LM head [V, D] (None when
    tied: the embedding [V, D] is already output-major). ``layers``: a tuple of one
    ``DecodeLayer`` per layer (the unrolled step), or one ``DecodeLayer`` whose arrays are
    stacked over the layers, [layers, ...] (the step's layer scan)."""

    layers: tuple[DecodeLayer, ...] | DecodeLayer
    head: jax.Array | None

    @property
    def stacked(self) -> bool:
        return isinstance(self.layers, DecodeLayer)


@functools.partial(jax.jit, static_argnums=(0, 2))
def decode_weights(graphdef: nnx.GraphDef, state: nnx.State, stacked: bool = False) -> DecodeWeights:
    """The output-major copy of a model's block weights (and untied head) that ``decode_step``
    reads, in the compute dtype where that is narrower than the stored one (the step casts
    every weight to it anyway), else in the stored dtype; one record per layer, or (``stacked``)
    one record stacked over the layers, for the step's layer scan. A program of its own: inside
    the decode program XLA would fold the transposes into the products (and run the slower
    form)."""
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    if cfg.lora_rank > 0:
        raise ValueError("the decode step runs the base architecture: merge the LoRA adapters first "
                         "(spear_jax.model.lora.merge_lora)")
    att, mlp = model.blocks.attention, model.blocks.mlp
    layers, d = cfg.num_layers, cfg.hidden_size

    def rows(w):  # [layers, D, *out] -> [layers, out, D]
        return w.reshape(layers, d, -1).swapaxes(1, 2)

    def flat(*biases):  # [layers, heads, hd] each -> [layers, sum of heads * hd]
        return jnp.concatenate([b.reshape(layers, -1) for b in biases], axis=1)

    qkv = jnp.concatenate([rows(att.q_proj[...]), rows(att.k_proj[...]), rows(att.v_proj[...])], axis=1)
    bias = flat(att.q_bias[...], att.k_bias[...], att.v_bias[...]) if cfg.qkv_bias else None
    norms = (att.q_norm.weight[...], att.k_norm.weight[...]) if cfg.qk_norm else (None, None)
    every_layer = DecodeLayer(
        input_norm=model.blocks.input_norm.weight[...], qkv=qkv, qkv_bias=bias, q_norm=norms[0],
        k_norm=norms[1], o=att.o_proj[...].reshape(layers, -1, d).swapaxes(1, 2),
        post_norm=model.blocks.post_attention_norm.weight[...],
        gate_up=jnp.concatenate([rows(mlp.gate_proj[...]), rows(mlp.up_proj[...])], axis=1),
        down=mlp.down_proj[...].swapaxes(1, 2))
    head = None if cfg.tie_embeddings else model.lm_head[...].T
    cd = cfg.compute_jnp_dtype

    def narrowed(w):
        return w.astype(cd) if jnp.dtype(cd).itemsize < w.dtype.itemsize else w

    every_layer, head = jax.tree.map(narrowed, (every_layer, head))
    if stacked:
        return DecodeWeights(every_layer, head)
    return DecodeWeights(tuple(jax.tree.map(lambda w: w[i], every_layer) for i in range(layers)), head)


def abstract_decode_weights(graphdef: nnx.GraphDef, state: nnx.State, form: str | None) -> DecodeWeights | None:
    """``decode_weights``' shapes for an abstract (or concrete) ``state`` where the decode runs
    the per-layer step (``form``: "unrolled" or "scanned", ``decode.decode_step_form``), else
    (None) None: the ``weights`` argument that lowers the sampler's program."""
    if form is None:
        return None
    return jax.eval_shape(functools.partial(decode_weights, graphdef, stacked=form == "scanned"), state)


def attend_one_query(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """Grouped-query attention of one query per row over slots [0, lengths[b]] of its window.

    q [B, H, hd]; k [B, KVH, hd, W], v [B, KVH, W, hd] (``LayerKV``'s layouts; H a multiple of
    KVH); lengths [B] int32 (the query's position) -> [B, H, hd] in q's dtype. Scores and
    softmax in float32."""
    b, h, hd = q.shape
    kvh, window = v.shape[1], v.shape[2]
    q32 = q.reshape(b, kvh, h // kvh, hd).astype(jnp.float32)
    scores = jnp.einsum("bkgd,bkds->bkgs", q32, k.astype(jnp.float32)) * (1.0 / np.sqrt(hd))
    visible = jnp.arange(window)[None, :] <= lengths[:, None]                    # [B, W]
    scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)                                      # [B, KVH, G, W]
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, h, hd).astype(q.dtype)


def _write_slot(buffer: jax.Array, new: jax.Array, slots: jax.Array, slot_axis: int, layer: tuple = ()) -> jax.Array:
    """buffer, a key [B, KVH, hd, W] (``slot_axis`` 3) or value [B, KVH, W, hd] (``slot_axis`` 2)
    buffer (or, with ``layer`` = (i,), the stack [layers, ...] of them and its layer i), with
    new [KVH, hd, B] stored at slots [B] (>= W: dropped): a scatter, or for one row of the
    per-layer form on CPU ``_select_slot``."""
    new = new.transpose(2, 0, 1).astype(buffer.dtype)                            # [B, KVH, hd]
    if slots.shape[0] == 1 and not layer and jax.default_backend() == "cpu":
        return _select_slot(buffer, new, slots[0], slot_axis)
    rows = jnp.arange(slots.shape[0])
    between = (slice(None),) * (slot_axis - 1)  # the axes from kv heads to the slot axis
    return buffer.at[(*layer, rows, *between, slots)].set(new, mode="drop")


def _select_slot(buffer: jax.Array, new: jax.Array, slot: jax.Array, slot_axis: int) -> jax.Array:
    """``_write_slot`` of one row as an elementwise select over the buffer, on CPU: XLA rewrites
    a one-row scatter as a dynamic-update-slice, which XLA:CPU fused into both readers of the
    buffer (the attention and the loop's carry), and copy insertion then copied the buffer four
    times per step. Elsewhere the scatter stays (a select rewrites the whole buffer; not
    measured to pay on accelerators)."""
    hit = jax.lax.broadcasted_iota(jnp.int32, buffer.shape, slot_axis) == slot
    return jnp.where(hit, jnp.expand_dims(new, slot_axis), buffer)


def _layer_buffer(buffer: jax.Array, layer: tuple) -> jax.Array:
    """One layer's buffer: ``buffer`` itself (``layer`` = ()), or slice i of the stack (``layer`` = (i,))."""
    return jax.lax.dynamic_index_in_dim(buffer, layer[0], keepdims=False) if layer else buffer


def _product(w: jax.Array, h: jax.Array) -> jax.Array:
    """w [out, in] x h [in, B] -> [out, B], both in h's dtype (the compute dtype)."""
    return jnp.einsum("oi,ib->ob", w.astype(h.dtype), h)


def _project_qkv(layer: DecodeLayer, cfg: ModelConfig, h: jax.Array, positions: jax.Array):
    """``Attention.project_qkv`` feature-major: h [D, B] (compute dtype), positions [B] ->
    q [H, hd, B], k, v [KVH, hd, B], RoPE applied to q and k."""
    heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
    qkv = _product(layer.qkv, h)                                                 # [(H + 2 KVH) hd, B]
    if layer.qkv_bias is not None:
        qkv = qkv + layer.qkv_bias.astype(h.dtype)[:, None]
    qkv = qkv.reshape(heads + 2 * kv_heads, cfg.head_dim, -1)
    q, k, v = qkv[:heads], qkv[heads:heads + kv_heads], qkv[heads + kv_heads:]
    if layer.q_norm is not None:
        q = rms_norm(q, layer.q_norm[:, None], cfg.rms_norm_eps, axis=1)
        k = rms_norm(k, layer.k_norm[:, None], cfg.rms_norm_eps, axis=1)
    angles = rope_angles(positions, rope_inverse_frequencies(cfg)).T                   # [hd/2, B]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return rotate_halves(q, cos, sin, axis=1), rotate_halves(k, cos, sin, axis=1), v


def _block_step(layer: DecodeLayer, cfg: ModelConfig, x, lengths, slots, k_buf, v_buf, index: tuple = ()):
    """One pre-norm block on the residual x [D, B]; returns (x, k_buf, v_buf) with this token's
    key and value written at ``slots`` [B]. k_buf, v_buf: this layer's buffers, or (``index`` =
    (i,), i this layer's index) the buffers stacked over every layer."""
    rules, eps = cfg.sharding_rules, cfg.rms_norm_eps
    q, k, v = _project_qkv(layer, cfg, rms_norm(x, layer.input_norm[:, None], eps, axis=0), lengths)
    stack_axes = ("layers",) if index else ()
    k_buf = constrain(_write_slot(k_buf, k, slots, 3, index), stack_axes + LAYER_KEY_AXES, rules)
    v_buf = constrain(_write_slot(v_buf, v, slots, 2, index), stack_axes + LAYER_VALUE_AXES, rules)
    mixed = attend_one_query(q.transpose(2, 0, 1), _layer_buffer(k_buf, index), _layer_buffer(v_buf, index),
                             lengths)                                            # [B, H, hd]
    x = x + _product(layer.o, mixed.reshape(mixed.shape[0], -1).T.astype(x.dtype))
    x = constrain(x, RESIDUAL_AXES, rules)
    gate, up = jnp.split(_product(layer.gate_up, rms_norm(x, layer.post_norm[:, None], eps, axis=0)), 2)
    x = x + _product(layer.down, jax.nn.silu(gate) * up)
    return constrain(x, RESIDUAL_AXES, rules), k_buf, v_buf


def decode_step(graphdef: nnx.GraphDef, state: nnx.State, weights: DecodeWeights, token: jax.Array,
                live: jax.Array, cache: LayerKV) -> tuple[jax.Array, LayerKV]:
    """token [B] int32, live [B] bool -> (float32 logits [V, B] of the next token, vocab-major,
    and the cache with each live row's token appended and its length + 1). ``weights``:
    ``decode_weights(graphdef, state, stacked)``, with ``cache`` from ``split_layers(...,
    stacked)`` of the same form; the embedding and final norm come from ``state``."""
    if weights.stacked != cache.stacked:
        raise ValueError("decode_step: stacked weights need the stacked cache (split_layers(..., stacked=True)) "
                         "and per-layer weights the per-layer one")
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    cd = cfg.compute_jnp_dtype
    slots = jnp.where(live, cache.lengths, cache.window)
    x = jnp.take(model.embed[...], token, axis=0).astype(cd).T                   # [D, B]
    blocks = _scanned_blocks if weights.stacked else _unrolled_blocks
    x, k_out, v_out = blocks(weights.layers, cfg, x, cache, slots)
    hidden = rms_norm(x, model.final_norm.weight[...][:, None], cfg.rms_norm_eps, axis=0)
    head = model.embed[...] if weights.head is None else weights.head            # [V, D]
    logits = jnp.einsum("vd,db->vb", head.astype(cd), hidden, preferred_element_type=jnp.float32)
    lengths = cache.lengths + live.astype(jnp.int32)
    return logits, LayerKV(k=k_out, v=v_out, lengths=lengths)


def _unrolled_blocks(layers: tuple[DecodeLayer, ...], cfg: ModelConfig, x, cache: LayerKV, slots):
    """Every block in turn, a Python loop over the per-layer weights and buffers -> (x, k, v)."""
    k_out, v_out = [], []
    for layer, buffers in zip(layers, zip(cache.k, cache.v), strict=True):
        x, k_buf, v_buf = _block_step(layer, cfg, x, cache.lengths, slots, *buffers)
        k_out.append(k_buf)
        v_out.append(v_buf)
    return x, tuple(k_out), tuple(v_out)


def _scanned_blocks(layers: DecodeLayer, cfg: ModelConfig, x, cache: LayerKV, slots):
    """Every block in a ``lax.scan`` over the stacked weights, carrying x and the stacked
    buffers: layer i writes its token into slice i of the stack in place and attends over that
    slice -> (x, k, v). The scan slices each layer's weights out of the stack (a copy XLA:CPU
    makes every step), but its compile time does not grow with the depth."""
    def block(carry, layer_and_index):
        layer, i = layer_and_index
        x, k, v = carry
        return _block_step(layer, cfg, x, cache.lengths, slots, k, v, index=(i,)), None

    (x, k, v), _ = jax.lax.scan(block, (x, cache.k, cache.v), (layers, jnp.arange(cfg.num_layers)))
    return x, k, v
