"""The test session's XLA flags, for the subprocesses a test starts.

The session compiles with ``FAST_COMPILE`` (``tests/conftest.py``): LLVM's backend optimisation
off. The tests' programs are small and run a few times each, so compiling dominates their CPU
time; without the backend's passes it takes about half as long, while XLA's own graph passes
(fusion, layout, sharding) run as always. Nothing in the suite times the compiled code against a
bound, and the benchmarks run outside it at the default level. A test whose program runs long
may compile that program at the default level (``jax.jit(..., compiler_options=DEFAULT_COMPILE)``,
as ``tests/sampling/test_distribution.py`` does for its draws)."""
import os
import re

FAST_COMPILE = "--xla_backend_optimization_level=0"
DEFAULT_COMPILE = {"xla_backend_optimization_level": 2}  # jax.jit compiler_options: XLA's default
_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\S+")


def flags(devices: int | None = None) -> str:
    """The session's ``XLA_FLAGS`` with the simulated CPU device count set to ``devices``
    (None: no simulated devices, XLA's one CPU device)."""
    kept = _DEVICES.sub("", os.environ.get("XLA_FLAGS", "")).split()
    return " ".join(kept + ([f"--xla_force_host_platform_device_count={devices}"] if devices else []))
