"""Compile time of the update step and of decode against depth: scanned blocks vs unrolled.

    python -m bench.compile_time                       # Qwen2.5-1.5B shapes, bf16, 28 vs 2 layers
    python -m bench.compile_time --preset tiny --layers 2,8 --batch 2 --seq_len 64

For each depth in ``--layers`` (the first is the reference, the last the deep model) and each
layout (``model.scan_layers`` True, then False unless ``--no_unrolled``), the wall-clock seconds
of ``lower`` + ``compile`` of

* the update step the trainer runs: ``spear_jax.train_step.make_update_fn`` (on-policy, the
  default objective: token-level clipped policy loss, token-mean aggregation, AdamW), on a
  minibatch of ``--batch`` rows x ``--seq_len`` tokens in one micro-batch;
* the sampler's decode program: ``spear_jax.sampling.decode.extend_and_decode`` (append a
  ``--prompt_len`` prompt to a ``--batch`` x ``--cache_len`` cache, then up to ``--new_tokens``
  steps in one ``lax.while_loop``), in the form ``decode_layers="auto"`` gives on an accelerator
  (``decode.decode_step_form(..., platform="gpu")``: the model's scanned ``forward_last`` for a
  deep scanned model; on CPU "auto" unrolls the decode step whatever the depth, trading this
  compile time for faster steps, ``bench.decode_layers``).

Every input is a ``jax.ShapeDtypeStruct`` (``jax.jit(...).lower(...).compile()``): no weight is
materialised, so a 1.5B model compiles on a small CPU host. Weights are bf16 (``param_dtype`` and
``compute_dtype``), as is the KV cache. Each measurement starts from ``jax.clear_caches()`` and a
fresh update function, after one discarded warm-up compile (the first compile of a process pays
one-time set-up); the process CPU seconds are printed too (the host may be shared). The last
line is

    compile_time_ratio=<max over {update, decode} of seconds(deepest) / seconds(first depth)>

for the scanned layout (the goal is at most 2: compile time independent of depth); the same
ratio of the unrolled layout is printed on the line before it for contrast.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from spear_jax import train_step
from spear_jax.model import KVCache, ModelConfig, get_model_config, init_model
from spear_jax.objectives import ObjectiveConfig, SILConfig
from spear_jax.sampling import decode
from spear_jax.sampling.decode_step import abstract_decode_weights
from spear_jax.sampling.distribution import SamplingKnobs
from spear_jax.sampling.stops import StopTable

PROGRAMS = ("update", "decode")


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params as ShapeDtypeStruct) of ``cfg``'s model; nothing is allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def lower_update(cfg: ModelConfig, batch: int, seq_len: int):
    """The trainer's jitted on-policy update, lowered on abstract inputs."""
    graphdef, params = abstract_model(cfg)
    optimizer = train_step.make_optimizer(train_step.OptimizerConfig())
    config = train_step.UpdateConfig(objective=ObjectiveConfig(), sil=SILConfig())
    update = train_step.make_update_fn(graphdef, optimizer, config, replay=False)
    opt_state = jax.eval_shape(optimizer.init, params)
    shapes = {"tokens": jnp.int32, "valid": bool, "loss_mask": jnp.float32, "old_logprobs": jnp.float32,
              "advantages": jnp.float32}
    minibatch = {k: jax.ShapeDtypeStruct((1, batch, seq_len), dtype) for k, dtype in shapes.items()}
    minibatch["row_valid"] = jax.ShapeDtypeStruct((1, batch), bool)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return update.lower(params, opt_state, minibatch, key, jax.ShapeDtypeStruct((), jnp.float32))


