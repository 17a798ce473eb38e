"""Decode throughput of the KV-cache sampler, side by side with ``transformers`` ``generate``.

For each model (``tiny`` random init, ``smollm2`` = SmolLM2-135M-Instruct from its GGUF) and
batch size, both engines decode greedily from the same weights (exported with
``save_hf_checkpoint`` and read back by ``transformers``) and the same equal-length prompts,
without eos, so every row generates exactly the requested tokens.

Decode tokens/s is measured as  B * (n_long - n_short) / (t(n_long) - t(n_short)):  two runs
that differ only in the number of new tokens, so prefill and dispatch cancel (n_short and
n_long share one step bucket, hence one compiled program). End-to-end tokens/s (prefill
included) is B * n_long / t(n_long).

Memory-bandwidth bound of one decode step (``--bandwidth-gbs``):
    t_step >= (weight bytes + B * KV bytes per row) / bandwidth,
with KV bytes per row = 2 * layers * kv_heads * head_dim * cache bytes * slots read. The
sampler attends over every slot of its cache (``slots = cache length``), ``transformers`` over
the filled part only; the bound printed uses the sampler's slots.

    python -m bench.sampler_throughput                       # CPU, tiny + smollm2, B = 1, 8, 32
    python -m bench.sampler_throughput --models smollm2 --batch-sizes 1,64,256 \
        --bandwidth-gbs 3350 --skip-hf                       # e.g. one H100 (HBM3)
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

from spear_jax.model import get_model_config, init_model
from spear_jax.model.gguf_checkpoint import load_smollm2
from spear_jax.model.hf_checkpoint import save_hf_checkpoint
from spear_jax.sampling import Sampler, SamplingParams
from spear_jax.sampling.sampler import length_bucket


def build_model(name: str, compute_dtype: str):
    if name == "tiny":
        cfg = get_model_config("tiny", compute_dtype=compute_dtype)
        graphdef, state = nnx.split(init_model(cfg, 0))
        return cfg, graphdef, state
    if name == "smollm2":
        return load_smollm2(compute_dtype=compute_dtype)
    raise ValueError(f"unknown model {name!r}; choose from tiny, smollm2")


def load_transformers(cfg, state, device: str):
    import torch
    import transformers

    directory = tempfile.mkdtemp(prefix="sampler_bench_")
    save_hf_checkpoint(cfg, state, directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval().to(device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def jax_runner(sampler, prompts, new_tokens):
    params = SamplingParams(greedy=True, max_new_tokens=new_tokens)

    def run():
        out = sampler.generate(prompts, params, jax.random.key(0))
        assert all(len(g.tokens) == new_tokens for g in out)
        return np.stack([g.tokens for g in out])

    return run


def hf_runner(model, prompts, new_tokens, device):
    import torch

    ids = torch.tensor(np.asarray(prompts), dtype=torch.long, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids))

    def run():
        with torch.inference_mode():
            return model.generate(ids, **kwargs)[:, ids.shape[1]:].cpu().numpy()

    return run


def best_times(run_short, run_long, repeats):
    """(first-call seconds of run_short, best short seconds, best long seconds, long output);
    short and long runs alternate so that both see the same machine load."""
    start = time.perf_counter()
    run_short()
    first = time.perf_counter() - start
    out = run_long()
    best_short = best_long = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run_short()
        best_short = min(best_short, time.perf_counter() - start)
        start = time.perf_counter()
        out = run_long()
        best_long = min(best_long, time.perf_counter() - start)
    return first, best_short, best_long, out


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
                          cache_dtype=jnp.dtype(args.cache_dtype))
        for batch in batch_sizes:
            first, best = session_seconds(sampler, batch, args.prompt_len, args.session_turns,
                                          args.session_obs_len, args.new_tokens, args.repeats)
            generated = batch * args.session_turns * args.new_tokens
            print(f"session model={name} batch={batch} max_len={args.session_max_len} "
                  f"prompt={args.prompt_len} turns={args.session_turns} obs={args.session_obs_len} "
                  f"new_tokens={args.new_tokens} first_call_s={first:.3g} best_s={best:.4g} "
                  f"tok_s={generated / best:.4g} load_avg_1m={os.getloadavg()[0]:.3g}", flush=True)


def bandwidth_bound_tokens_per_s(cfg, batch, slots, cache_bytes, bandwidth_gbs):
    weight_bytes = cfg.num_params() * jnp.dtype(cfg.param_dtype).itemsize
    kv_bytes_per_row = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache_bytes * slots
    step_seconds = (weight_bytes + batch * kv_bytes_per_row) / (bandwidth_gbs * 1e9)
    return batch / step_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="n_long; n_short = n_long / 2 + 1 (same step bucket)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed runs")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--cache-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="device memory bandwidth in GB/s, for the decode bound")
    parser.add_argument("--skip-hf", action="store_true", help="only the JAX sampler")
    parser.add_argument("--hf-device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); on a CPU shared "
                             "with other jobs, 1 avoids oversubscription stalls")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
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

    n_long = args.new_tokens
    n_short = n_long // 2 + 1
    if length_bucket(n_short) != length_bucket(n_long):
        raise ValueError(f"--new-tokens {n_long} must be a power of two >= 32 (one step bucket)")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.torch_threads and not args.skip_hf:
        import torch

        torch.set_num_threads(args.torch_threads)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"load average at start {os.getloadavg()}")
    rows = []
    for name in args.models.split(","):
        cfg, graphdef, state = build_model(name, args.compute_dtype)
        max_len = args.prompt_len + n_long
        sampler = Sampler(graphdef, state, cfg, max_len=max_len, max_batch=max(batch_sizes),
                          cache_dtype=jnp.dtype(args.cache_dtype))
        slots = min(max_len, length_bucket(args.prompt_len) + length_bucket(n_long))
        hf_model = None if args.skip_hf else load_transformers(cfg, state, args.hf_device)
        rng = np.random.default_rng(0)
        for batch in batch_sizes:
            prompts = rng.integers(0, cfg.vocab_size, size=(batch, args.prompt_len)).tolist()
            first_call, t_short, t_long, jax_tokens = best_times(
                jax_runner(sampler, prompts, n_short), jax_runner(sampler, prompts, n_long), args.repeats)
            row = dict(model=name, batch=batch, prompt_len=args.prompt_len, new_tokens=n_long,
                       jax_decode_tok_s=batch * (n_long - n_short) / (t_long - t_short),
                       jax_e2e_tok_s=batch * n_long / t_long, jax_first_call_s=first_call,
                       load_avg_1m=os.getloadavg()[0])
            if hf_model is not None:
                _, h_short, h_long, hf_tokens = best_times(
                    hf_runner(hf_model, prompts, n_short, args.hf_device),
                    hf_runner(hf_model, prompts, n_long, args.hf_device), args.repeats)
                row.update(hf_decode_tok_s=batch * (n_long - n_short) / (h_long - h_short),
                           hf_e2e_tok_s=batch * n_long / h_long,
                           greedy_agreement=float(np.mean(jax_tokens == hf_tokens)))
                row["decode_speedup"] = row["jax_decode_tok_s"] / row["hf_decode_tok_s"]
                row["e2e_speedup"] = row["jax_e2e_tok_s"] / row["hf_e2e_tok_s"]
            if args.bandwidth_gbs:
                row["bound_tok_s"] = bandwidth_bound_tokens_per_s(
                    cfg, batch, slots, jnp.dtype(args.cache_dtype).itemsize, args.bandwidth_gbs)
            rows.append(row)
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    print(f"load average at end {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
