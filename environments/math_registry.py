"""``make_env("math", ...)``: a math-with-code-interpreter env from a named problem source.

Splits (``SPLITS``): ``train`` reads ``source``, ``test`` reads ``eval_source`` (default: the
same source; procedural problems then come from other seeds). Sources:

* ``reasoning_gym:<generator>`` -- procedural problems (e.g. ``basic_arithmetic``,
  ``gsm_symbolic``), graded by the generator; train and eval draw from different seeds;
* ``aime2024`` | ``aime2025`` | ``math500`` | ``gsm8k_test`` -- the bundled evaluation sets;
* ``jsonl`` -- a user file (``path``) with ``problem`` / ``answer`` fields (e.g. DAPO-Math-17k
  converted to jsonl), read through the tensorflow-datasets builder.

All math envs of a process share one warm ``Sandbox`` (closed at interpreter exit).
"""
from __future__ import annotations

import atexit
import os
import threading
from typing import Any, Mapping

from environments.math_data import (
    BUNDLED_SETS,
    FieldMap,
    ProceduralProblems,
    bundled_math_builder,
    load_problems,
    math_file_builder,
)
from environments.math_env import MathEnvConfig, MathToolEnv
from environments.sandbox import Sandbox, SandboxConfig

SPLITS = ("train", "test")
PROCEDURAL_PREFIX = "reasoning_gym:"
_EVAL_SEED_OFFSET = 1_000_003
_sandbox: Sandbox | None = None
_sandbox_lock = threading.Lock()


def shared_sandbox() -> Sandbox:
    """The process-wide sandbox (created on first use)."""
    global _sandbox
    with _sandbox_lock:
        if _sandbox is None:
            _sandbox = Sandbox(SandboxConfig())
            atexit.register(_sandbox.close)
        return _sandbox


def _data_dir() -> str:
    return os.environ.get("SPEAR_TFDS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "spear_jax", "tfds"))


def make_math_env(split: str = "train", source: str = "reasoning_gym:basic_arithmetic",
                  eval_source: str = "", path: str = "", size: int = 2000, seed: int = 0,
                  max_steps: int = 8, max_tool_output_chars: int = 16384,
                  generator_options: Mapping[str, Any] | None = None) -> MathToolEnv:
    """A ``MathToolEnv`` for ``split`` (see module docstring); ``max_steps`` = assistant turns;
    ``generator_options``: the reasoning-gym generator's config fields (e.g. ``max_terms``,
    ``max_digits``, ``operators`` of ``basic_arithmetic``), for both splits of a procedural source."""
    if split not in SPLITS:
        raise ValueError(f"unknown math split {split!r}; choose one of {SPLITS}")
    name = source if split == "train" or not eval_source else eval_source
    config = MathEnvConfig(max_turns=max_steps, max_tool_output_chars=max_tool_output_chars)
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(generator_options or {}).items()}
    if options and not name.startswith(PROCEDURAL_PREFIX):
        raise ValueError(f"generator_options={options} apply to {PROCEDURAL_PREFIX}<generator> sources only, "
                         f"not {name!r}; remove them")
    if name.startswith(PROCEDURAL_PREFIX):
        problems = ProceduralProblems(name[len(PROCEDURAL_PREFIX):], seed=seed + (0 if split == "train" else _EVAL_SEED_OFFSET),
                                      size=size, **options)
        return MathToolEnv(problems, shared_sandbox(), config, grader=problems.grade, seed=seed)
    if name in BUNDLED_SETS:
        problems = load_problems(bundled_math_builder(name, _data_dir()), "test")
    elif name == "jsonl":
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"math source 'jsonl' needs path= an existing jsonl file, got {path!r}")
        builder = math_file_builder({"train": path}, _data_dir(), FieldMap(id=None))
        problems = load_problems(builder, "train")
    else:
        raise ValueError(f"unknown math source {name!r}: use {PROCEDURAL_PREFIX}<generator>, "
                         f"one of {BUNDLED_SETS}, or 'jsonl' with path=")
    return MathToolEnv(problems, shared_sandbox(), config, seed=seed)
