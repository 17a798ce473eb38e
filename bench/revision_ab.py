"""The sampler's speed at another revision of this repository against the working tree's, in one
process.

    python -m bench.revision_ab --base 9642fc7                     # tiny, B = 32, 128 greedy tokens
    python -m bench.revision_ab --base 9642fc7 --batch-sizes 8,32 --temperature 0.7
    python -m bench.revision_ab --base cfe2165 --temperature 1.0 --top-p 0.6     # nucleus draws
    python -m bench.revision_ab --base beb3917 --models smollm2-135m --new-tokens 32 \
        --decode-layers unrolled

The base revision's ``spear_jax`` package is extracted with ``git archive`` into a temporary
directory as the package ``spear_jax_base`` (every ``spear_jax`` name in its sources renamed),
so that both versions import side by side. Each builds its model preset from seed 0 (the same
random weights while the initialisation is unchanged) and a ``Sampler`` over it, and both
decode the same random prompts. Per batch size, after one compiling call of each, ``--rounds``
rounds time one whole ``generate`` call of each, prefill included (greedy, or drawn at
``--temperature``, truncated by ``--top-k`` and ``--top-p`` when given). The two take turns
and reverse the order in odd rounds (``bench.model_throughput.alternate``), so a slow spell of
a shared machine falls on both. Each jitted program is traced from its own package: two
``jax.jit``s of one Python function share jax's trace cache and would time one program twice. One line per batch size:

    batch=<B> base_s=<median seconds> head_s=<median seconds> speedup=<median of per-round
        base / head> rounds=<per-round ratios> same_tokens=<True|False>

``same_tokens`` compares the two revisions' tokens; a change in the order in which a draw walks
the vocabulary changes them while keeping the distribution.

Read the speedup, not the two medians: when the machine drifts from round to round the
medians of the seconds can even point the other way (each side's median comes from a
different round), while each ratio compares two calls made back to back.
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

from bench.model_throughput import alternate
from bench.sampler_throughput import add_truncation_arguments, check_truncation, sampling_kwargs
from spear_jax.sampling.decode import DECODE_LAYERS

BASE_PACKAGE = "spear_jax_base"
REPO = pathlib.Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against (a commit, tag or branch)")
    parser.add_argument("--models", default="tiny", help="model preset (random weights)")
    parser.add_argument("--batch-sizes", default="32")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    add_truncation_arguments(parser)
    parser.add_argument("--decode-layers", default="auto", choices=DECODE_LAYERS)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1 or args.temperature < 0:
        parser.error("need --rounds >= 1, --new-tokens >= 1 and --temperature >= 0")
    check_truncation(parser, args)
    return args


def extract_base(revision: str, into: pathlib.Path) -> None:
    """``spear_jax`` at ``revision`` as the package ``BASE_PACKAGE`` under ``into`` (its own
    imports renamed). Exits with git's message when the revision does not exist."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "spear_jax"],
                                 capture_output=True)
    except FileNotFoundError:
        raise SystemExit("bench.revision_ab needs git on PATH (it extracts --base with git archive)") from None
    if archive.returncode != 0:
        raise SystemExit(f"--base {revision!r}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "spear_jax").rename(into / BASE_PACKAGE)
    for path in (into / BASE_PACKAGE).rglob("*.py"):
        path.write_text(re.sub(r"\bspear_jax\b", BASE_PACKAGE, path.read_text()))


def forget_base_package() -> None:
    """Drop ``BASE_PACKAGE`` and its modules from ``sys.modules`` (their files are gone with the
    temporary directory), so that a later call imports its own revision."""
    for name in [m for m in sys.modules if m == BASE_PACKAGE or m.startswith(BASE_PACKAGE + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def make_sampler(package: str, args, max_batch: int):
    """(sampler, sampling params, vocabulary size) from ``package``'s model and sampling modules."""
    model = importlib.import_module(f"{package}.model")
    sampling = importlib.import_module(f"{package}.sampling")
    cfg = model.get_model_config(args.models)
    graphdef, state = nnx.split(model.init_model(cfg, 0))
    sampler = sampling.Sampler(graphdef, state, cfg, max_len=args.prompt_len + args.new_tokens,
                               max_batch=max_batch, decode_layers=args.decode_layers)
    params = sampling.SamplingParams(**sampling_kwargs(args.new_tokens, args.temperature, args.top_p, args.top_k))
    return sampler, params, cfg.vocab_size


def compare(samplers: dict, prompts, rounds: int) -> dict:
    """Per-round seconds of one ``generate`` call of each sampler, and their tokens."""
    tokens = {}

    def call(name):
        sampler, params, _ = samplers[name]

        def run():
            tokens[name] = [g.tokens.tolist() for g in sampler.generate(prompts, params, jax.random.key(0))]

        return run

    seconds = alternate({name: call(name) for name in samplers}, steps=1, rounds=rounds)
    return dict(seconds=seconds, same=tokens["base"] == tokens["head"])


def main(argv=None) -> None:
    args = parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="revision_ab_") as directory:
        extract_base(args.base, pathlib.Path(directory))
        sys.path.insert(0, directory)
        try:
            print(f"base={args.base} head=working tree model={args.models} new_tokens={args.new_tokens} "
                  f"temperature={args.temperature} top_p={args.top_p} top_k={args.top_k} "
                  f"decode_layers={args.decode_layers} "
                  f"devices={jax.device_count()} ({jax.devices()[0].platform})", flush=True)
            for batch in batches:
                samplers = {"base": make_sampler(BASE_PACKAGE, args, batch), "head": make_sampler("spear_jax", args, batch)}
                vocab = samplers["head"][2]
                prompts = np.random.default_rng(0).integers(0, vocab, size=(batch, args.prompt_len)).tolist()
                r = compare(samplers, prompts, args.rounds)
                base, head = np.asarray(r["seconds"]["base"]), np.asarray(r["seconds"]["head"])
                ratios = base / head
                print(f"batch={batch} base_s={np.median(base):.4f} head_s={np.median(head):.4f} "
                      f"speedup={np.median(ratios):.3f} rounds={','.join(f'{x:.2f}' for x in ratios)} "
                      f"same_tokens={r['same']}", flush=True)
        finally:
            sys.path.remove(directory)
            forget_base_package()


if __name__ == "__main__":
    main()
