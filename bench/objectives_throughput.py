"""Throughput of the per-micro-batch objective (loss + gradient w.r.t. log-probs).

Times ``jax.jit(jax.value_and_grad(policy_objective))`` for each policy loss on a few micro-batch
shapes, next to an eager torch implementation of the same per-token formulas (spec 2.2 / 3e, the
way the reference computes them: boolean indexing and ``randperm`` for Clip-Cov) when torch is
installed. The objective itself is a tiny fraction of a train step (the model forward/backward
dominates); the figure that matters is that Clip-Cov's static-shape selection (``top_k`` over the
micro-batch) does not cost more than the reference's dynamic indexing.

    python -m bench.objectives_throughput [--repeats 20] [--torch-threads 1]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from spear_jax.objectives import AggregationConfig, ObjectiveConfig, PolicyLossConfig, policy_objective

SHAPES = [(8, 512), (64, 512), (4, 4096)]
MODES = ["vanilla", "clip_cov", "kl_cov"]


def inputs(rows, length, seed=0):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 1.0, (rows, length)).astype(np.float32)
    logp = (old + rng.normal(0.0, 0.3, (rows, length))).astype(np.float32)
    adv = np.repeat(rng.normal(0.0, 3.0, (rows, 1)), length, axis=1).astype(np.float32)
    mask = (rng.random((rows, length)) < 0.9).astype(np.float32)
    return logp, old, adv, mask


def time_calls(fn, repeats):
    fn()  # compile / warm up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def jax_case(mode, arrays, repeats):
    cfg = ObjectiveConfig(
        PolicyLossConfig(mode, eps_high=0.28, clip_cov_ratio=0.02, clip_cov_lb=0.5, clip_cov_ub=8.0,
                         kl_cov_ratio=0.02),
        AggregationConfig("seq-mean-token-sum-norm", norm_length=arrays[0].shape[1]),
    )
    step = jax.jit(jax.value_and_grad(
        lambda lp, o, a, m, k: policy_objective(cfg, logp=lp, old_logp=o, advantages=a, mask=m, key=k)[0]))
    args = [jnp.asarray(x) for x in arrays]
    key = jax.random.key(0)
    compile_start = time.perf_counter()
    jax.block_until_ready(step(*args, key))
    compile_s = time.perf_counter() - compile_start
    seconds = time_calls(lambda: jax.block_until_ready(step(*args, key)), repeats)
    return seconds, compile_s


def torch_case(mode, arrays, repeats):
    import torch

    logp0, old, adv, mask = (torch.from_numpy(x) for x in arrays)
    t_max = logp0.shape[1]

    def loss_fn(logp):
        lr = logp - old
        if mode == "vanilla":
            lr = lr.clamp(-20, 20)
        ratio = torch.exp(lr)
        l1 = -adv * ratio
        l2 = -adv * ratio.clamp(0.8, 1.28)
        if mode == "vanilla":
            lc = torch.maximum(l1, l2)
            loss = torch.where(adv < 0, torch.minimum(lc, -adv * 10.0), lc)
        else:
            valid = mask > 0
            cov = (adv - adv[valid].mean()) * (logp - logp.detach()[valid].mean())
            if mode == "clip_cov":
                cov = cov.masked_fill(~valid | ((l2 > l1) & valid), -torch.inf)
                k = max(int(0.02 * valid.sum().item()), 1)
                cand = torch.nonzero((cov > 0.5) & (cov < 8.0) & valid)
                corr = torch.ones_like(adv)
                if len(cand):
                    pick = cand[torch.randperm(len(cand))[: min(k, len(cand))]]
                    corr[pick[:, 0], pick[:, 1]] = 0
                loss = torch.maximum(l1, l2) * corr
            else:
                loss = l1.clone()
                flat = torch.nonzero(valid.reshape(-1)).squeeze(-1)
                k = max(int(0.02 * len(flat)), 1)
                top = flat[torch.topk(cov.reshape(-1)[flat], k).indices]
                loss.view(-1)[top] += 0.1 * lr.abs().view(-1)[top]
        return (loss * mask).sum() / t_max / logp.shape[0]

    def step():
        logp = logp0.clone().requires_grad_(True)
        loss_fn(logp).backward()
        return logp.grad

    return time_calls(step, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (more oversubscribes a small shared CPU)")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(args.torch_threads)
        have_torch = True
    except ImportError:
        have_torch = False
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; tokens/s = rows*T / time per call")
    print(f"{'mode':9s} {'shape':>10s} {'jax ms':>8s} {'jax Mtok/s':>10s} {'compile s':>9s}"
          + (f" {'torch ms':>9s} {'torch Mtok/s':>12s}" if have_torch else ""))
    for rows, length in SHAPES:
        arrays = inputs(rows, length)
        for mode in MODES:
            seconds, compile_s = jax_case(mode, arrays, args.repeats)
            line = (f"{mode:9s} {f'{rows}x{length}':>10s} {seconds * 1e3:8.2f} "
                    f"{rows * length / seconds / 1e6:10.2f} {compile_s:9.2f}")
            if have_torch:
                t = torch_case(mode, arrays, args.repeats)
                line += f" {t * 1e3:9.2f} {rows * length / t / 1e6:12.2f}"
            print(line)


if __name__ == "__main__":
    main()
