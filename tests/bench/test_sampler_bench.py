"""The sampler benchmark runs end to end on the tiny model and prints what its docs promise."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests import xla

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_sampler_bench_prints_throughput_roofs_and_profile(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla.flags(devices=None))  # one CPU device, as users run it
    out = subprocess.run(
        [sys.executable, "-m", "bench.sampler_throughput", "--models", "tiny", "--batch-sizes", "2",
         "--new-tokens", "32", "--repeats", "2", "--skip-hf", "--read-mib", "16", "--weight-dtype", "float32",
         "--profile", "--json", str(tmp_path / "rows.json")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert re.search(r"roofs: matmul [\d.]+ GFLOP/s .* read [\d.]+ GB/s \(sum over 16 MiB\)", out)
    row = re.search(r"model=tiny\s+batch=2 .*jax_decode_tok_s=(\S+) .*jax_mem_frac=(\S+)", out)
    assert row
    rate, fraction = float(row.group(1)), float(row.group(2))
    if np.isnan(rate):  # 16 decode steps of tiny can vanish in a loaded machine's timing noise
        assert np.isnan(fraction) and "decode rate not resolved at batch=2" in out
    else:
        assert rate > 0 and fraction > 0
    assert "profile model=tiny batch=2 steps=32: wall" in out and "no accelerator plane" in out
    assert (tmp_path / "rows.json").read_text().count('"model": "tiny"') == 1


def test_decode_rate_is_nan_when_the_long_run_is_not_slower():
    from bench.sampler_throughput import decode_rate

    assert decode_rate(8, 64, 33, t_long=2.0, t_short=1.0) == 8 * 31
    assert np.isnan(decode_rate(8, 64, 33, t_long=1.0, t_short=1.0))
    assert np.isnan(decode_rate(8, 64, 33, t_long=0.9, t_short=1.0))


def test_best_times_alternates_engines_and_keeps_each_engines_long_output():
    from bench.sampler_throughput import best_times

    calls = []

    def run(tag):
        return lambda: calls.append(tag) or tag

    times = best_times({"jax": (run("js"), run("jl")), "hf": (run("hs"), run("hl"))}, repeats=3)
    warm_up = ["js", "jl", "hs", "hl"]
    assert calls == warm_up + ["js", "jl", "hs", "hl"] + ["hs", "hl", "js", "jl"] + ["js", "jl", "hs", "hl"]
    assert {name: t[3] for name, t in times.items()} == {"jax": "jl", "hf": "hl"}
    assert all(t[0] >= 0 and 0 <= t[1] < float("inf") and 0 <= t[2] < float("inf") for t in times.values())


def test_sampler_bench_against_transformers_prints_the_speedup_and_greedy_agreement():
    env = dict(os.environ, XLA_FLAGS=xla.flags(devices=None))
    out = subprocess.run(
        [sys.executable, "-m", "bench.sampler_throughput", "--models", "tiny", "--batch-sizes", "2",
         "--new-tokens", "32", "--repeats", "1", "--torch-threads", "1", "--read-mib", "16"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    row = re.search(r"model=tiny\s+batch=2 .*hf_decode_tok_s=(\S+) .*greedy_agreement=(\S+)\s+"
                    r"decode_speedup=(\S+)\s+e2e_speedup=(\S+)", out)
    assert row, out
    assert float(row.group(2)) == 1.0  # same weights, greedy: the same tokens
    assert float(row.group(4)) > 0


def test_both_engines_truncate_their_draws_as_asked():
    """top-p 1e-6 keeps only each step's most likely token: both engines' draws are then their
    greedy tokens, which agree (so the knobs reach both)."""
    from flax import nnx

    from bench.sampler_throughput import hf_runner, jax_runner, load_transformers
    from spear_jax.model import get_model_config, init_model
    from spear_jax.sampling import Sampler

    cfg = get_model_config("tiny")
    graphdef, state = nnx.split(init_model(cfg, 0))
    sampler = Sampler(graphdef, state, cfg, max_len=48, max_batch=2)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 16)).tolist()
    model = load_transformers(cfg, state, "cpu", "float32")
    greedy = jax_runner(sampler, prompts, 8)()
    np.testing.assert_array_equal(jax_runner(sampler, prompts, 8, temperature=1.0, top_p=1e-6)(), greedy)
    np.testing.assert_array_equal(jax_runner(sampler, prompts, 8, temperature=1.0, top_k=1)(), greedy)
    np.testing.assert_array_equal(hf_runner(model, prompts, 8, "cpu", temperature=1.0, top_p=1e-6)(), greedy)
    np.testing.assert_array_equal(hf_runner(model, prompts, 8, "cpu", temperature=1.0, top_k=1)(), greedy)


def test_truncation_needs_a_temperature():
    out = subprocess.run([sys.executable, "-m", "bench.sampler_throughput", "--top-p", "0.6"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "give --temperature > 0" in out.stderr