def lower_decode(cfg: ModelConfig, batch: int, prompt_len: int, cache_len: int, new_tokens: int):
    """The sampler's append-then-decode program, lowered on abstract inputs."""
    graphdef, params = abstract_model(cfg)
    kv = jax.ShapeDtypeStruct((cfg.num_layers, batch, cache_len, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
    cache = KVCache(k=kv, v=kv, lengths=jax.ShapeDtypeStruct((batch,), jnp.int32))
    rows = (batch, prompt_len)
    return decode.extend_and_decode.lower(
        graphdef, params, cache, jax.ShapeDtypeStruct(rows, jnp.int32), jax.ShapeDtypeStruct(rows, bool),
        jax.ShapeDtypeStruct((batch,), jnp.int32), _abstract(SamplingKnobs.make(1.0, 1.0, 0, False)),
        StopTable.make([0], []), jax.eval_shape(lambda: jax.random.key(0)),
        weights=abstract_decode_weights(graphdef, params, decode.decode_step_form(cfg, None, platform="gpu")),
        max_steps=new_tokens, window=cache_len, rules=cfg.sharding_rules)


def compile_seconds(lower: Callable[[], jax.stages.Lowered]) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of lower + compile, from cleared jax caches. The CPU
    time (all threads) is printed next to the wall clock because a shared host stretches the
    latter."""
    jax.clear_caches()
    wall, cpu = time.perf_counter(), time.process_time()
    lower().compile()
    return time.perf_counter() - wall, time.process_time() - cpu


def depth_ratio(seconds: dict, scan_layers: bool, depths: tuple[int, int]) -> float:
    """max over PROGRAMS of the wall-clock seconds of the deep model over the shallow one:
    seconds[(deep, scan_layers, program)][0] / seconds[(shallow, scan_layers, program)][0]."""
    shallow, deep = depths
    return max(seconds[deep, scan_layers, p][0] / seconds[shallow, scan_layers, p][0] for p in PROGRAMS)


def format_table(seconds: dict) -> list[str]:
    """One line per (layers, layout): wall and CPU compile seconds of the update and decode."""
    lines = [f"{'layers':>6} {'layout':>8} {'update_s':>9} {'update_cpu_s':>12} {'decode_s':>9} "
             f"{'decode_cpu_s':>12}"]
    for layers, scan_layers in sorted({key[:2] for key in seconds}, key=lambda k: (not k[1], k[0])):
        (update, update_cpu), (dec, dec_cpu) = (seconds[layers, scan_layers, p] for p in PROGRAMS)
        layout = "scan" if scan_layers else "unrolled"
        lines.append(f"{layers:>6} {layout:>8} {update:>9.2f} {update_cpu:>12.2f} {dec:>9.2f} {dec_cpu:>12.2f}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen2.5-1.5b")
    parser.add_argument("--layers", default="2,28", help="comma-separated depths; first vs last")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--cache_len", type=int, default=1024)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--no_unrolled", action="store_true", help="measure the scanned layout only")
    args = parser.parse_args(argv)
    args.layers = tuple(int(n) for n in args.layers.split(","))
    if len(args.layers) < 2 or min(args.layers) < 1:
        parser.error(f"--layers needs at least two positive depths, got {args.layers}")
    return args


def measure(args: argparse.Namespace) -> dict:
    """{(layers, scan_layers, program): (wall, CPU) seconds} for every depth, layout and program."""
    seconds = {}
    warm_up = get_model_config(args.preset, num_layers=args.layers[0], param_dtype=args.dtype,
                               compute_dtype=args.dtype)
    compile_seconds(lambda: lower_update(warm_up, args.batch, args.seq_len))  # one-time set-up
    for scan_layers in (True,) if args.no_unrolled else (True, False):
        for layers in args.layers:
            cfg = get_model_config(args.preset, num_layers=layers, param_dtype=args.dtype,
                                   compute_dtype=args.dtype, scan_layers=scan_layers)
            seconds[layers, scan_layers, "update"] = compile_seconds(
                lambda: lower_update(cfg, args.batch, args.seq_len))
            seconds[layers, scan_layers, "decode"] = compile_seconds(
                lambda: lower_decode(cfg, args.batch, args.prompt_len, args.cache_len, args.new_tokens))
            print(f"# {layers} layers, scan_layers={scan_layers}: update "
                  f"{seconds[layers, scan_layers, 'update'][0]:.2f} s, decode "
                  f"{seconds[layers, scan_layers, 'decode'][0]:.2f} s", flush=True)
    return seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"# preset={args.preset} dtype={args.dtype} layers={args.layers} batch={args.batch} "
          f"seq_len={args.seq_len} prompt_len={args.prompt_len} cache_len={args.cache_len} "
          f"new_tokens={args.new_tokens} backend={jax.default_backend()}", flush=True)
    seconds = measure(args)
    print("\n".join(format_table(seconds)))
    depths = (args.layers[0], args.layers[-1])
    if not args.no_unrolled:
        print(f"unrolled_compile_time_ratio={depth_ratio(seconds, False, depths):.2f}")
    print(f"compile_time_ratio={depth_ratio(seconds, True, depths):.2f}")


if __name__ == "__main__":
    jax.config.update("jax_enable_compilation_cache", False)  # a cached program would read as 0 s
    main()
