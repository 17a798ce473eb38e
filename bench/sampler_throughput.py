"""Decode throughput of the KV-cache sampler, side by side with ``transformers`` ``generate``.

For each model (``smollm2`` = SmolLM2-135M-Instruct from its GGUF, or any model preset, e.g.
``tiny`` or ``qwen2.5-1.5b``, with random weights) and batch size, both engines decode greedily
from the same weights (exported with ``save_hf_checkpoint`` and read back by ``transformers``)
and the same equal-length prompts, without eos, so every row generates exactly the requested
tokens. With ``--temperature T`` > 0 both draw from softmax(logits / T) instead, as rollouts
do, truncated to ``--top-k`` and then ``--top-p`` where given (as evaluation at top-p 0.6 does);
``greedy_agreement`` is then NaN.

Decode tokens/s is measured as  B * (n_long - n_short) / (t(n_long) - t(n_short)):  two runs
that differ only in the number of new tokens, so prefill and dispatch cancel (n_short and
n_long share one step bucket, hence one compiled program). End-to-end tokens/s (prefill
included) is B * n_long / t(n_long).
Each time is the best of ``--repeats`` runs; a repeat runs the sampler's short and long runs and
then ``transformers``' (the other way round in odd repeats), so that a slow spell of a shared
machine falls on both engines.

Hardware roofs, measured at start on the JAX device:
    matmul roof    = GFLOP/s of a jitted float32 [1024, 1024] x [1024, 1024] matmul (peak), and
                     per (model, batch) of the LM-head-shaped [B, D] x [D, V] matmul;
    memory roof    = GB/s of a jitted sum over a ``--read-mib`` MiB float32 array (a pure read;
                     pick it well above the last-level cache: 256 MiB on CPU, 4096 on a GPU).
Work of one decode step at batch B, with S attended slots per row (the mean filled context
prompt + (n_short + n_long) / 2 for the FLOPs, the slots each engine reads for the bytes):
    FLOPs/token    = 2 * params touched per token (all weights incl. the LM head; an untied
                     input embedding is only gathered) + 4 * layers * heads * head_dim * S
    bytes/step     = weight bytes touched (in the sampler's ``--weight-dtype``)
                     + B * 2 * layers * kv_heads * head_dim * cache bytes * S
(the sampler reads its attention window, ``transformers`` its filled cache). Achieved GFLOP/s =
FLOPs/token * decode tok/s; achieved GB/s = bytes/step * decode tok/s / B; each is printed with
its fraction of the roof; the memory fraction is decode tokens/s as a fraction of the
memory-bandwidth bound B * read GB/s / bytes/step. Threads: XLA's CPU backend uses every core;
torch uses ``--torch-threads`` (default: torch's choice), printed at start. Each row also names
the sampler's ``decode_form`` (what ``--decode-layers`` resolved to on this platform: unrolled,
scanned, or None for the model's ``forward_last``).

    python -m bench.sampler_throughput                       # CPU, tiny + smollm2, B = 1, 8, 32
    python -m bench.sampler_throughput --models tiny --torch-threads 2   # torch on both cores
    # GPU: a 1.5B config in bfloat16 at batch 64, against the HBM bound
    python -m bench.sampler_throughput --models qwen2.5-1.5b --batch-sizes 1,64 --compute-dtype bfloat16 \
        --weight-dtype bfloat16 --cache-dtype bfloat16 --new-tokens 256 --read-mib 4096 --skip-hf --profile
    # sampled decoding (the rollouts' work) at temperature 0.7 instead of greedy:
    python -m bench.sampler_throughput --models tiny --temperature 0.7 --torch-threads 1
    # nucleus draws (the math preset's evaluation setting):
    python -m bench.sampler_throughput --models tiny --temperature 1.0 --top-p 0.6 --torch-threads 1
    # SmolLM2 (30 scanned layers; on CPU "auto" decodes it one layer at a time) with the decode
    # step's layer scan instead (rollout.decode_layers=scanned):
    python -m bench.sampler_throughput --models smollm2-135m --new-tokens 32 --decode-layers scanned
    # multi-turn sessions on a max_len 2048 cache (sampler only):
    python -m bench.sampler_throughput --session --models tiny --batch-sizes 8 --prompt-len 64 --new-tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.kernel_profile import kernel_summary
from spear_jax.model import get_model_config, init_model
from spear_jax.model.gguf_checkpoint import load_smollm2
from spear_jax.model.hf_checkpoint import save_hf_checkpoint
from spear_jax.sampling import Sampler, SamplingParams
from spear_jax.sampling.decode import DECODE_LAYERS
from spear_jax.sampling.sampler import length_bucket
from spear_jax.throughput import decode_flops_per_token as flops_per_token
from spear_jax.throughput import params_touched_per_token


def build_model(name: str, compute_dtype: str):
    """``smollm2``: the real SmolLM2-135M-Instruct; any other name: that preset, random weights."""
    if name == "smollm2":
        return load_smollm2(compute_dtype=compute_dtype)
    cfg = get_model_config(name, compute_dtype=compute_dtype)
    graphdef, state = nnx.split(init_model(cfg, 0))
    return cfg, graphdef, state


def load_transformers(cfg, state, device: str, dtype: str):
    import torch
    import transformers

    directory = tempfile.mkdtemp(prefix="sampler_bench_")
    save_hf_checkpoint(cfg, state, directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=getattr(torch, dtype)).eval().to(device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def add_truncation_arguments(parser: argparse.ArgumentParser) -> None:
    """--top-p and --top-k of the draws (this bench's and ``bench.revision_ab``'s)."""
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass of the draws (1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k of the draws (0: off)")


def check_truncation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with a usage error when --top-p or --top-k is given for greedy decoding."""
    if (args.top_p < 1.0 or args.top_k != 0) and args.temperature == 0:
        parser.error("--top-p and --top-k truncate draws: give --temperature > 0 with them")


