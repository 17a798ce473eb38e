"""Test-wide setup: 8 simulated CPU devices so every test exercises sharding, compilation without
LLVM's backend optimisation (``tests/xla.py``), and one persistent XLA compilation cache for the
whole session.

The cache is a fresh directory per ``pytest`` invocation, created by the controlling process and
shared through ``JAX_COMPILATION_CACHE_DIR`` with the xdist workers and every subprocess a test
starts (runs, studies, multi-process runs): the many tests that build the same tiny model and
trainer compile each program once. A cache the caller already set is used as it is."""
import os
import shutil
import tempfile

from tests.xla import FAST_COMPILE

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = _flags.strip()

_CACHE = "JAX_COMPILATION_CACHE_DIR"
_CACHE_OWNED = "SPEAR_TEST_OWNS_COMPILATION_CACHE"
if _CACHE not in os.environ:  # the controller (or a run without xdist): set before jax reads it
    os.environ[_CACHE] = tempfile.mkdtemp(prefix="spear_jax_test_xla_cache_")
    os.environ[_CACHE_OWNED] = os.environ[_CACHE]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402  (must come after XLA_FLAGS and the cache are set)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    """The controller removes the cache it created, after every worker has finished."""
    if not hasattr(config, "workerinput") and os.environ.get(_CACHE_OWNED) == os.environ.get(_CACHE):
        shutil.rmtree(os.environ[_CACHE], ignore_errors=True)
