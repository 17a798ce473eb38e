"""Export a run's checkpoint as a Hugging Face model directory (transformers, vLLM).

    python -m spear_jax.export --workdir=runs/spear_twx --out=exports/spear_twx \\
        [--step=N] [--dtype=bfloat16] [--max_shard_size=5GB] [--config=RUN_CONFIG.json]

Writes into ``--out``:

* ``config.json`` and the weights as safetensors in ``--dtype`` (``float32`` default, or
  ``bfloat16``): one ``model.safetensors``, or shards of at most ``--max_shard_size`` with
  ``model.safetensors.index.json`` past it (transformers' ``max_shard_size`` rule);
* ``generation_config.json``: BOS / EOS / PAD ids from the run's tokenizer and chat format (EOS
  lists the chat format's stop token first), and the sampling defaults of the run's held-out
  evaluation (``rollout.eval_temperature``, ``rollout.eval_top_p``, ``rollout.top_k``; greedy
  when the temperature is 0) with ``max_new_tokens = rollout.max_response_length``;
* the tokenizer files with the chat template (``spear_jax.model.hf_tokenizer_files``).

The checkpoint is ``<workdir>/checkpoints`` (an RL run or a warm start written by
``configs/sft.py``; a run's ``<workdir>/warm_start`` is a workdir too), step ``--step`` or the
newest. The architecture and tokenizer come from the run config: ``--config`` when given, else
the config the checkpoint records (RL checkpoints do), else ``<workdir>/config.json`` (written by
``spear_jax.main``), else the parent run's ``config.json`` for a ``warm_start`` directory.
"""
from __future__ import annotations

import json
import os
import re

import ml_collections
from absl import app, flags
from flax import nnx

from spear_jax.checkpoint import RunCheckpointer
from spear_jax.metrics import RUN_CONFIG_FILE
from spear_jax.model.chat_template import ChatTemplate
from spear_jax.model.hf_checkpoint import EXPORT_DTYPES, save_hf_checkpoint
from spear_jax.model.hf_tokenizer_files import write_tokenizer_files
from spear_jax.model.tokenizer import Tokenizer
from spear_jax.model import ModelConfig, lora
from spear_jax.policy import (CHECKPOINT_SUBDIR, abstract_params, load_tokenizer_of, model_config_of,
                              with_run_adapters)

WARM_START_DIR = "warm_start"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``"5GB"`` (powers of 10), ``"4GiB"`` (powers of 2) or ``"1000"``,
    read as transformers reads ``max_shard_size``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"--max_shard_size={text!r} is not a size; write e.g. 5GB, 500MB or 4GiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"--max_shard_size={text!r} must be positive")
    return size


def read_run_config(workdir: str, config_path: str = "", saved: dict | None = None) -> ml_collections.ConfigDict:
    """The run config of ``workdir``: ``config_path`` when given, else ``saved`` (the config a
    checkpoint records), else ``workdir/config.json``, else (for a ``warm_start`` directory) its
    parent run's ``config.json``."""
    if not config_path and isinstance(saved, dict):
        return ml_collections.ConfigDict(saved)
    candidates = [config_path] if config_path else [os.path.join(workdir, RUN_CONFIG_FILE)]
    if not config_path and os.path.basename(os.path.normpath(workdir)) == WARM_START_DIR:
        candidates.append(os.path.join(os.path.dirname(os.path.normpath(workdir)), RUN_CONFIG_FILE))
    for path in candidates:
        if os.path.isfile(path):
            with open(path) as handle:
                return ml_collections.ConfigDict(json.load(handle))
    raise FileNotFoundError(
        f"no run config for {workdir!r}: the checkpoint records none and there is no {candidates}; "
        f"pass --config=<the run's config.json>")


def merged_params(device_state: dict, trained: ModelConfig) -> nnx.State:
    """The full model weights of a restored checkpoint's ``device`` part: its ``params``, with the
    LoRA adapters of a ``trained`` config that has them folded in (W + alpha / rank A.B), so the
    export holds the adapted model in the base architecture."""
    return lora.merge_lora(device_state["params"], trained)