def sampling_kwargs(new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> dict:
    """``SamplingParams`` fields: greedy at temperature 0, else a draw from softmax(logits /
    temperature), truncated to top_k then top_p, at every step (any revision's class takes them)."""
    if temperature == 0:
        return dict(greedy=True, max_new_tokens=new_tokens)
    return dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=new_tokens)


def jax_runner(sampler, prompts, new_tokens, temperature=0.0, top_p=1.0, top_k=0):
    """The sampler's call of ``sampling_kwargs``' draw."""
    params = SamplingParams(**sampling_kwargs(new_tokens, temperature, top_p, top_k))

    def run():
        out = sampler.generate(prompts, params, jax.random.key(0))
        assert all(len(g.tokens) == new_tokens for g in out)
        return np.stack([g.tokens for g in out])

    return run


def hf_runner(model, prompts, new_tokens, device, temperature=0.0, top_p=1.0, top_k=0):
    import torch

    ids = torch.tensor(np.asarray(prompts), dtype=torch.long, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids))
    if temperature > 0:  # the same distribution as the sampler's (top_k 0 and top_p 1: off)
        kwargs.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)

    def run():
        with torch.inference_mode():
            return model.generate(ids, **kwargs)[:, ids.shape[1]:].cpu().numpy()

    return run


def best_times(engines: dict, repeats: int) -> dict[str, tuple]:
    """{name: (first-call seconds of its short run, best short seconds, best long seconds, long
    output)} for ``engines`` {name: (run_short, run_long)}. Each repeat runs every engine's short
    and long run, the engines taking turns (their order reversed in odd repeats), so that all of
    them, and both lengths, see the same machine load."""
    first, best, out = {}, {}, {}
    for name, (run_short, run_long) in engines.items():
        start = time.perf_counter()
        run_short()
        first[name] = time.perf_counter() - start
        out[name] = run_long()
        best[name] = [float("inf"), float("inf")]
    for r in range(repeats):
        for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
            for i, run in enumerate(engines[name]):
                start = time.perf_counter()
                result = run()
                best[name][i] = min(best[name][i], time.perf_counter() - start)
            out[name] = result
    return {name: (first[name], *best[name], out[name]) for name in engines}


def decode_rate(batch: int, n_long: int, n_short: int, t_long: float, t_short: float) -> float:
    """Decode tokens/s from the difference of a long and a short run, batch * (n_long - n_short) /
    (t_long - t_short); NaN when the long run was not measurably slower (the decode steps between
    them took less than the timing noise: a loaded machine, or too few --new-tokens)."""
    if t_long <= t_short:
        return float("nan")
    return batch * (n_long - n_short) / (t_long - t_short)


def session_seconds(sampler, batch, prompt_len, turns, obs_len, new_tokens, repeats):
    """(first-call seconds, best seconds) of one multi-turn session on a fresh ``max_len`` cache:
    a prompt of ``prompt_len`` tokens, then ``turns`` turns of ``new_tokens`` greedy tokens, an
    observation of ``obs_len`` tokens before every turn after the first."""
    rng = np.random.default_rng(1)
    vocab = sampler.config.vocab_size
    params = SamplingParams(greedy=True, max_new_tokens=new_tokens)
    appended = [rng.integers(0, vocab, size=(batch, prompt_len if t == 0 else obs_len)).tolist()
                for t in range(turns)]

    def run():
        session = sampler.start_session(batch)
        for t, rows in enumerate(appended):
            gens = session.extend_and_generate(rows, params, jax.random.key(t))
        jax.block_until_ready(gens[0].tokens)
        return session.lengths()

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return first, best


