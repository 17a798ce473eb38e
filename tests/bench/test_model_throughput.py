"""The train-step benchmark alternates jax and torch and prints the median of per-round ratios."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.model_throughput import alternate
from tests import xla

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_alternate_reverses_the_order_in_odd_rounds_after_one_warm_up_each():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    seconds = alternate(runners, steps=2, rounds=3)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert {name: len(per_round) for name, per_round in seconds.items()} == {"a": 3, "b": 3}
    assert all(s >= 0 for per_round in seconds.values() for s in per_round)


def test_model_bench_prints_per_round_ratios_and_their_median():
    env = dict(os.environ, XLA_FLAGS=xla.flags(devices=None))  # one CPU device, as users run it
    out = subprocess.run(
        [sys.executable, "-m", "bench.model_throughput", "--preset", "tiny", "--batch", "2",
         "--seq_len", "16", "--steps", "1", "--rounds", "3", "--matmul_size", "64"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    for name in ("jax", "torch"):
        assert re.search(rf"^{name}\s+step\s+[\d.]+ ms\s+[\d.]+ tokens/s", out, re.M), out
    ratios = [float(r) for r in re.search(r"^per-round ratios: (.*)$", out, re.M).group(1).split()]
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    median = float(re.search(r"^jax / torch throughput ratio: ([\d.]+)$", out, re.M).group(1))
    assert abs(median - float(np.median(ratios))) <= 0.006  # both printed to 2 decimals
