"""Forward+backward throughput and MFU of the train step, side by side with transformers (torch).

    python -m bench.model_throughput --preset smollm2-135m --batch 4 --seq_len 256
    python -m bench.model_throughput --preset qwen2.5-1.5b --batch 16 --seq_len 4096 \
        --compute_dtype bfloat16 --remat --peak_tflops 989 --no_torch          # on an H100
    python -m bench.model_throughput --preset qwen2.5-0.5b --batch 16 --seq_len 4096 \
        --compute_dtype bfloat16 --remat --memory_only      # compile only: XLA memory analysis

The step is value_and_grad of the mean token log-likelihood (log-prob pass, chunked at the
update's default ``logprob_chunk_size``) over random
tokens. Model FLOPs per token (PaLM convention, no rematerialisation counted):

    6 * N_matmul + 6 * num_layers * seq_len * num_heads * head_dim

with N_matmul = all matmul weights including the output projection (tied or not). MFU =
achieved FLOP/s / peak; the peak is ``--peak_tflops`` when given, else the best of a large
float32 matmul measured in this run under XLA and under torch. ``os.getloadavg()`` is printed
because the CPU may be shared.

The two steps are timed in alternation, ``--rounds`` rounds of ``--steps`` steps each (jax
first in even rounds, torch first in odd ones), so that a slow spell of a shared machine lands
on both; each round gives one ratio, and the ratio printed is their median (the per-round
ratios are printed too). The step times printed are the medians over rounds.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spear_jax.model import get_model_config, init_model, init_sharded, to_hf_config
from spear_jax.model.logprobs import sequence_token_stats
from spear_jax.sharding import make_mesh
from spear_jax.throughput import matmul_peak_flops as jax_matmul_peak
from spear_jax.throughput import time_fn
from spear_jax.throughput import train_flops_per_token as flops_per_token
from spear_jax.train_step import UpdateConfig


def torch_matmul_peak(n: int) -> float:
    import torch

    a = torch.randn(n, n)
    seconds = time_fn(lambda: a @ a, 5)
    return 2 * n**3 / seconds


def make_train_step(graphdef, chunk_size: int = UpdateConfig.logprob_chunk_size):
    """value_and_grad of the mean token negative log-likelihood (chunked log-prob pass)."""

    def loss(state, tokens, valid):
        logprobs, _ = sequence_token_stats(graphdef, state, tokens, valid, 1.0, chunk_size)
        return -jnp.mean(logprobs)

    return jax.jit(jax.value_and_grad(loss))


def jax_step(cfg, batch: int, seq_len: int):
    """One compiled train step on random tokens: a no-argument callable that blocks until done."""
    mesh = make_mesh(data=-1)
    graphdef, state = init_sharded(cfg, mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    tokens = jax.device_put(
        jax.random.randint(jax.random.key(1), (batch, seq_len), 0, cfg.vocab_size), batch_sharding)
    valid = jax.device_put(jnp.ones((batch, seq_len), bool), batch_sharding)
    with jax.set_mesh(mesh):
        step = make_train_step(graphdef)

    def run():
        with jax.set_mesh(mesh):
            return jax.block_until_ready(step(state, tokens, valid))

    return run


def alternate(steps_by_name: dict, steps: int, rounds: int) -> dict[str, list[float]]:
    """Mean seconds per call of each callable in every round: ``rounds`` rounds of ``steps``
    calls each, the callables' order reversed in odd rounds, after one warm-up (compile) call
    each. Returns {name: [seconds in round 0, round 1, ...]}."""
    for run in steps_by_name.values():
        run()
    seconds = {name: [] for name in steps_by_name}
    for r in range(rounds):
        names = list(steps_by_name) if r % 2 == 0 else list(steps_by_name)[::-1]
        for name in names:
            seconds[name].append(time_fn(steps_by_name[name], steps, warmup=False))
    return seconds


def print_step_memory(cfg, batch: int, seq_len: int) -> None:
    """Compile the train step for abstract inputs (nothing allocated) and print XLA's memory
    analysis for one device."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    valid = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)
    compiled = make_train_step(graphdef).lower(state, tokens, valid).compile()
    mem = compiled.memory_analysis()
    gib = 1 / 2**30
    print(f"step memory (GiB): arguments {mem.argument_size_in_bytes * gib:.2f}  outputs "
          f"{mem.output_size_in_bytes * gib:.2f}  temporaries {mem.temp_size_in_bytes * gib:.2f}  "
          f"(dense fp32 logits would be {batch * seq_len * cfg.vocab_size * 4 * gib:.2f})")


def torch_step(cfg, batch: int, seq_len: int):
    """The same step under transformers (torch eager, labels = tokens): a no-argument callable."""
    import torch
    import transformers

    hf_config = transformers.AutoConfig.for_model(**to_hf_config(cfg))
    dtype = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of --steps steps, jax and torch alternating (ratio: median over rounds)")
    parser.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="accelerator peak for MFU (e.g. 989 for H100 bf16); default: measured")
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument("--no_torch", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--memory_only", action="store_true",
                        help="only compile the step and print its memory analysis")
    args = parser.parse_args()

    cfg = get_model_config(args.preset, compute_dtype=args.compute_dtype, remat=args.remat)
    tokens = args.batch * args.seq_len
    flops = flops_per_token(cfg, args.seq_len) * tokens
    print(f"backend={jax.default_backend()} devices={len(jax.devices())} preset={args.preset} "
          f"batch={args.batch} seq_len={args.seq_len} dtype={args.compute_dtype} remat={args.remat}")
    print(f"loadavg before: {os.getloadavg()}  cpus={os.cpu_count()}")
    if args.memory_only:
        print_step_memory(cfg, args.batch, args.seq_len)
        return

    peaks = {"xla_matmul": jax_matmul_peak(args.matmul_size)}
    if not args.no_torch:
        peaks["torch_matmul"] = torch_matmul_peak(args.matmul_size)
    for name, value in peaks.items():
        print(f"{name} {args.matmul_size}^3 fp32: {value / 1e9:.1f} GFLOP/s")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else max(peaks.values())
    print(f"peak used for MFU: {peak / 1e9:.1f} GFLOP/s ({'given' if args.peak_tflops else 'measured'})")

    runners = {"jax": jax_step(cfg, args.batch, args.seq_len)}
    if not args.no_torch:
        runners["torch"] = torch_step(cfg, args.batch, args.seq_len)
    seconds = alternate(runners, args.steps, args.rounds)
    for name, per_round in seconds.items():
        median = float(np.median(per_round))
        print(f"{name:6s} step {median * 1e3:9.1f} ms  {tokens / median:9.1f} tokens/s  "
              f"{flops / median / 1e9:8.1f} GFLOP/s  MFU {flops / median / peak:6.1%}")
    if "torch" in seconds:
        ratios = [t / j for j, t in zip(seconds["jax"], seconds["torch"])]
        print("per-round ratios: " + " ".join(f"{r:.2f}" for r in ratios))
        print(f"jax / torch throughput ratio: {float(np.median(ratios)):.2f}")
    print(f"loadavg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