def _chosen_step(checkpointer: RunCheckpointer, step: int | None) -> int:
    """``step``, or the newest complete step; errors name ``--step`` and the available steps."""
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {checkpointer.directory}: export needs a "
                                f"run that saved one")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"--step={step}: no complete checkpoint for that step in "
                                f"{checkpointer.directory}; available: {steps}")
    return steps[-1] if step is None else step


def restore_run(workdir: str, step: int | None, config_path: str = "") -> tuple[int, ml_collections.ConfigDict, dict]:
    """(step, run config, restored ``device`` part holding ``params`` on the host CPU) of the
    checkpoint of ``workdir`` at ``step`` (default: the newest); the optimizer state and host
    parts are not read. The params are those of the run's model, LoRA adapters included."""
    checkpoint_dir = os.path.join(workdir, CHECKPOINT_SUBDIR)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"--workdir={workdir!r} has no {CHECKPOINT_SUBDIR}/ directory: not a run workdir")
    checkpointer = RunCheckpointer(checkpoint_dir)
    try:
        step = _chosen_step(checkpointer, step)
        c = read_run_config(workdir, config_path, checkpointer.read_meta(step).get("config"))
        _, target = abstract_params(with_run_adapters(model_config_of(c), c), mesh=None)
        return step, c, checkpointer.restore({"params": target}, step=step, partial=True).device
    finally:
        checkpointer.close()


def generation_config(c: ml_collections.ConfigDict, tokenizer: Tokenizer, eos_ids: list[int]) -> dict:
    """``generation_config.json`` of run config ``c`` (see the module docstring)."""
    temperature = float(c.rollout.eval_temperature)
    config = {"eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
              "pad_token_id": tokenizer.pad_id, "do_sample": temperature > 0.0,
              "max_new_tokens": int(c.rollout.max_response_length)}
    if tokenizer.bos_id is not None:
        config["bos_token_id"] = tokenizer.bos_id
    if temperature > 0.0:
        config.update(temperature=temperature, top_p=float(c.rollout.eval_top_p), top_k=int(c.rollout.top_k))
    return config


def export_run(workdir: str, out: str, step: int | None = None, dtype: str = "float32",
               max_shard_bytes: int = 5 * 10**9, config_path: str = "") -> dict:
    """Writes the Hugging Face directory of ``workdir``'s checkpoint into ``out`` (module
    docstring); returns a summary (step, files)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not supported; choose one of {sorted(EXPORT_DTYPES)}")
    step, c, device_state = restore_run(workdir, step, config_path)
    model_config = model_config_of(c)
    tokenizer = load_tokenizer_of(c)
    chat = ChatTemplate(tokenizer, c.model.chat_format)
    params = merged_params(device_state, with_run_adapters(model_config, c))
    files = save_hf_checkpoint(model_config, params, out, max_shard_bytes, dtype)
    eos_ids = list(dict.fromkeys([chat.stop_id, tokenizer.eos_id]))
    with open(os.path.join(out, "generation_config.json"), "w") as handle:
        json.dump(generation_config(c, tokenizer, eos_ids), handle, indent=2)
    files += ["config.json", "generation_config.json"]
    files += write_tokenizer_files(tokenizer, c.model.chat_format, eos_ids[0], out,
                                   model_max_length=model_config.max_position_embeddings)
    return {"step": step, "out": out, "dtype": dtype, "files": sorted(files)}


def _define_flags() -> None:
    """The command line's flags (defined only when this module runs as the program, so importing
    it next to ``spear_jax.main`` defines no flag twice)."""
    flags.DEFINE_string("workdir", None, "Run directory whose checkpoint is exported.")
    flags.DEFINE_string("out", None, "Directory the Hugging Face model is written to.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_enum("dtype", "float32", sorted(EXPORT_DTYPES), "Dtype of the saved weights.")
    flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file before sharding.")
    flags.DEFINE_string("config", "", "Run config JSON (default: <workdir>/config.json).")
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    summary = export_run(f.workdir, f.out, f.step, f.dtype, parse_size(f.max_shard_size), f.config)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
