"""Transformer building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP,
LoRA adapters of the projections.

Every parameter is an ``nnx.Param`` stored in ``cfg.param_dtype`` and carrying logical axis names
in its ``out_sharding`` metadata (mapped to mesh axes by ``spear_jax.sharding``). Matmuls run in
``cfg.compute_dtype``; normalisation statistics, RoPE and the attention softmax run in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spear_jax.model.config import ModelConfig
from spear_jax.sharding import constrain

_INIT_STD = 0.02


def make_param(rngs: nnx.Rngs | None, shape, axes, cfg: ModelConfig, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, cfg.param_jnp_dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, cfg.param_jnp_dtype)
    else:
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape)).astype(cfg.param_jnp_dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, statistics in float32; output in the input's dtype."""

    def __init__(self, size: int, eps: float, cfg: ModelConfig, axis_name: str = "norm"):
        self.eps = eps
        self.weight = make_param(None, (size,), (axis_name,), cfg, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """x / sqrt(mean(x^2 over ``axis``) + eps) * weight, statistics in float32, in x's dtype;
    ``weight`` broadcasts against x (shape [size] for the last axis, [size, 1] for the one
    before it)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    return (normed.astype(x.dtype) * weight.astype(x.dtype)).astype(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """inv_freq_i = theta^(-2i / head_dim), i < head_dim / 2, with Llama-3 scaling if configured:
    wavelengths above original_ctx / low_freq_factor are divided by ``factor``, those below
    original_ctx / high_freq_factor are kept, and the band between is interpolated."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate halves: x [B, L, heads, head_dim], positions [B, L] -> same shape and dtype.

    With angles a = pos * inv_freq and x = (x1, x2) split in halves:
    (x1 cos a - x2 sin a, x2 cos a + x1 sin a).
    """
    angles = rope_angles(positions, inv_freq)                                     # [B, L, hd/2]
    return rotate_halves(x, jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :], axis=-1)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """a = pos * inv_freq in float32: positions [...] -> [..., hd/2]."""
    return positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)


def rotate_halves(x: jax.Array, cos: jax.Array, sin: jax.Array, axis: int) -> jax.Array:
    """(x1 cos - x2 sin, x2 cos + x1 sin) for x = (x1, x2) split in halves along ``axis``, in
    float32, returned in x's dtype; cos and sin broadcast against a half."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=axis)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis).astype(x.dtype)


class LowRankAdapter(nnx.Module):
    """LoRA adapter of one projection W [*in, *out]: the adapted projection is

        y = x . W + s (x . A) . B = x . (W + s A . B),    s = alpha / rank,

    with A [*in, rank] ~ N(0, 1 / prod(in)) and B [rank, *out] = 0 (the adapted model starts
    equal to the base). Both are ``nnx.LoRAParam`` (the trainable subset of a LoRA model's
    state), sharded along the axes they share with W, the rank axis replicated.
    """

    def __init__(self, in_shape: tuple[int, ...], in_axes: tuple[str, ...], out_shape: tuple[int, ...],
                 out_axes: tuple[str, ...], cfg: ModelConfig, *, rngs: nnx.Rngs):
        rank = cfg.lora_rank
        a = jax.random.normal(rngs.params(), in_shape + (rank,)) / np.sqrt(np.prod(in_shape))
        self.a = nnx.LoRAParam(a.astype(cfg.param_jnp_dtype), out_sharding=tuple(in_axes) + (None,),
                               eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((rank,) + out_shape, cfg.param_jnp_dtype),
                               out_sharding=(None,) + tuple(out_axes), eager_sharding=False)
        self.scale = cfg.lora_scale
        self.num_in = len(in_shape)

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        """x [..., *in] -> s (x . A) . B [..., *out] in ``dtype``."""
        low = jnp.tensordot(x.astype(dtype), self.a[...].astype(dtype), axes=self.num_in)
        return jnp.tensordot(low, self.b[...].astype(dtype), axes=1) * jnp.asarray(self.scale, dtype)


def _adapters(module: nnx.Module, cfg: ModelConfig, shapes: dict, rngs: nnx.Rngs) -> None:
    """Sets ``module.<target>_lora`` for each adapted target; ``shapes`` maps a target to
    (in shape, in axes, out shape, out axes) of its projection."""
    for target, (in_shape, in_axes, out_shape, out_axes) in shapes.items():
        if cfg.adapts(target):
            adapter = LowRankAdapter(in_shape, in_axes, out_shape, out_axes, cfg, rngs=rngs)
            setattr(module, f"{target}_lora", adapter)


def _adapted(module: nnx.Module, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """y = x . W_target, plus the target's adapter output on x when it has one."""
    if not module.cfg.adapts(target):
        return y
    return y + getattr(module, f"{target}_lora")(x, y.dtype)


def project(spec: str, x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """jnp.einsum(spec, x, w) with x's batch and length axes [B, L] merged into the one token
    axis ``n`` of ``spec`` (e.g. "nd,dhk->nhk": x [B, L, D], w [D, H, K] -> [B, L, H, K]).

    With one token axis the weight gradient contracts the output's gradient where it lies; with
    [B, L] kept apart XLA:CPU first writes a transposed copy of it (as large as the activation)."""
    out = jnp.einsum(spec, x.reshape(-1, *x.shape[2:]), w, preferred_element_type=preferred_element_type)
    return out.reshape(*x.shape[:2], *out.shape[1:])


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = make_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
        self.k_proj = make_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.v_proj = make_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.o_proj = make_param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg)
        if cfg.qkv_bias:
            self.q_bias = make_param(rngs, (h, hd), ("heads", "head_dim"), cfg, init="zeros")
            self.k_bias = make_param(rngs, (kv, hd), ("kv_heads", "head_dim"), cfg, init="zeros")
            self.v_bias = make_param(rngs, (kv, hd), ("kv_heads", "head_dim"), cfg, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg, axis_name="head_dim")
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg, axis_name="head_dim")
        _adapters(self, cfg, {
            "q": ((d,), ("embed",), (h, hd), ("heads", "head_dim")),
            "k": ((d,), ("embed",), (kv, hd), ("kv_heads", "head_dim")),
            "v": ((d,), ("embed",), (kv, hd), ("kv_heads", "head_dim")),
            "o": ((h, hd), ("heads", "head_dim"), (d,), ("embed",)),
        }, rngs)

    def project_qkv(self, x: jax.Array, positions: jax.Array):
        """x [B, L, D], positions [B, L] -> q [B, L, H, hd], k, v [B, L, KVH, hd] (RoPE applied)."""
        cd = self.cfg.compute_jnp_dtype
        x = x.astype(cd)
        q = _adapted(self, "q", x, project("nd,dhk->nhk", x, self.q_proj[...].astype(cd)))
        k = _adapted(self, "k", x, project("nd,dhk->nhk", x, self.k_proj[...].astype(cd)))
        v = _adapted(self, "v", x, project("nd,dhk->nhk", x, self.v_proj[...].astype(cd)))
        if self.cfg.qkv_bias:
            q = q + self.q_bias[...].astype(cd)
            k = k + self.k_bias[...].astype(cd)
            v = v + self.v_bias[...].astype(cd)
        if self.cfg.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        rules = self.cfg.sharding_rules
        inv_freq = rope_inverse_frequencies(self.cfg)
        q = constrain(apply_rope(q, positions, inv_freq), ("act_batch", "act_length", "act_heads", None), rules)
        k = constrain(apply_rope(k, positions, inv_freq), ("act_batch", "act_length", "act_kv_heads", None), rules)
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None), rules)
        return q, k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, causal: bool = False) -> jax.Array:
        """softmax(q k^T / sqrt(hd) masked) v, projected out.

        q [B, L, H, hd]; k, v [B, S, KVH, hd]; mask [B, L, S] bool (True = may attend)
        -> [B, L, D] in compute dtype. Queries are processed ``cfg.attention_query_chunk`` at a
        time (rematerialised in the backward), so scores take [B, H, chunk, S], not [B, H, L, S].
        Otherwise, with ``causal`` (the keys are the queries' own slots and a valid query never
        attends a later slot), ``causal_attention`` skips the score blocks above the diagonal.
        """
        cd = self.cfg.compute_jnp_dtype
        b, l, h, hd = q.shape
        chunk = self.cfg.attention_query_chunk
        k, v = k.astype(cd), v.astype(cd)
        if chunk <= 0 or l <= chunk:
            out = causal_attention(q, k, v, mask) if causal else grouped_attention(q, k, v, mask)
        else:
            pad = (-l) % chunk
            q_chunks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, chunk, h, hd)
            mask_chunks = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, mask.shape[-1])
            one = jax.checkpoint(lambda qm: grouped_attention(qm[0], k, v, qm[1]))
            out = jax.lax.map(one, (q_chunks.swapaxes(0, 1), mask_chunks.swapaxes(0, 1)))
            out = out.swapaxes(0, 1).reshape(b, l + pad, h, hd)[:, :l]
        out = _adapted(self, "o", out, project("nhk,hkd->nd", out, self.o_proj[...].astype(cd)))
        return constrain(out, ("act_batch", "act_length", "act_embed"), self.cfg.sharding_rules)


