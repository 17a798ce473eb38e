"""One decode step of the model: a single new token per row against a per-layer KV window.

Computes what ``forward_last(graphdef, state, token[:, None], live[:, None], cache,
vocab_major=True)`` computes for a one-token chunk (the logits of the next token, [V, B]; the
token's key and value written at slot ``lengths[b]`` of every layer for the live rows),
specialised to that shape:

* the layers run as an unrolled Python loop over ``LayerKV``'s one buffer per layer: no
  ``lax.scan`` carrying a stacked cache, no per-layer slice of it copied out and written back;
* each layer's weights come as their own module (``layer_blocks``, sliced out of the stacked
  weights once per call, before the decode loop), not sliced out of the stack every step;
* each layer's window is head-major, [B, KVH, W, hd] (transposed once per call by
  ``split_layers``), so the single query's attention is two batched dots over (row, kv head)
  whose operands lie in place:

      s[b, k, g, s'] = sum_d q[b, k, g, d] K[b, k, s', d] / sqrt(hd)     for s' <= lengths[b]
      out[b, k, g, :] = sum_s' softmax_s'(s)[b, k, g, s'] V[b, k, s', :]

  (on the token-major window XLA:CPU copied K and V transposed for the dots at every layer and
  step, and multiply-and-reduce over that layout ran about half as fast as these dots).

Rows that are not live write nothing; their logits are meaningless (finite). The model must be
the base architecture (no LoRA adapters: the sampler decodes merged weights).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spear_jax.model.kv_cache import LayerKV
from spear_jax.model.layers import Block
from spear_jax.sharding import constrain

LAYER_CACHE_AXES = ("act_batch", "act_kv_heads", "act_length", None)  # one layer's k or v buffer


def attend_one_query(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """Grouped-query attention of one query per row over slots [0, lengths[b]] of its window.

    q [B, H, hd]; k, v [B, KVH, W, hd] head-major (H a multiple of KVH); lengths [B] int32 (the
    query's position) -> [B, H, hd] in q's dtype. Scores and softmax in float32."""
    b, h, hd = q.shape
    kvh, window = k.shape[1], k.shape[2]
    q32 = q.reshape(b, kvh, h // kvh, hd).astype(jnp.float32)
    scores = jnp.einsum("bkgd,bksd->bkgs", q32, k.astype(jnp.float32)) * (1.0 / np.sqrt(hd))
    visible = jnp.arange(window)[None, :] <= lengths[:, None]                    # [B, W]
    scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)                                      # [B, KVH, G, W]
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, h, hd).astype(q.dtype)


def _write_slot(buffer: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buffer [B, KVH, W, hd] with new [B, KVH, hd] stored at slots [B] (>= W: dropped)."""
    rows = jnp.arange(buffer.shape[0])
    return buffer.at[rows, :, slots].set(new.astype(buffer.dtype), mode="drop")


def _block_step(block: Block, x, lengths, slots, k_buf, v_buf, rules):
    """One pre-norm block on x [B, 1, D]; returns (x, k_buf, v_buf) with this token written."""
    cfg = block.attention.cfg
    cd = cfg.compute_jnp_dtype
    q, k, v = block.attention.project_qkv(block.input_norm(x), lengths[:, None])
    k_buf = constrain(_write_slot(k_buf, k[:, 0], slots), LAYER_CACHE_AXES, rules)
    v_buf = constrain(_write_slot(v_buf, v[:, 0], slots), LAYER_CACHE_AXES, rules)
    mixed = attend_one_query(q[:, 0], k_buf, v_buf, lengths).astype(cd)         # [B, H, hd]
    out = jnp.einsum("bhk,hkd->bd", mixed, block.attention.o_proj[...].astype(cd))
    out = constrain(out[:, None], ("act_batch", "act_length", "act_embed"), rules)
    x = x + out.astype(x.dtype)
    x = x + block.mlp(block.post_attention_norm(x)).astype(x.dtype)
    return x, k_buf, v_buf


def layer_blocks(graphdef: nnx.GraphDef, state: nnx.State) -> list[Block]:
    """The model's blocks as ``num_layers`` separate modules, block i holding slice i of the
    stacked block weights (computed once, outside the decode loop, so that a step reads each
    layer's weights where they lie instead of slicing a copy out of the stack)."""
    model = nnx.merge(graphdef, state)
    if model.cfg.lora_rank > 0:
        raise ValueError("the decode step runs the base architecture: merge the LoRA adapters first "
                         "(spear_jax.model.lora.merge_lora)")
    block_graphdef, stacked = nnx.split(model.blocks)
    return [nnx.merge(block_graphdef, jax.tree.map(lambda w: w[layer], stacked))
            for layer in range(model.cfg.num_layers)]


def decode_step(graphdef: nnx.GraphDef, state: nnx.State, blocks: list[Block], token: jax.Array,
                live: jax.Array, cache: LayerKV) -> tuple[jax.Array, LayerKV]:
    """token [B] int32, live [B] bool -> (float32 logits [V, B] of the next token, vocab-major,
    and the cache with each live row's token appended and its length + 1). ``blocks``:
    ``layer_blocks``."""
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    slots = jnp.where(live, cache.lengths, cache.window)
    x = jnp.take(model.embed[...], token[:, None], axis=0).astype(cfg.compute_jnp_dtype)  # [B, 1, D]
    k_out, v_out = [], []
    for layer, block in enumerate(blocks):
        x, k_buf, v_buf = _block_step(block, x, cache.lengths, slots, cache.k[layer], cache.v[layer],
                                      cfg.sharding_rules)
        k_out.append(k_buf)
        v_out.append(v_buf)
    logits = model.logits_vocab_major(model.final_norm(x)[:, 0])
    lengths = cache.lengths + live.astype(jnp.int32)
    return logits, LayerKV(k=tuple(k_out), v=tuple(v_out), lengths=lengths)
