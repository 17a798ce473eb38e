"""Decode tokens/s of the decode step's two forms, ``decode_layers="scanned"`` (a layer scan over
weights stacked over the layers: a compile time independent of the depth, each layer's weights
copied out of the stack every step) against ``"unrolled"`` (one traced step per layer), in one
process, the two samplers' calls alternated, and the decode steps after which the unrolled
program has paid back its longer compile (the measurement behind ``decode.decode_step_form``'s
choice of the unrolled form on CPU).

    python -m bench.decode_layers                                  # SmolLM2-135M shapes, B = 1, 8, 32
    python -m bench.decode_layers --preset tiny --num_layers 6 --batch_sizes 4 --new_tokens 8

Both samplers hold the same random weights (the weight layout does not depend on the decode
program). Per batch size, each round calls ``generate`` (greedy, ``--prompt_len`` random prompt
tokens) once with ``--short_tokens`` and once with ``--new_tokens`` on each sampler, the
samplers taking turns (their order reversed in odd rounds: ``bench.sampler_throughput.best_times``);
decode tokens/s is batch x (new - short) / (best long call - best short call) over ``--rounds``
rounds (``decode_rate``; NaN when the long call was not measurably slower), so prefill and call
overhead cancel and the machine's drift hits both samplers alike. ``first_call_s``: each
sampler's first short call (its program's compile and one run; the unrolled form's first, so it
bears the process's one-time costs); ``breakeven_steps``: the
first-call difference over the per-step saving, batch / scanned_tok_s - batch / unrolled_tok_s
(inf where the unrolled form is not faster). One line per batch:

    batch=<B> scanned_tok_s=<x> unrolled_tok_s=<y> speedup=<y / x> scanned_first_call_s=<a>
    unrolled_first_call_s=<b> breakeven_steps=<n> same_tokens=<True|False>
"""
from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from bench.sampler_throughput import best_times, decode_rate
from spear_jax.model import get_model_config, init_model
from spear_jax.sampling import Sampler, SamplingParams


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


FORMS = ("unrolled", "scanned")  # unrolled first: its first call bears the process's one-time costs


def compare(cfg, graphdef, state, batch: int, args) -> dict:
    """Decode tokens/s and first-call seconds of both forms at one batch size (``best_times``:
    alternated rounds, best calls)."""
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, args.prompt_len)).tolist()
    engines = {}
    for form in FORMS:
        sampler = Sampler(graphdef, state, cfg, max_len=args.prompt_len + args.new_tokens,
                          max_batch=batch, decode_layers=form)
        engines[form] = tuple(functools.partial(greedy_tokens, sampler, prompts, n)
                              for n in (args.short_tokens, args.new_tokens))
    times = best_times(engines, args.rounds)  # first calls in FORMS' order
    first_call = {form: times[form][0] for form in FORMS}
    rate = {form: decode_rate(batch, args.new_tokens, args.short_tokens, t_long, t_short)
            for form, (_, t_short, t_long, _) in times.items()}
    return dict(rate=rate, first_call=first_call, same=times["scanned"][3] == times["unrolled"][3],
                breakeven=breakeven_steps(batch, rate, first_call))


def breakeven_steps(batch: int, rate: dict, first_call: dict) -> float:
    """Decode steps after which the unrolled form's longer first call is paid back:
    (first_call unrolled - scanned) / (batch / rate scanned - batch / rate unrolled); inf where
    the unrolled form is not faster per step, 0 where it is also not slower to start."""
    saving = batch / rate["scanned"] - batch / rate["unrolled"]
    extra = max(first_call["unrolled"] - first_call["scanned"], 0.0)
    if not saving > 0:
        return float("inf")
    return extra / saving


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = get_model_config(args.preset)
    if args.num_layers:
        cfg = dataclasses.replace(cfg, num_layers=args.num_layers)
    graphdef, state = nnx.split(init_model(cfg, 0))
    print(f"preset={args.preset} layers={cfg.num_layers} scan_layers={cfg.scan_layers} "
          f"devices={jax.device_count()} ({jax.devices()[0].platform})", flush=True)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        r = compare(cfg, graphdef, state, batch, args)
        rate, first = r["rate"], r["first_call"]
        print(f"batch={batch} scanned_tok_s={rate['scanned']:.1f} unrolled_tok_s={rate['unrolled']:.1f} "
              f"speedup={rate['unrolled'] / rate['scanned']:.3f} scanned_first_call_s={first['scanned']:.2f} "
              f"unrolled_first_call_s={first['unrolled']:.2f} breakeven_steps={r['breakeven']:.0f} "
              f"same_tokens={r['same']}", flush=True)


if __name__ == "__main__":
    main()