def run_session_benchmark(args):
    """Multi-turn session rows: decode tokens/s over a persistent ``--session-max-len`` cache."""
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for name in args.models.split(","):
        cfg, graphdef, state = build_model(name, args.compute_dtype)
        sampler = Sampler(graphdef, state, cfg, max_len=args.session_max_len, max_batch=max(batch_sizes),
                          cache_dtype=jnp.dtype(args.cache_dtype), decode_layers=args.decode_layers)
        for batch in batch_sizes:
            first, best = session_seconds(sampler, batch, args.prompt_len, args.session_turns,
                                          args.session_obs_len, args.new_tokens, args.repeats)
            generated = batch * args.session_turns * args.new_tokens
            print(f"session model={name} batch={batch} max_len={args.session_max_len} "
                  f"prompt={args.prompt_len} turns={args.session_turns} obs={args.session_obs_len} "
                  f"new_tokens={args.new_tokens} first_call_s={first:.3g} best_s={best:.4g} "
                  f"tok_s={generated / best:.4g} load_avg_1m={os.getloadavg()[0]:.3g}", flush=True)


def _best_seconds(fn, *args, repeats=8):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(m: int, k: int, n: int) -> float:
    """Measured GFLOP/s of a jitted float32 [m, k] x [k, n] matmul (2 m k n FLOPs)."""
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    return 2 * m * k * n / _best_seconds(jax.jit(jnp.matmul), a, b) / 1e9


def read_gbs(mib: int) -> float:
    """Measured GB/s of a jitted sum over a float32 array of ``mib`` MiB (every byte read once)."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    return x.nbytes / _best_seconds(jax.jit(jnp.sum), x) / 1e9


def bytes_per_step(cfg, batch: int, read_slots: float, cache_bytes: int, weight_bytes: int) -> float:
    """Weight bytes touched once per step + every row's K and V over ``read_slots`` slots."""
    weights = params_touched_per_token(cfg) * weight_bytes
    kv_per_row = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache_bytes * read_slots
    return weights + batch * kv_per_row


