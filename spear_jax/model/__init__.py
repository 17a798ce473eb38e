"""Sharded Flax NNX decoder LLM (Llama / Qwen2 / Qwen3), KV cache, loaders and tokenizers.

See docs/model.md for the API contract.
"""
from spear_jax.model.config import PRESETS, ModelConfig, RopeScaling, get_model_config
from spear_jax.model.hf_config import from_hf_config, to_hf_config
from spear_jax.model.kv_cache import KVCache, init_cache
from spear_jax.model.transformer import (
    Transformer,
    forward,
    forward_last,
    init_model,
    init_sharded,
)

__all__ = [
    "PRESETS", "ModelConfig", "RopeScaling", "from_hf_config", "get_model_config", "to_hf_config",
    "KVCache", "init_cache", "Transformer", "forward", "forward_last", "init_model", "init_sharded",
]
