"""Correspondence between this model's parameters and Hugging Face tensor names and layouts.

HF stores linear weights as [out, in]; this model stores [in, out] with attention heads split
out: q_proj [D, H, hd], k/v_proj [D, KVH, hd], o_proj [H, hd, D], q/k/v biases [heads, hd].
The blocks' parameters are stacked over the layers: HF's ``model.layers.{i}.<name>`` is slice
``i`` of the leading [num_layers] axis of the parameter at ``("blocks", ...)``. Checkpoints of
the earlier layout (one ``("blocks", i, ...)`` entry per layer) convert with ``unstacked_blocks``
(the restore target) and ``stacked_blocks``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spear_jax.model.config import ModelConfig

ParamPath = tuple  # e.g. ("blocks", "attention", "q_proj"), as in nnx.to_flat_state


class TensorSpec(NamedTuple):
    hf_name: str
    path: ParamPath
    to_model: Callable[[np.ndarray], np.ndarray]  # HF layout -> model layout
    to_hf: Callable[[np.ndarray], np.ndarray]  # model layout -> HF layout
    hf_shape: tuple[int, ...]  # the tensor's shape in HF layout, as the config implies it
    layer: int | None = None  # the slice of the stacked parameter at ``path`` (None: not stacked)


def _identity(x):
    return x


def _transpose(x):
    return np.ascontiguousarray(x.T)


def _in_heads(heads: int, head_dim: int):
    """[heads * hd, D] <-> [D, heads, hd]."""
    to_model = lambda w: np.ascontiguousarray(w.T).reshape(w.shape[1], heads, head_dim)
    to_hf = lambda w: np.ascontiguousarray(w.reshape(w.shape[0], heads * head_dim).T)
    return to_model, to_hf


def _out_heads(heads: int, head_dim: int):
    """[D, heads * hd] <-> [heads, hd, D]."""
    to_model = lambda w: np.ascontiguousarray(w.T).reshape(heads, head_dim, w.shape[0])
    to_hf = lambda w: np.ascontiguousarray(w.reshape(heads * head_dim, w.shape[-1]).T)
    return to_model, to_hf


def _bias(heads: int, head_dim: int):
    return (lambda b: b.reshape(heads, head_dim)), (lambda b: b.reshape(heads * head_dim))


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every parameter of ``cfg``'s model with its HF name, layout conversions and HF shape."""
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    specs = [
        TensorSpec("model.embed_tokens.weight", ("embed",), _identity, _identity, (v, d)),
        TensorSpec("model.norm.weight", ("final_norm", "weight"), _identity, _identity, (d,)),
    ]
    if not cfg.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head",), _transpose, _transpose, (v, d)))
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}."
        attn = ("blocks", "attention")
        layer = [
            (hf + "input_layernorm.weight", ("blocks", "input_norm", "weight"), _identity, _identity, (d,)),
            (hf + "post_attention_layernorm.weight", ("blocks", "post_attention_norm", "weight"),
             _identity, _identity, (d,)),
            (hf + "self_attn.q_proj.weight", attn + ("q_proj",), *_in_heads(h, hd), (h * hd, d)),
            (hf + "self_attn.k_proj.weight", attn + ("k_proj",), *_in_heads(kv, hd), (kv * hd, d)),
            (hf + "self_attn.v_proj.weight", attn + ("v_proj",), *_in_heads(kv, hd), (kv * hd, d)),
            (hf + "self_attn.o_proj.weight", attn + ("o_proj",), *_out_heads(h, hd), (d, h * hd)),
            (hf + "mlp.gate_proj.weight", ("blocks", "mlp", "gate_proj"), _transpose, _transpose, (f, d)),
            (hf + "mlp.up_proj.weight", ("blocks", "mlp", "up_proj"), _transpose, _transpose, (f, d)),
            (hf + "mlp.down_proj.weight", ("blocks", "mlp", "down_proj"), _transpose, _transpose, (d, f)),
        ]
        if cfg.qkv_bias:
            layer += [
                (hf + "self_attn.q_proj.bias", attn + ("q_bias",), *_bias(h, hd), (h * hd,)),
                (hf + "self_attn.k_proj.bias", attn + ("k_bias",), *_bias(kv, hd), (kv * hd,)),
                (hf + "self_attn.v_proj.bias", attn + ("v_bias",), *_bias(kv, hd), (kv * hd,)),
            ]
        if cfg.qk_norm:
            layer += [
                (hf + "self_attn.q_norm.weight", attn + ("q_norm", "weight"), _identity, _identity, (hd,)),
                (hf + "self_attn.k_norm.weight", attn + ("k_norm", "weight"), _identity, _identity, (hd,)),
            ]
        specs += [TensorSpec(*entry, layer=i) for entry in layer]
    return specs


def _layer_slice(x, layer: int):
    """Slice ``layer`` of a stacked leaf: an array, or a ``jax.ShapeDtypeStruct`` (restore target)
    whose sharding loses its leading (unsharded "layers") dimension."""
    if not isinstance(x, jax.ShapeDtypeStruct):
        return x[layer]
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def unstacked_blocks(params: nnx.State, num_layers: int) -> nnx.State:
    """``params`` in the layout of models that kept one block per layer: every leaf at
    ("blocks", *rest) [num_layers, ...] becomes ``num_layers`` leaves at ("blocks", i, *rest).
    Leaves may be arrays or ``jax.ShapeDtypeStruct`` (to restore such a checkpoint)."""
    flat = {}
    for path, variable in nnx.to_flat_state(params):
        if path[0] != "blocks":
            flat[path] = variable
            continue
        for i in range(num_layers):
            flat[("blocks", i) + path[1:]] = variable.replace(_layer_slice(variable.get_value(), i))
    return nnx.from_flat_state(flat)


def stacked_blocks(params: nnx.State, like: nnx.State) -> nnx.State:
    """Inverse of ``unstacked_blocks``: the ("blocks", i, *rest) leaves of ``params`` stacked
    into ("blocks", *rest), placed with the sharding of that leaf of ``like`` (arrays or
    ``jax.ShapeDtypeStruct`` of the stacked layout)."""
    flat = dict(nnx.to_flat_state(params))
    stacked = {}
    for path, variable in nnx.to_flat_state(like):
        if path[0] != "blocks":
            stacked[path] = flat[path]
            continue
        layers = sorted(p[1] for p in flat if p[0] == "blocks" and p[2:] == path[1:])
        slices = [flat[("blocks", i) + path[1:]].get_value() for i in layers]
        value = np.stack(slices) if isinstance(slices[0], np.ndarray) else jnp.stack(slices)
        sharding = getattr(variable.get_value(), "sharding", None)
        stacked[path] = variable.replace(value if sharding is None else jax.device_put(value, sharding))
    return nnx.from_flat_state(stacked)
