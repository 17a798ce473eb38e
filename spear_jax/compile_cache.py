"""The persistent XLA compilation cache of a run (``config.trainer.compilation_cache_dir``).

A run compiles its programs (decode, log-probs, update, replay) at its first steps; at the
paper's model sizes that takes minutes. With a cache directory set, JAX stores each program
that took at least ``jax_persistent_cache_min_compile_time_secs`` (default 1 s) to compile, and
a rerun or a resumed run (after a preemption) loads it instead of compiling it again. The key
covers the program, the devices and the JAX, jaxlib and XLA versions and flags, so a changed
program or installation compiles afresh. In a multi-process run only the first process writes
and every process reads: give the processes one shared directory (on hosts of their own, a
directory the first process does not write stays empty).

"" leaves JAX's own setting: ``JAX_COMPILATION_CACHE_DIR`` when the environment sets it, else
no cache. The cache holds executable code: keep it where only you can write.
"""
from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache


def resolved(path: str) -> str:
    """The absolute directory a configured ``path`` names (``~`` expanded)."""
    return os.path.abspath(os.path.expanduser(path))


def use(path: str) -> str | None:
    """Points this process's persistent compilation cache at ``path`` (created if missing) and
    returns the directory in use; with ``path`` "" changes nothing and returns JAX's setting.
    Takes effect for the programs compiled afterwards, also when another directory was in use."""
    if not path:
        return jax.config.jax_compilation_cache_dir
    directory = resolved(path)
    os.makedirs(directory, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != directory:
        compilation_cache.set_cache_dir(directory)
        compilation_cache.reset_cache()  # JAX opens its cache once: reopen it at the new directory
    return directory
