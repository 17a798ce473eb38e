"""One RL step of the trainer broken into its parts: where the seconds of a step go.

    python -m bench.rl_step                                  # the embedded default, random weights
    python -m bench.rl_step --steps 6 --warmup 2 --sft_steps 40
    python -m bench.rl_step --warm_start runs/default/warm_start --eval
    python -m bench.rl_step --set data.group_size=2 --set actor.ppo_mini_batch_size=16

Builds the real ``spear_jax.trainer.Trainer`` from ``--config`` (default
``configs/spear.py:twx_tiny``, with ``--set KEY=VALUE`` overrides), runs ``--warmup`` steps
(compilation) then ``--steps`` measured steps, and prints one table of the mean measured step
split into the trainer's own laps (``time/*``) and the rollout's own timers:

    rollout      decode (``rollout/sampler_time_s``), environment (``rollout/env_time_s``),
                 host (the rest: prompt rendering, parsing, row building)
    prepare      filters, pack, old_logprobs (policy and, when the run has one, reference
                 passes), advantages, metrics
    replay/draw  the buffer's replay check;  update: the on-policy minibatches
    replay/update  the replay (SIL) minibatches;  buffer: staleness, this step's rows, the
                 sampler's copy of the new params
    other        the step's time outside every lap

The parts sum to ``time/step``. Device parts get tokens/s and MFU against the matmul peak the
trainer measures in the same process (``throughput.run_peak_flops``, as bench.model_throughput):
decode as ``perf/decode_*``; the update as ``perf/update_*``; the log-prob recomputation with
forward FLOPs (a third of ``throughput.train_flops_per_token``) per real token and pass; the
replay update with training FLOPs per real token of its batches. Also printed: the XLA backend
compiles inside the measured steps (count and seconds; 0 once every shape is cached) and, with
``--eval``, one evaluation (not part of the step).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np

from spear_jax import throughput

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# (row label, the metric holding its seconds, its parent row or None); in table order.
PARTS = (
    ("rollout", "time/rollout", None),
    ("decode", "rollout/sampler_time_s", "rollout"),
    ("environment", "rollout/env_time_s", "rollout"),
    ("host", None, "rollout"),
    ("prepare", "time/prepare", None),
    ("filters", "time/prepare/filters", "prepare"),
    ("pack", "time/prepare/pack", "prepare"),
    ("old_logprobs", "time/prepare/old_logprobs", "prepare"),
    ("advantages", "time/prepare/advantages", "prepare"),
    ("metrics", "time/prepare/metrics", "prepare"),
    ("replay", "time/replay", None),
    ("draw", "time/replay/draw", "replay"),
    ("replay_update", "time/replay/update", "replay"),
    ("update", "time/update", None),
    ("buffer", "time/buffer", None),
    ("other", None, None),
)
TOP_LEVEL = tuple(label for label, _, parent in PARTS if parent is None)


def load_config(spec: str, overrides: Sequence[str]):
    """``configs/X.py[:ARG]`` as ``get_config(ARG)``, with ``KEY=VALUE`` overrides (VALUE a
    Python literal, else a string)."""
    path, _, arg = spec.partition(":")
    module = importlib.import_module(os.path.splitext(path)[0].replace("/", "."))
    config = module.get_config(arg or None)
    config.unlock()
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise SystemExit(f"--set {override!r}: expected KEY=VALUE, e.g. data.group_size=2")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *path, leaf = key.split(".")
        node = config
        for name in path:
            node = node[name]
        node[leaf] = value
    return config


@contextlib.contextmanager
def compile_counter() -> Iterator[list[float]]:
    """Collects the seconds of every XLA backend compile while open (one entry per compile)."""
    seconds: list[float] = []

    def listen(event: str, duration: float, **_) -> None:
        if event == COMPILE_EVENT:
            seconds.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seconds
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


class _TokenCounts:
    """Wraps the trainer's log-prob pass and optimizer to count the real tokens of a step's
    log-prob passes and replay batches (the trainer's own code runs unchanged)."""

    def __init__(self, trainer):
        self.logprob_tokens = self.replay_tokens = 0.0
        self.logprob_length = self.replay_length = 0
        for name in ("with_entropy", "logprobs"):
            setattr(trainer.logprob_pass, name, self._counting_pass(getattr(trainer.logprob_pass, name)))
        optimize = trainer._optimize

        def counting_optimize(batch, step, sil_weight):
            if sil_weight is not None:
                self.replay_tokens += float(batch["valid"][batch["row_valid"]].sum())
                self.replay_length = batch["valid"].shape[1]
            return optimize(batch, step, sil_weight=sil_weight)

        trainer._optimize = counting_optimize

    def _counting_pass(self, fn):
        def counted(params, tokens, valid, selected=None):
            self.logprob_tokens += float(valid.sum())
            self.logprob_length = valid.shape[1]
            return fn(params, tokens, valid, selected)

        return counted

    def take(self) -> dict[str, float]:
        """This step's counts (and resets them)."""
        out = {"logprob_tokens": self.logprob_tokens, "logprob_length": self.logprob_length,
               "replay_tokens": self.replay_tokens, "replay_length": self.replay_length}
        self.logprob_tokens = self.replay_tokens = 0.0
        return out


def part_seconds(metrics: Mapping[str, float]) -> dict[str, float]:
    """Seconds of every row of ``PARTS`` in one step's metrics; ``other`` is ``time/step`` less
    the top-level laps, so the top-level rows sum to ``time/step``."""
    seconds = {label: float(metrics.get(key, 0.0)) for label, key, _ in PARTS if key is not None}
    seconds["host"] = seconds["rollout"] - seconds["decode"] - seconds["environment"]
    seconds["other"] = float(metrics["time/step"]) - sum(seconds[p] for p in TOP_LEVEL if p != "other")
    return seconds


def step_record(metrics: Mapping[str, float], counts: Mapping[str, float], compiles: Sequence[float],
                cfg, frozen_weights: bool) -> dict[str, float]:
    """Everything the table shows of one step: part seconds, and per device part its tokens
    and FLOPs (``cfg`` the model config)."""
    seconds = part_seconds(metrics)
    # a forward pass is a third of forward + backward with weight gradients: 2 N_matmul + 2 L S q
    forward = throughput.train_flops_per_token(cfg, max(counts["logprob_length"], 1)) / 3
    replay = throughput.train_flops_per_token(cfg, max(counts["replay_length"], 1), frozen_weights)
    peak = float(metrics["perf/peak_flops"])
    record = {f"s/{k}": v for k, v in seconds.items()}
    record.update({
        "step": float(metrics["time/step"]), "peak": peak,
        "tokens/decode": metrics.get("perf/decode_tokens", 0.0),
        "flops/decode": metrics.get("perf/decode_mfu", 0.0) * peak * seconds["decode"],
        "tokens/update": metrics.get("perf/update_tokens", 0.0),
        "flops/update": metrics.get("perf/update_mfu", 0.0) * peak * seconds["update"],
        "tokens/old_logprobs": counts["logprob_tokens"], "flops/old_logprobs": forward * counts["logprob_tokens"],
        "tokens/replay_update": counts["replay_tokens"], "flops/replay_update": replay * counts["replay_tokens"],
        "compiles": float(len(compiles)), "compile_s": float(sum(compiles)),
    })
    return record


def mean_record(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {key: statistics.fmean(r[key] for r in records) for key in records[0]}


def format_table(record: Mapping[str, float]) -> list[str]:
    """The table of one (mean) step record: part, seconds, share of the step, tokens/s, MFU."""
    step, peak = record["step"], record["peak"]
    lines = [f"{'part':<22}{'seconds':>9}{'share':>8}{'tokens/s':>12}{'mfu':>9}"]
    for label, _, parent in PARTS:
        seconds = record[f"s/{label}"]
        name = f"  {label}" if parent else label
        line = f"{name:<22}{seconds:9.3f}{seconds / step:8.1%}"
        tokens = record.get(f"tokens/{label}", 0.0)
        if tokens and seconds > 0:
            line += f"{tokens / seconds:12.0f}{record[f'flops/{label}'] / seconds / peak:9.2%}"
        lines.append(line)
    total = sum(record[f"s/{p}"] for p in TOP_LEVEL)
    lines.append(f"{'step (sum of parts)':<22}{total:9.3f}{total / step:8.1%}")
    lines.append(f"{'step (time/step)':<22}{step:9.3f}{1:8.1%}")
    lines.append(f"xla compiles in the step: {record['compiles']:.1f} ({record['compile_s']:.3f} s); "
                 f"peak {peak / 1e9:.1f} GFLOP/s")
    return lines


def build_trainer(config, workdir: str):
    from spear_jax.trainer import Trainer

    config.logging.backends = ("jsonl",)
    return Trainer(config, workdir)


def measure(trainer, steps: int, warmup: int) -> list[dict[str, float]]:
    """Runs ``warmup`` then ``steps`` trainer steps; the records of the measured ones."""
    counts, records = _TokenCounts(trainer), []
    cfg, frozen = trainer.policy.model_config, trainer.config.model.lora.rank > 0
    for step in range(1, warmup + steps + 1):
        with compile_counter() as compiles:
            metrics = trainer.train_step(step)
        trainer.step = step
        record = step_record(metrics, counts.take(), compiles, cfg, frozen)
        if step > warmup:
            records.append(record)
    return records


def warm_start(config, sft_steps: int, directory: str) -> None:
    """Points ``config`` at a warm start in ``directory`` (trained there for ``sft_steps``
    supervised steps first when ``sft_steps`` > 0), or at random weights."""
    config.sft.enable = False
    if sft_steps > 0:
        from spear_jax.sft import run_sft

        config.sft.steps = sft_steps
        run_sft(config, directory)
    if sft_steps > 0 or directory:
        config.model.checkpoint_format, config.model.checkpoint_path = "orbax", directory


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/spear.py:twx_tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not measured (compiles)")
    parser.add_argument("--sft_steps", type=int, default=0, help="supervised warm-start steps (0: random weights)")
    parser.add_argument("--warm_start", default="", help="an existing warm-start directory to start from")
    parser.add_argument("--eval", action="store_true", help="also time one evaluation after the steps")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    config = load_config(args.config, args.set)
    print(f"backend {jax.default_backend()} x{jax.device_count()}, loadavg {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        warm_start(config, args.sft_steps, args.warm_start or (os.path.join(tmp, "warm") if args.sft_steps else ""))
        trainer = build_trainer(config, os.path.join(tmp, "run"))
        try:
            records = measure(trainer, args.steps, args.warmup)
            eval_s = None
            if args.eval:
                start = time.perf_counter()
                trainer.evaluate(trainer.step)
                eval_s = time.perf_counter() - start
        finally:
            trainer.close()
    record = mean_record(records)
    print(f"{config.name}:{config.get('preset', '')}, mean of {len(records)} steps after {args.warmup} "
          f"warm-up; steps " + ", ".join(f"{r['step']:.2f}" for r in records) + " s")
    print("\n".join(format_table(record)))
    if eval_s is not None:
        print(f"eval (not in the step): {eval_s:.3f} s")
    return record


if __name__ == "__main__":
    main()
