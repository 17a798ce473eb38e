"""Which config changes a resumed run accepts.

Every checkpoint stores the run's full config (``config_record``). On resume the new config is
compared with it field by field (dotted paths such as ``actor.lr``). A change to any field outside
``RESUMABLE_FIELDS`` is refused with a ``ConfigError`` listing each differing field (old -> new),
because the restored state (params, optimizer moments, replay buffer, schedules, the PRNG streams
derived from ``seed``) belongs to the saved config: continuing it under another learning rate,
seed, method, model or environment would give a run that is neither the old one nor a new one.

The allowed fields change only when and how much the run saves, evaluates and logs, how long it
runs, or how the same computation is laid out on devices:

* ``trainer.total_steps``: extend or shorten the run. A ``cosine`` learning-rate schedule is
  rebuilt for the new length (the optimizer's step count is restored), so the remaining steps
  follow the new schedule.
* ``trainer.eval_every``, ``trainer.eval_before_train``, ``trainer.checkpoint_every``,
  ``trainer.max_checkpoints_to_keep``, ``trainer.log_every``, ``data.eval_episodes``: when and
  how much is evaluated, saved and logged. The evaluation protocol itself (split, temperature,
  top-p) is not allowed to change, so the eval curve keeps one meaning.
* ``mesh.*``, ``model.logprob_chunk_size``, ``rollout.decode_layers``: device layout, memory
  chunking and the decode program of the same computation (restore re-shards onto the new
  mesh); results agree up to float reordering.
* ``distributed.*``: how many processes drive the mesh and how they meet (every process
  compares its own rank with the record process 0 saved); a checkpoint holds global arrays and
  global rows, so any process count resumes it (docs/scaling.md).
* ``trainer.resume_step``: which step to resume from (``resume_step``; -1, the newest intact one).
* ``trainer.compilation_cache_dir``: where compiled programs are cached (``compile_cache``).

A field added to the config after a checkpoint was saved is compared with the value that run
implied (``IMPLIED_WHEN_ABSENT``: e.g. ``env.domain`` was ``"math"`` exactly for trajectory
rows), so older checkpoints resume under the behaviour they had.

``resume_step(config, checkpointer)`` picks the step: ``config.trainer.resume_step`` when it is
>= 0 (a complete step of the workdir, verified like any restore, without falling back to another
one; anything else is a ``ConfigError`` naming the field and the complete steps), else the newest
intact step.
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from spear_jax.checkpoint import RunCheckpointer, complete_steps
from spear_jax.run_config import ConfigError

RESUMABLE_FIELDS = (
    "trainer.total_steps", "trainer.eval_every", "trainer.eval_before_train",
    "trainer.checkpoint_every", "trainer.max_checkpoints_to_keep", "trainer.log_every",
    "data.eval_episodes", "mesh.data", "mesh.fsdp", "mesh.tensor", "model.logprob_chunk_size",
    "rollout.decode_layers", "trainer.resume_step", "trainer.compilation_cache_dir",
    "distributed.coordinator_address", "distributed.num_processes", "distributed.process_id",
    "distributed.initialization_timeout_s", "distributed.heartbeat_timeout_s",
    "distributed.gather_timeout_s", "distributed.shutdown_timeout_s",
)
_ABSENT = "<absent>"


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as a JSON-able nested dict (tuples become lists), as stored in checkpoints."""
    return json.loads(config.to_json_best_effort())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


# Fields added to the config after runs were already saved: the value a record without the
# field implied (the behaviour the run had), as a function of that record's flattened fields.
IMPLIED_WHEN_ABSENT = {
    "env.domain": lambda old: "math" if old.get("env.row_layout") == "trajectory" else "agent",
    "actor.loss_terms": lambda old: ["pg", "entropy", "kl"],
    "replay.loss_terms": lambda old: ["pg", "entropy"],
    "rollout.decode_layers": lambda old: "auto",
    "trainer.compilation_cache_dir": lambda old: "",
}


def _with_implied_fields(old: dict[str, Any]) -> dict[str, Any]:
    """A saved record's flat fields, with the implied value of each later-added field it lacks."""
    implied = {field: value(old) for field, value in IMPLIED_WHEN_ABSENT.items() if field not in old}
    return {**old, **implied}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted field, saved value, current value) for every leaf that differs or exists in only
    one of the two records (shown as ``<absent>``), sorted by field. A field added to the config
    since ``saved`` was written counts with the value the saved run implied
    (``IMPLIED_WHEN_ABSENT``), so an older checkpoint resumes under the behaviour it had."""
    old, new = _with_implied_fields(_flatten(saved)), _flatten(current)
    return [(field, old.get(field, _ABSENT), new.get(field, _ABSENT))
            for field in sorted(old.keys() | new.keys())
            if old.get(field, _ABSENT) != new.get(field, _ABSENT)]


def check_resumable(saved: dict[str, Any] | None, config: ml_collections.ConfigDict,
                    where: str) -> list[str]:
    """Raises ``ConfigError`` unless ``config`` may resume the checkpoint ``where`` saved with
    config record ``saved``; returns the allowed changes as ``"field: old -> new"`` lines."""
    if not isinstance(saved, dict):
        raise ConfigError(f"checkpoint {where} records no config, so resuming it with this one "
                          f"cannot be checked: start the run in a new --workdir")
    changes = config_differences(saved, config_record(config))
    refused = [(field, old, new) for field, old, new in changes if field not in RESUMABLE_FIELDS]
    if refused:
        lines = "\n".join(f"  config.{field}: {old!r} -> {new!r}" for field, old, new in refused)
        flags = " ".join(f"--config.{field}={json.dumps(old)}" for field, old, _ in refused if old != _ABSENT)
        hint = f" ({flags})" if flags else ""
        raise ConfigError(
            f"cannot resume {where}: the config differs from the one it was saved with in fields a "
            f"resumed run must keep:\n{lines}\nUse a new --workdir to start a run with these "
            f"values, or pass the saved values to resume{hint}. Fields that may change on resume: "
            f"{', '.join(RESUMABLE_FIELDS)}.")
    return [f"config.{field}: {old!r} -> {new!r}" for field, old, new in changes]


def check_resume_step(config: ml_collections.ConfigDict, checkpoint_dir: str) -> None:
    """Raises ``ConfigError`` when ``config.trainer.resume_step`` (>= 0) is not a complete step
    in ``checkpoint_dir`` (checked at start-up, before any weights load)."""
    wanted = config.trainer.resume_step
    if wanted < 0:
        return
    steps = complete_steps(checkpoint_dir)
    if wanted not in steps:
        raise ConfigError(f"config.trainer.resume_step={wanted}: no complete checkpoint of that step in "
                          f"{checkpoint_dir} (complete steps: {steps}); pick one of them, or -1 for the "
                          f"newest intact one")


def resume_step(config: ml_collections.ConfigDict, checkpointer: RunCheckpointer) -> int | None:
    """The step a run resumes from: ``config.trainer.resume_step`` when >= 0 (checked by
    ``check_resume_step`` when the trainer was built), else the newest intact step (None: nothing
    to resume, a new run)."""
    if config.trainer.resume_step < 0:
        return checkpointer.newest_intact_step()
    return config.trainer.resume_step
