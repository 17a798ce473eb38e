"""LoRA over a split model state: adding adapters, the trainable subset, merging for decode/export.

A LoRA model (``ModelConfig.lora_rank > 0``) is the base transformer whose adapted projections
(``ModelConfig.lora_targets``) each carry a ``layers.LowRankAdapter``: ``<target>_lora.a``
[*in, rank] and ``<target>_lora.b`` [rank, *out], both ``nnx.LoRAParam``, stacked over the
layers like the weights they adapt (a [num_layers, *in, rank], b [num_layers, rank, *out]). Its state is the base
state plus those leaves, so every function over params pytrees (the forward, log-probs, the
reference copy, checkpoints) takes it unchanged; only the optimizer and the gradient see the
adapters alone (``split_trainable``). Merging folds each adapter into its weight,

    W'_i = W_i + (alpha / rank) A_i . B_i        (layer i; W' [num_layers, *in, *out], W's layout)

and returns the base model's state (no adapter leaves), which the sampler decodes with and the
Hugging Face writer exports.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spear_jax.model.config import ModelConfig
from spear_jax.model.transformer import init_model
from spear_jax.sharding import state_shardings

_ADAPTER_SUFFIX = "_lora"


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The architecture without adapters (what ``merge_lora``'s result fits)."""
    return cfg.replace(lora_rank=0, lora_targets=())


def has_adapters(params: nnx.State) -> bool:
    """Whether ``params`` holds any ``nnx.LoRAParam`` leaf."""
    adapters, _ = nnx.split_state(params, nnx.LoRAParam, ...)
    return bool(jax.tree.leaves(adapters))


def split_trainable(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen): the adapters and the rest for a LoRA state, else (params, empty)."""
    if has_adapters(params):
        return nnx.split_state(params, nnx.LoRAParam, ...)
    return params, nnx.State({})


def trainable_params(params: nnx.State) -> nnx.State:
    """The leaves the optimizer updates (and holds state for): see ``split_trainable``."""
    return split_trainable(params)[0]


def combine(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
    """Inverse of ``split_trainable``. The result's variables are new objects of the current
    trace (``nnx.remat`` refuses variables created under an outer trace, e.g. the frozen part
    of a state differentiated w.r.t. its adapters only)."""
    if not jax.tree.leaves(frozen):
        return trainable
    return jax.tree.map(lambda leaf: leaf, nnx.merge_state(trainable, frozen))


def base_graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The graphdef of the base architecture of ``cfg`` (built abstractly, no weights)."""
    return nnx.split(nnx.eval_shape(lambda: init_model(base_config(cfg))))[0]


def merge_lora(params: nnx.State, cfg: ModelConfig) -> nnx.State:
    """The base model's state with every adapter folded in: W'_i = W_i + (alpha / rank) A_i . B_i,
    computed in float32 and stored in W's dtype, W's layout (so HF export transposes it like
    any base weight). Adapter leaves are dropped; a state without adapters is returned as is.
    Pure: jit it for sharded states."""
    if not has_adapters(params):
        return params
    flat = dict(nnx.to_flat_state(params))
    merged = {path: variable for path, variable in flat.items() if not _in_adapter(path)}
    for path, a in flat.items():
        if _in_adapter(path) and path[-1] == "a":
            weight_path = path[:-2] + (path[-2][: -len(_ADAPTER_SUFFIX)] + "_proj",)
            weight = merged[weight_path]
            delta = _stacked_product(a[...], flat[path[:-1] + ("b",)][...])
            value = weight[...].astype(jnp.float32) + cfg.lora_scale * delta
            merged[weight_path] = weight.replace(value.astype(weight.dtype))
    return nnx.from_flat_state(list(merged.items()))


def _stacked_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [num_layers, *in, rank], b [num_layers, rank, *out] -> A_i . B_i [num_layers, *in, *out],
    float32."""
    return jax.vmap(lambda a_i, b_i: jnp.tensordot(a_i, b_i, axes=1))(a.astype(jnp.float32),
                                                                       b.astype(jnp.float32))


def _in_adapter(path: tuple) -> bool:
    """Whether a flat-state path is a leaf of a ``<target>_lora`` adapter."""
    return len(path) >= 2 and isinstance(path[-2], str) and path[-2].endswith(_ADAPTER_SUFFIX)


def add_adapters(cfg: ModelConfig, params: nnx.State, *, rank: int, alpha: float,
                 targets: tuple[str, ...], mesh=None, seed: int = 0
                 ) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """(LoRA config, its graphdef, ``params`` plus fresh adapters) for a base state ``params``
    of ``cfg``. Adapters are created directly in their layout on ``mesh`` (when given):
    A ~ N(0, 1 / fan_in), B = 0, so the adapted model starts equal to the base."""
    lora_cfg = cfg.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(lora_cfg, seed)))

    def make_adapters():
        return nnx.split_state(nnx.split(init_model(lora_cfg, seed))[1], nnx.LoRAParam, ...)[0]

    if mesh is None:
        adapters = jax.jit(make_adapters)()
    else:
        abstract_adapters = nnx.split_state(abstract, nnx.LoRAParam, ...)[0]
        shardings = state_shardings(abstract_adapters, lora_cfg.sharding_rules, mesh)
        adapters = jax.jit(make_adapters, out_shardings=shardings)()
    return lora_cfg, graphdef, nnx.merge_state(params, adapters)