def roof_columns(prefix, cfg, batch, tok_s, attended, read_slots, cache_bytes, weight_bytes, roofs):
    """Achieved GFLOP/s and GB/s of an engine decoding ``tok_s`` tokens/s, with roof fractions."""
    gflops = flops_per_token(cfg, attended) * tok_s / 1e9
    gbs = bytes_per_step(cfg, batch, read_slots, cache_bytes, weight_bytes) * tok_s / batch / 1e9
    return {f"{prefix}_gflops": gflops, f"{prefix}_peak_frac": gflops / roofs["peak_gflops"],
            f"{prefix}_shape_frac": gflops / roofs["shape_gflops"],
            f"{prefix}_gbs": gbs, f"{prefix}_mem_frac": gbs / roofs["read_gbs"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="n_long; n_short = n_long / 2 + 1 (same step bucket)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="best of this many timed runs, the sampler's and transformers' alternating")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--cache-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--weight-dtype", default="param", choices=("param", "float32", "bfloat16"),
                        help="the sampler's weight copy (param: the float32 master weights as they are)")
    parser.add_argument("--decode-layers", default="auto", choices=DECODE_LAYERS,
                        help="the sampler's decode_layers (unrolled: one step per layer at any depth)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (tokens compared with transformers'); > 0: both engines draw "
                             "from softmax(logits / T) (the rollouts' work)")
    add_truncation_arguments(parser)
    parser.add_argument("--read-mib", type=int, default=256, help="size of the memory-roof read")
    parser.add_argument("--skip-hf", action="store_true", help="only the JAX sampler")
    parser.add_argument("--hf-device", default="cpu")
    parser.add_argument("--hf-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); on a CPU shared "
                             "with other jobs, 1 avoids oversubscription stalls")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--profile", action="store_true",
                        help="also print the device kernels of one long run (bench.kernel_profile)")
    parser.add_argument("--session", action="store_true",
                        help="instead: multi-turn sessions on a persistent cache (sampler only)")
    parser.add_argument("--session-max-len", type=int, default=2048)
    parser.add_argument("--session-turns", type=int, default=3)
    parser.add_argument("--session-obs-len", type=int, default=16)
    args = parser.parse_args()
    if args.session:
        print(f"load average at start {os.getloadavg()}")
        run_session_benchmark(args)
        print(f"load average at end {os.getloadavg()}")
        return

    check_truncation(parser, args)
    n_long = args.new_tokens
    n_short = n_long // 2 + 1
    if length_bucket(n_short) != length_bucket(n_long):
        raise ValueError(f"--new-tokens {n_long} must be a power of two >= 32 (one step bucket)")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch_threads = None
    if not args.skip_hf:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        torch_threads = torch.get_num_threads()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"{os.cpu_count()} cores (XLA CPU uses all); torch threads {torch_threads}; "
          f"load average at start {os.getloadavg()}")
    peak = matmul_gflops(1024, 1024, 1024)
    read = read_gbs(args.read_mib)
    print(f"roofs: matmul {peak:.1f} GFLOP/s ([1024,1024]x[1024,1024] float32), "
          f"read {read:.1f} GB/s (sum over {args.read_mib} MiB)", flush=True)
    cache_bytes = jnp.dtype(args.cache_dtype).itemsize
    weight_dtype = None if args.weight_dtype == "param" else jnp.dtype(args.weight_dtype)
    hf_weight_bytes = jnp.dtype(args.hf_dtype).itemsize
    attended = args.prompt_len + (n_short + n_long) / 2  # mean filled context of the timed steps
    rows = []
    for name in args.models.split(","):
        cfg, graphdef, state = build_model(name, args.compute_dtype)
        max_len = args.prompt_len + n_long
        sampler = Sampler(graphdef, state, cfg, max_len=max_len, max_batch=max(batch_sizes),
                          cache_dtype=jnp.dtype(args.cache_dtype), weight_dtype=weight_dtype,
                          decode_layers=args.decode_layers)
        weight_bytes = (cfg.param_jnp_dtype if weight_dtype is None else weight_dtype).itemsize
        slots = min(max_len, length_bucket(args.prompt_len) + length_bucket(n_long))  # sampler window
        hf_model = None if args.skip_hf else load_transformers(cfg, state, args.hf_device, args.hf_dtype)
        rng = np.random.default_rng(0)
        for batch in batch_sizes:
            prompts = rng.integers(0, cfg.vocab_size, size=(batch, args.prompt_len)).tolist()
            t, draw = args.temperature, dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
            engines = {"jax": (jax_runner(sampler, prompts, n_short, **draw),
                               jax_runner(sampler, prompts, n_long, **draw))}
            if hf_model is not None:
                engines["hf"] = (hf_runner(hf_model, prompts, n_short, args.hf_device, **draw),
                                 hf_runner(hf_model, prompts, n_long, args.hf_device, **draw))
            times = best_times(engines, args.repeats)
            first_call, t_short, t_long, jax_tokens = times["jax"]
            roofs = dict(peak_gflops=peak, read_gbs=read, shape_gflops=matmul_gflops(
                batch, cfg.hidden_size, cfg.vocab_size))
            row = dict(model=name, batch=batch, decode_form=str(sampler.decode_form),
                       prompt_len=args.prompt_len, new_tokens=n_long, **draw,
                       jax_decode_tok_s=decode_rate(batch, n_long, n_short, t_long, t_short),
                       jax_e2e_tok_s=batch * n_long / t_long, jax_first_call_s=first_call,
                       load_avg_1m=os.getloadavg()[0], shape_roof_gflops=roofs["shape_gflops"])
            row.update(roof_columns("jax", cfg, batch, row["jax_decode_tok_s"], attended, slots,
                                    cache_bytes, weight_bytes, roofs))
            if hf_model is not None:
                _, h_short, h_long, hf_tokens = times["hf"]
                row.update(hf_decode_tok_s=decode_rate(batch, n_long, n_short, h_long, h_short),
                           hf_e2e_tok_s=batch * n_long / h_long,
                           greedy_agreement=float(np.mean(jax_tokens == hf_tokens)) if t == 0 else float("nan"))
                row["decode_speedup"] = row["jax_decode_tok_s"] / row["hf_decode_tok_s"]
                row["e2e_speedup"] = row["jax_e2e_tok_s"] / row["hf_e2e_tok_s"]
                row.update(roof_columns("hf", cfg, batch, row["hf_decode_tok_s"], attended, attended,
                                        hf_weight_bytes, hf_weight_bytes, roofs))
            rows.append(row)
            if args.profile:
                print(kernel_summary(jax_runner(sampler, prompts, n_long, **draw), per=n_long,
                                     label=f"profile model={name} batch={batch} steps={n_long}"), flush=True)
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
            if any(np.isnan(row.get(k, 0.0)) for k in ("jax_decode_tok_s", "hf_decode_tok_s")):
                print(f"  decode rate not resolved at batch={batch}: the {n_long}-token run was not slower than "
                      f"the {n_short}-token run; raise --new-tokens or --repeats, or measure on a quieter machine",
                      flush=True)
    print(f"load average at end {os.getloadavg()}")
    print(f"roofs at end: matmul {matmul_gflops(1024, 1024, 1024):.1f} GFLOP/s, "
          f"read {read_gbs(args.read_mib):.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