CAUSAL_QUERY_BLOCKS = 4  # query blocks of causal_attention
CAUSAL_MIN_BLOCK = 64  # fewer blocks when a block would hold fewer queries


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """``grouped_attention`` over the keys a causal mask can let through: the queries are split
    into up to ``CAUSAL_QUERY_BLOCKS`` blocks [i0, i1) of at least ``CAUSAL_MIN_BLOCK`` and each
    block attends keys [0, i1) only, skipping ~(n - 1) / 2n of the score work for n blocks.

    q [B, L, H, hd]; k, v [B, L, KVH, hd] (the same slots as the queries); mask [B, L, L].
    Exact for every query whose mask is False beyond its own slot (every valid token of a forward
    without cache: a later slot holds a later position or padding). A padding query may see a
    later valid key in ``mask``; it gets another meaningless, finite output."""
    length = q.shape[1]
    blocks = max(1, min(CAUSAL_QUERY_BLOCKS, length // CAUSAL_MIN_BLOCK))
    size = -(-length // blocks)
    outs = [grouped_attention(q[:, i:i + size], k[:, :i + size], v[:, :i + size], mask[:, i:i + size, :i + size])
            for i in range(0, length, size)]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, L, H, hd]; k, v [B, S, KVH, hd] (H a multiple of KVH); mask [B, L, S]
    -> [B, L, H, hd]. Scores and softmax in float32; a fully masked row gives a uniform average.

    Each KV head's G = H / KVH query heads are laid out as one [G * L, hd] matrix (q is
    transposed to [B, KVH, G * L, hd], k and v to [B, KVH, S, hd]), so both products are plain
    batched matmuls and the [B, KVH, G * L, S] scores, the largest arrays, are never transposed
    (in the forward or the backward); only the small q, k, v and output arrays are."""
    b, l, h, hd = q.shape
    kvh, s = k.shape[2], k.shape[1]
    g = h // kvh
    q = q * jnp.asarray(1.0 / np.sqrt(hd), q.dtype)  # 1 / sqrt(hd) on q: S / hd times fewer values than on the scores
    q = q.reshape(b, l, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * l, hd)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    group_mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, l, s)).reshape(b, 1, g * l, s)
    scores = jnp.where(group_mask, scores, jnp.finfo(jnp.float32).min)
    probs = _softmax(scores).astype(q.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)  # [B, KVH, G * L, hd]
    return out.reshape(b, kvh, g, l, hd).transpose(0, 3, 1, 2, 4).reshape(b, l, h, hd)


@jax.custom_vjp
def _softmax(scores: jax.Array) -> jax.Array:
    """softmax over the last axis as exp(s - max) times the reciprocal of its sum: one division
    per row instead of one per score (XLA:CPU's divide is several times slower than a multiply).

    Its gradient is the softmax's own, d scores = p * (g - sum(g * p)) for p the output and g its
    cotangent (``_softmax_backward``), so the backward keeps p alone. Differentiating the
    expression instead kept the reciprocal broadcast to the scores' shape, an extra array of
    that size written in the forward and read in the backward (tiny train step 2-5% slower)."""
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def _softmax_forward(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    probs = _softmax(scores)
    return probs, probs


def _softmax_backward(probs: jax.Array, cotangent: jax.Array) -> tuple[jax.Array]:
    return (probs * (cotangent - jnp.sum(cotangent * probs, axis=-1, keepdims=True)),)


_softmax.defvjp(_softmax_forward, _softmax_backward)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x W_gate) * (x W_up)).

    On sequences x W_gate and x W_up are two products over one token axis (``project``): stacked
    to one [D, 2, F] product, the weight gradient's two output axes made XLA:CPU transpose the
    [B * L, 2, F] gradient first. A decode step (one position per row, no gradient) keeps the one
    stacked product it ran before: two products were not measured faster there (stacking on a
    new axis keeps each weight's "mlp" sharding in place)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = make_param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.up_proj = make_param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.down_proj = make_param(rngs, (f, d), ("mlp", "embed"), cfg)
        _adapters(self, cfg, {
            "gate": ((d,), ("embed",), (f,), ("mlp",)),
            "up": ((d,), ("embed",), (f,), ("mlp",)),
            "down": ((f,), ("mlp",), (d,), ("embed",)),
        }, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        cd = self.cfg.compute_jnp_dtype
        x = x.astype(cd)
        if x.shape[1] == 1:  # a decode step
            gate_up = project("nd,dtf->ntf", x, jnp.stack([self.gate_proj[...], self.up_proj[...]], axis=1).astype(cd))
            gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
        else:
            gate = project("nd,df->nf", x, self.gate_proj[...].astype(cd))
            up = project("nd,df->nf", x, self.up_proj[...].astype(cd))
        gate, up = _adapted(self, "gate", x, gate), _adapted(self, "up", x, up)
        hidden = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"), self.cfg.sharding_rules)
        out = _adapted(self, "down", hidden, project("nf,fd->nd", hidden, self.down_proj[...].astype(cd)))
        return constrain(out, ("act_batch", "act_length", "act_embed"), self.cfg.sharding_rules)


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.attention = Attention(cfg, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.mlp = MLP(cfg, rngs=rngs)
