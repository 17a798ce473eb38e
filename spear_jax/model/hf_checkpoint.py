"""Load and save Hugging Face checkpoint directories (config.json + safetensors).

Loading places each tensor directly into its sharded layout: one tensor at a time is read from
disk (memory-mapped), converted to this model's layout on the host and ``jax.device_put`` to its
``NamedSharding``, so host memory holds at most one tensor's worth of extra data. A layer's tensor
is written into its slice of the stacked [num_layers, ...] parameter on the device (in place).
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from spear_jax.model.config import ModelConfig
from spear_jax.model.hf_config import from_hf_config, to_hf_config
from spear_jax.model.transformer import init_model
from spear_jax.model.weight_layout import tensor_specs
from spear_jax.sharding import state_shardings

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(directory: str, **overrides) -> ModelConfig:
    """The ModelConfig of ``directory/config.json``; errors name that file."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {directory!r}")
    with open(path) as f:
        return from_hf_config(json.load(f), source=path, **overrides)


def _safetensors_files(directory: str) -> list[str]:
    index_path = os.path.join(directory, _INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(directory, n) for n in names]
    elif os.path.isfile(os.path.join(directory, _SINGLE_FILE)):
        files = [os.path.join(directory, _SINGLE_FILE)]
    else:
        raise FileNotFoundError(
            f"no {_SINGLE_FILE} or {_INDEX_FILE} in checkpoint directory {directory!r}"
        )
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint shard {path!r} listed in {_INDEX_FILE} is missing")
    return files


def iter_safetensors(directory: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """(name, array, file) for every tensor of the checkpoint, one at a time."""
    for path in _safetensors_files(directory):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name), path


def _shape_error(cfg: ModelConfig, name: str, shape, expected, file: str) -> ValueError:
    dims = (f"hidden_size={cfg.hidden_size}, num_attention_heads={cfg.num_heads}, "
            f"num_key_value_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, "
            f"intermediate_size={cfg.intermediate_size}, vocab_size={cfg.vocab_size}")
    return ValueError(
        f"shape mismatch for tensor {name!r} in {file}: got {tuple(shape)}, the config ({dims}) "
        f"implies {tuple(expected)}; the config and the weights disagree: fix the config or use "
        f"the weights it describes"
    )


