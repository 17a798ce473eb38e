"""Decode tokens/s of a scanned deep model with ``decode_layers="auto"`` (a layer scan: the decode
step's on CPU, the model's ``forward_last`` elsewhere, ``decode.decode_step_form``) against
``"unrolled"`` (the per-layer step unrolled), in one process, the two samplers' calls alternated.

    python -m bench.decode_layers                                  # SmolLM2-135M shapes, B = 1, 8, 32
    python -m bench.decode_layers --preset tiny --num_layers 6 --batch_sizes 4 --new_tokens 8

Both samplers hold the same random weights (the weight layout does not depend on the decode
program). Per batch size, each round calls ``generate`` (greedy, ``--prompt_len`` random prompt
tokens) once with ``--short_tokens`` and once with ``--new_tokens`` on each sampler, the
samplers taking turns (their order reversed in odd rounds: ``bench.sampler_throughput.best_times``);
decode tokens/s is batch x (new - short) / (best long call - best short call) over ``--rounds``
rounds (``decode_rate``; NaN when the long call was not measurably slower), so prefill and call
overhead cancel and the machine's drift hits both samplers alike. First-call
seconds (the two programs' compiles and first runs) are printed per sampler. One line per batch:

    batch=<B> auto_tok_s=<x> unrolled_tok_s=<y> speedup=<y / x> same_tokens=<True|False>
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import numpy as np
from flax import nnx

from bench.sampler_throughput import best_times, decode_rate
from spear_jax.model import get_model_config, init_model
from spear_jax.sampling import Sampler, SamplingParams
from spear_jax.sampling.decode import decode_step_form


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--num_layers", type=int, default=0, help="override the preset's depth (0: keep)")
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=40)
    parser.add_argument("--short_tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if not 0 < args.short_tokens < args.new_tokens:
        parser.error("need 0 < --short_tokens < --new_tokens")
    return args


def greedy_tokens(sampler: Sampler, prompts, new_tokens: int) -> list[list[int]]:
    """The generated token lists of one greedy ``generate`` call."""
    out = sampler.generate(prompts, SamplingParams(greedy=True, max_new_tokens=new_tokens), jax.random.key(0))
    return [o.tokens.tolist() for o in out]


def compare(cfg, graphdef, state, batch: int, args) -> dict[str, float | bool]:
    """Decode tokens/s of both samplers at one batch size (``best_times``: alternated rounds,
    best calls)."""
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, args.prompt_len)).tolist()
    engines = {}
    for layers in ("auto", "unrolled"):
        sampler = Sampler(graphdef, state, cfg, max_len=args.prompt_len + args.new_tokens,
                          max_batch=batch, decode_layers=layers)
        engines[layers] = tuple(functools.partial(greedy_tokens, sampler, prompts, n)
                                for n in (args.short_tokens, args.new_tokens))
        start = time.perf_counter()
        for run in engines[layers]:
            run()
        print(f"batch={batch} {layers}: first calls {time.perf_counter() - start:.1f} s", flush=True)
    times = best_times(engines, args.rounds)
    rate = {layers: decode_rate(batch, args.new_tokens, args.short_tokens, t_long, t_short)
            for layers, (_, t_short, t_long, _) in times.items()}
    return dict(auto=rate["auto"], unrolled=rate["unrolled"], same=times["auto"][3] == times["unrolled"][3])


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = get_model_config(args.preset)
    if args.num_layers:
        cfg = dataclasses.replace(cfg, num_layers=args.num_layers)
    if decode_step_form(cfg, None, "auto") == "unrolled":
        raise SystemExit(f"{args.preset} with {cfg.num_layers} layers (scan_layers={cfg.scan_layers}) "
                         f"decodes with the per-layer step under 'auto' too: use a scanned model of "
                         f"more layers (--num_layers)")
    graphdef, state = nnx.split(init_model(cfg, 0))
    print(f"preset={args.preset} layers={cfg.num_layers} scan_layers={cfg.scan_layers} "
          f"devices={jax.device_count()} ({jax.devices()[0].platform})", flush=True)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        r = compare(cfg, graphdef, state, batch, args)
        print(f"batch={batch} auto_tok_s={r['auto']:.1f} unrolled_tok_s={r['unrolled']:.1f} "
              f"speedup={r['unrolled'] / r['auto']:.3f} same_tokens={r['same']}", flush=True)


if __name__ == "__main__":
    main()
