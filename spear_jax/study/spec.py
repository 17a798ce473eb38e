"""A study config (``configs/studies/*.py``) read into the runs it asks for.

A study config's ``get_config()`` returns an ``ml_collections.ConfigDict`` with

* ``name``: the study's name (``results/<name>/``); ``title``: one line for ``results.md``;
* ``seeds``: the seeds (each sets ``config.seed`` of its warm start and of every method's run);
* ``baseline``: the method whose runs the others are compared with, seed by seed;
* ``budget``: ``total_steps``, ``eval_every`` and ``eval_episodes``, the same for every method
  (``trainer.total_steps``, ``trainer.eval_every`` = ``trainer.checkpoint_every``,
  ``data.eval_episodes``);
* ``overrides``: ``(("field.path", value), ...)`` applied to the warm start and to every run
  (the task and model setting: the environment, lengths);
* ``warm_start``: ``config`` (a ``configs/sft.py:PRESET`` argument), ``data`` (``"gold"``: the
  environment's gold paths, recorded once per seed; ``"math_tool"``: worked solutions of the
  procedural problems that call the code tool, generated once per seed; see
  ``spear_jax.study.warm_data``) and its own ``overrides``;
* ``methods``: a tuple of ``{name, label, config, overrides}``: ``config`` is a
  ``--config`` argument of ``spear_jax.main`` (``configs/spear.py:twx_tiny,drbot``), ``label`` the
  row name in the tables, ``overrides`` the method's own field changes (an ablation).

Every run is one ``python -m spear_jax.main`` command (``command``) in its own workdir:
``<workdir>/warm_start/seed<k>`` (the warm start, ``configs/sft.py`` trained on
``<workdir>/warm_start_data/seed<k>.jsonl``) and ``<workdir>/runs/<method>/seed<k>`` (RL from
that warm start through ``config.trainer.init_from``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from typing import Any, Sequence

import ml_collections

from spear_jax import resume
from spear_jax.metrics import RUN_CONFIG_FILE

WARM_START_DATA = ("gold", "math_tool")
STUDY_FIELDS = ("name", "title", "seeds", "baseline", "budget", "overrides", "warm_start", "methods")
METHOD_FIELDS = ("name", "label", "config", "overrides")


class StudyConfigError(ValueError):
    """A study config that cannot be run; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One ``spear_jax.main`` run of a study: its kind (``warm_start`` | ``rl``), method name
    (``warm_start`` for warm starts), seed, workdir, ``--config`` argument, field overrides and
    the warm start it needs (None for a warm start)."""

    kind: str
    method: str
    seed: int
    workdir: str
    config: str
    overrides: tuple[tuple[str, Any], ...]
    total_steps: int
    warm_start: "RunSpec | None" = None

    @property
    def name(self) -> str:
        return f"{self.method}/seed{self.seed}"


def load_study(path: str) -> ml_collections.ConfigDict:
    """The checked study config of the Python file ``path`` (its ``get_config()``)."""
    if not os.path.isfile(path):
        raise StudyConfigError(f"--study={path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_study_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    study = module.get_config()
    check_study(study, path)
    return study


def check_study(study: ml_collections.ConfigDict, where: str) -> None:
    """Raises ``StudyConfigError`` naming the first missing or inconsistent field."""
    missing = [f for f in STUDY_FIELDS if f not in study]
    if missing:
        raise StudyConfigError(f"{where}: study config lacks {missing} (see spear_jax/study/spec.py)")
    names = [m.name for m in study.methods]
    for i, method in enumerate(study.methods):
        absent = [f for f in METHOD_FIELDS if f not in method]
        if absent:
            raise StudyConfigError(f"{where}: methods[{i}] lacks {absent}")
        if method.name == "warm_start":
            raise StudyConfigError(f"{where}: methods[{i}].name 'warm_start' is the warm starts' directory: "
                                   f"choose another name")
        if not method.name.isidentifier():
            raise StudyConfigError(f"{where}: methods[{i}].name {method.name!r} must be an identifier "
                                   f"(it names a directory)")
    if len(set(names)) != len(names):
        raise StudyConfigError(f"{where}: methods have repeated names {names}")
    for method in study.methods:
        if method.get("base", "") and (method.base not in names or method.base == method.name):
            raise StudyConfigError(f"{where}: method {method.name!r} has base {method.base!r}: it must be "
                                   f"another of the methods {names}")
    if study.baseline not in names:
        raise StudyConfigError(f"{where}: baseline {study.baseline!r} is not one of the methods {names}")
    if study.warm_start.data not in WARM_START_DATA:
        raise StudyConfigError(f"{where}: warm_start.data {study.warm_start.data!r} must be one of "
                               f"{WARM_START_DATA}")
    if not study.seeds or len(set(study.seeds)) != len(study.seeds):
        raise StudyConfigError(f"{where}: seeds must be a non-empty tuple of distinct ints, got {study.seeds}")


def _budget_overrides(study: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    b = study.budget
    return (("trainer.total_steps", int(b.total_steps)), ("trainer.eval_every", int(b.eval_every)),
            ("trainer.checkpoint_every", int(b.eval_every)), ("data.eval_episodes", int(b.eval_episodes)))


def warm_start_data_path(workdir: str, seed: int) -> str:
    """Where the warm-start data of ``seed`` is recorded (``warm_data``)."""
    return os.path.join(workdir, "warm_start_data", f"seed{seed}.jsonl")


def warm_start_spec(study: ml_collections.ConfigDict, workdir: str, seed: int) -> RunSpec:
    """The warm start of ``seed``: ``configs/sft.py`` on the recorded conversations."""
    data = (("sft.source", "conversations"), ("sft.data_path", os.path.abspath(warm_start_data_path(workdir, seed))))
    overrides = tuple(study.overrides) + tuple(study.warm_start.overrides) + data + (("seed", int(seed)),)
    return RunSpec("warm_start", "warm_start", int(seed), os.path.join(workdir, "warm_start", f"seed{seed}"),
                   study.warm_start.config, tuple(tuple(o) for o in overrides), total_steps=0)


def run_specs(study: ml_collections.ConfigDict, workdir: str) -> list[RunSpec]:
    """Every RL run of the study, seed-major (all methods of seed 0, then seed 1, ...), each
    naming its warm start."""
    specs = []
    for seed in study.seeds:
        warm = warm_start_spec(study, workdir, seed)
        for method in study.methods:
            overrides = (tuple(study.overrides) + _budget_overrides(study) + tuple(method.overrides)
                         + (("seed", int(seed)), ("trainer.init_from", os.path.abspath(warm.workdir))))
            specs.append(RunSpec("rl", method.name, int(seed), os.path.join(workdir, "runs", method.name, f"seed{seed}"),
                                 method.config, tuple(tuple(o) for o in overrides),
                                 int(study.budget.total_steps), warm))
    return specs


def flag_value(value: Any) -> str:
    """An override value as ``config_flags`` parses it back (strings bare, the rest as literals)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float, tuple, list)):
        return repr(tuple(value) if isinstance(value, list) else value)
    raise StudyConfigError(f"override value {value!r} of type {type(value).__name__} cannot be passed as a flag")