def _slice_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer's slice of a stacked parameter laid out with ``sharding``."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, value: jax.Array, layer: jax.Array) -> jax.Array:
    """stacked [num_layers, ...] with slice ``layer`` replaced by value [...] (in place)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), layer, 0)


def _place(placed: dict, spec, value: np.ndarray, variable, sharding) -> None:
    """Puts ``value`` (model layout) at ``spec.path`` of ``placed``: the whole array, or slice
    ``spec.layer`` of the stacked parameter (created as zeros on first use)."""
    if spec.layer is None:
        placed[spec.path] = jax.device_put(value, sharding)
        return
    if spec.path not in placed:
        placed[spec.path] = jax.jit(lambda: jnp.zeros(variable.shape, variable.dtype), out_shardings=sharding)()
    value = jax.device_put(value, _slice_sharding(sharding))
    placed[spec.path] = _set_layer(placed[spec.path], value, jnp.int32(spec.layer))


def place_tensors(
    cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray, str]], mesh: Mesh | None = None,
    source: str = "checkpoint",
) -> tuple[nnx.GraphDef, nnx.State]:
    """Build (graphdef, state) of ``cfg``'s model from HF-named tensors in HF layout, given as
    (name, array, file they came from), each checked against the shape ``cfg`` implies, converted
    and placed on ``mesh`` (or the default device) as it arrives. ``source`` names the checkpoint
    in the missing-tensor error."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    if mesh is None:
        device = jax.devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
    else:
        shardings = state_shardings(abstract, cfg.sharding_rules, mesh)
    flat_abstract = dict(nnx.to_flat_state(abstract))
    flat_shardings = dict(nnx.to_flat_state(shardings))
    specs = {spec.hf_name: spec for spec in tensor_specs(cfg)}
    placed, seen = {}, set()
    for name, array, file in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        if name not in specs:
            raise ValueError(f"unexpected tensor {name!r} in {file} for a {cfg.architecture} model")
        spec = specs[name]
        if array.shape != spec.hf_shape:
            raise _shape_error(cfg, name, array.shape, spec.hf_shape, file)
        variable = flat_abstract[spec.path]
        value = np.asarray(spec.to_model(array), dtype=variable.dtype)
        _place(placed, spec, value, variable, flat_shardings[spec.path].get_value())
        seen.add(name)
        del array, value
    missing = [name for name in specs if name not in seen]
    if missing:
        raise ValueError(f"tensors missing from {source}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return graphdef, nnx.from_flat_state({path: flat_abstract[path].replace(value) for path, value in placed.items()})


def load_hf_checkpoint(
    directory: str, mesh: Mesh | None = None, **config_overrides
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """(cfg, graphdef, state) from a HF checkpoint directory; ``config_overrides`` adjust the
    ModelConfig read from config.json (e.g. ``compute_dtype="bfloat16"``)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    cfg = read_hf_config(directory, **config_overrides)
    graphdef, state = place_tensors(cfg, iter_safetensors(directory), mesh, source=directory)
    return cfg, graphdef, state


EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


@jax.jit
def _layer_of(stacked: jax.Array, layer: jax.Array) -> jax.Array:
    """Slice ``layer`` of stacked [num_layers, ...] (one compile per shape, not per layer)."""
    return jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False)


def _shard_tensors(
    cfg: ModelConfig, state: nnx.State, dtype: np.dtype, max_shard_bytes: int
) -> list[dict[str, np.ndarray]]:
    """HF-named tensors of ``state`` in HF layout, cast to ``dtype`` and grouped in file order
    into shards: a tensor starts a new shard when it would take a non-empty shard past
    ``max_shard_bytes`` (transformers' ``max_shard_size`` rule; a tensor larger than the limit
    gets a shard of its own)."""
    flat = dict(nnx.to_flat_state(state))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for spec in tensor_specs(cfg):
        if spec.path not in flat:
            raise ValueError(f"state has no parameter {'.'.join(map(str, spec.path))}")
        value = flat[spec.path].get_value()
        if spec.layer is not None:
            value = _layer_of(value, jnp.int32(spec.layer))
        value = np.asarray(jax.device_get(value), np.float32)
        array = np.ascontiguousarray(spec.to_hf(value).astype(dtype))
        if size and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][spec.hf_name] = array
        size += array.nbytes
    return shards


def _remove_weight_files(directory: str) -> None:
    """Removes the weight files of an earlier save into ``directory``, so none is left over."""
    for name in os.listdir(directory):
        if name in (_INDEX_FILE, _SINGLE_FILE) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name):
            os.remove(os.path.join(directory, name))


def save_hf_checkpoint(
    cfg: ModelConfig, state: nnx.State, directory: str, max_shard_bytes: int = 4 << 30,
    dtype: str = "float32",
) -> list[str]:
    """Write config.json and safetensors in ``dtype`` (``float32`` | ``bfloat16``, rounded to
    nearest even), loadable by ``transformers`` and by ``load_hf_checkpoint``.

    One ``model.safetensors`` when everything fits in ``max_shard_bytes``; otherwise
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` (total size
    and the file of every tensor). Returns the weight files written.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not supported; choose one of {sorted(EXPORT_DTYPES)}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    os.makedirs(directory, exist_ok=True)
    shards = _shard_tensors(cfg, state, EXPORT_DTYPES[dtype], max_shard_bytes)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg, dtype), f, indent=2)
    _remove_weight_files(directory)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, _SINGLE_FILE), metadata={"format": "pt"})
        return [_SINGLE_FILE]
    weight_map, names = {}, []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
    total = sum(a.nbytes for shard in shards for a in shard.values())
    with open(os.path.join(directory, _INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
