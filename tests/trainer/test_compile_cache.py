"""config.trainer.compilation_cache_dir: programs a run compiles are stored there and a later
process loads them instead of compiling; a directory that cannot be written is a config error."""
import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jax.experimental.compilation_cache import compilation_cache

from spear_jax import compile_cache, main, metrics, run_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One fresh process: the cache at argv[1], then a program compiled once; prints the cache hits.
_COMPILE_ONCE = """
import sys, jax, jax.numpy as jnp
from spear_jax import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
compile_cache.use(sys.argv[1])
print(float(jax.jit(lambda x: jnp.cumsum(jnp.sin(x) ** 2) @ x)(jnp.arange(31.0))), len(hits))
"""


@pytest.fixture
def session_cache():
    """Caches every program during the test; puts the process's cache back where it was (the
    test session's) after it."""
    before = jax.config.jax_compilation_cache_dir
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def _entries(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith("-cache")] if os.path.isdir(directory) else []


def test_a_second_process_loads_the_program_the_first_compiled(tmp_path):
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cache = tmp_path / "cache"
    runs = [subprocess.run([sys.executable, "-c", _COMPILE_ONCE, str(cache)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120, check=True).stdout.split()
            for _ in range(2)]
    assert runs[0][0] == runs[1][0]  # the loaded program computes what the compiled one did
    assert int(runs[0][1]) == 0 and int(runs[1][1]) >= 1
    assert _entries(cache)


def test_use_moves_the_cache_of_a_process_that_already_had_one(tmp_path, session_cache):
    first = compile_cache.use(str(tmp_path / "a"))
    jax.jit(lambda x: jnp.tanh(x) * 7.0 - 1.0)(jnp.arange(5.0))
    second = compile_cache.use(str(tmp_path / "b"))
    jax.jit(lambda x: jnp.tanh(x) * 5.0 + 2.0)(jnp.arange(5.0))
    assert (first, second) == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert _entries(first) and _entries(second)
    assert compile_cache.use("") == second  # "" leaves the setting as it is


class _CompilingTrainer:
    def __init__(self, config, workdir):
        self.workdir = workdir

    def train(self):
        jax.jit(lambda x: jnp.cos(x) @ x + 11.0)(jnp.arange(9.0))
        metrics.MetricsWriter(self.workdir, tensorboard=False).close()
        return {}

    def close(self):
        pass


def test_a_run_compiles_into_its_configured_directory(tmp_path, monkeypatch, session_cache):
    monkeypatch.setattr("spear_jax.trainer.Trainer", _CompilingTrainer)
    c = importlib.import_module("configs.spear").get_config("twx_tiny")
    c.sft.enable, c.trainer.compilation_cache_dir = False, str(tmp_path / "xla_cache")
    main.run(c, str(tmp_path / "run"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla_cache")
    assert _entries(tmp_path / "xla_cache")


@pytest.mark.parametrize("blocker", ["file", "dangling_link", "read_only"])
def test_a_directory_that_cannot_be_written_is_a_config_error(tmp_path, blocker):
    if blocker == "file":
        (tmp_path / "f").write_text("")
        path, reason = tmp_path / "f" / "cache", "is not a directory"
    elif blocker == "dangling_link":
        (tmp_path / "link").symlink_to(tmp_path / "nowhere")
        path, reason = tmp_path / "link", "is not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes any directory")
        (tmp_path / "ro").mkdir(mode=0o555)
        path, reason = tmp_path / "ro" / "cache", "is not writable"
    c = importlib.import_module("configs.spear").get_config("twx_tiny")
    c.trainer.compilation_cache_dir = str(path)
    with pytest.raises(run_config.ConfigError, match=rf"config.trainer.compilation_cache_dir=.*{reason}.*'' for no"):
        run_config.validate(c)