def command(spec: RunSpec, python: str = sys.executable) -> list[str]:
    """The ``spear_jax.main`` command line of one run."""
    flags = [f"--config.{field}={flag_value(value)}" for field, value in spec.overrides]
    return [python, "-m", "spear_jax.main", f"--config={spec.config}", f"--workdir={spec.workdir}", *flags]


def resolved_config(spec: RunSpec) -> ml_collections.ConfigDict:
    """The run config ``command(spec)`` runs, built in this process (the config file's
    ``get_config(arg)`` with the overrides set); an unknown field raises naming it."""
    path, _, arg = spec.config.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"_run_config_{os.path.basename(path)[:-3]}", path)
    if module_spec is None or not os.path.isfile(path):
        raise StudyConfigError(f"{spec.name}: config file {path!r} not found (run from the repository root)")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for field, value in spec.overrides:
        set_field(config, field, value, spec.name)
    return config


def _same(recorded: Any, now: Any) -> bool:
    """Equal values, or two paths of one existing file or folder (a run or warm start shared
    between studies by a symbolic link, ``configs/studies/twx_ablations.py``)."""
    if recorded == now:
        return True
    return (isinstance(recorded, str) and isinstance(now, str) and os.path.exists(recorded)
            and os.path.exists(now) and os.path.realpath(recorded) == os.path.realpath(now))


def config_changes(spec: RunSpec) -> dict[str, tuple[Any, Any]]:
    """{field: (recorded, now)} for each field where the config the run recorded when it started
    (``<run>/config.json``) differs from the one the study would run now (``resolved_config``),
    compared as a resume compares them (``resume.config_differences``); empty when they agree
    (``_same``) or the run recorded none."""
    path = os.path.join(spec.workdir, RUN_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        recorded = json.load(handle)
    differences = resume.config_differences(recorded, resume.config_record(resolved_config(spec)))
    return {field: (old, new) for field, old, new in differences if not _same(old, new)}


def set_field(config: ml_collections.ConfigDict, field: str, value: Any, where: str) -> None:
    """``config.<field> = value`` for a dotted ``field`` that must already exist."""
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise StudyConfigError(f"{where}: override {field!r}: the config has no field {part!r}")
        node = node[part]
    if leaf not in node:
        raise StudyConfigError(f"{where}: override {field!r}: the config has no field {leaf!r}")
    node[leaf] = value


def warm_start_specs(specs: Sequence[RunSpec]) -> list[RunSpec]:
    """The distinct warm starts of ``specs`` in order of first use."""
    seen, warm = set(), []
    for spec in specs:
        if spec.warm_start is not None and spec.warm_start.workdir not in seen:
            seen.add(spec.warm_start.workdir)
            warm.append(spec.warm_start)
    return warm
