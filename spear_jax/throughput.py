"""Per-step throughput: decode and update tokens/s and model-FLOPs utilisation (MFU).

Model FLOPs (PaLM convention, rematerialisation not counted), with N_matmul every matmul weight
(output projection included), L layers, q = heads x head_dim:

    training (forward + backward) per token at sequence length S:  6 N_matmul + 6 L S q
    the same with frozen weights (LoRA: no weight gradients):       4 N_matmul + 6 L S q
    decode (forward) per generated token attending to T slots:     2 N_touched + 4 L T q

(N_touched: every weight a decoded token multiplies with; an untied input embedding is only
gathered.) The trainer logs, per step:

    perf/decode_tokens_per_s  = generated tokens / sampler time (rollout/sampler_time_s)
    perf/decode_mfu           = decode FLOPs / sampler time / peak
    perf/update_tokens_per_s  = real tokens through the on-policy update (x ppo_epochs) / time/update
    perf/update_mfu           = training FLOPs at the batch's padded length / time/update / peak

A decoded row's T is taken as its whole length (prompt + response), an upper bound that counts
each token as attending to the full row. The peak is ``logging.peak_flops`` per device times the
device count, or, with 0, a float32 matmul measured once at start (``matmul_peak_flops``): on the
CPU backend the simulated devices share the host's cores, so the measurement is the whole peak;
elsewhere it is per device and multiplied by the device count. Prefill, log-prob recomputation
and replay updates are not in these figures (their times are ``time/prepare``, ``time/replay``).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MATMUL_SIZE = 2048  # side of the square float32 matmul measured for the peak


def train_flops_per_token(cfg, seq_len: int, frozen_weights: bool = False) -> float:
    """6 N_matmul + 6 L S q: forward + backward FLOPs of one token in a sequence of ``seq_len``;
    with ``frozen_weights`` (LoRA) 4 N_matmul, the weight gradients not being computed (the
    adapters' own FLOPs, a rank / width fraction, are not counted)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    n_matmul = cfg.num_layers * per_layer + d * v
    return (4 if frozen_weights else 6) * n_matmul + 6 * cfg.num_layers * seq_len * q


def params_touched_per_token(cfg) -> int:
    """Weights every decoded token multiplies with: all of them, the LM head included; an untied
    input embedding is only gathered (one row)."""
    return cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)


def decode_flops_per_token(cfg, attended_slots: float) -> float:
    """2 * params touched + 4 * layers * heads * head_dim * attended slots (q k^T and p v)."""
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * attended_slots
    return 2 * params_touched_per_token(cfg) + attention


def time_fn(fn: Callable[[], object], steps: int, warmup: bool = True) -> float:
    """Mean seconds of ``fn()`` over ``steps`` calls, after one warm-up (compile) call unless
    ``warmup`` is False."""
    if warmup:
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def matmul_peak_flops(n: int = MATMUL_SIZE) -> float:
    """FLOP/s of an ``n x n`` float32 matmul under XLA on the default device (2 n^3 per call)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    return 2 * n**3 / time_fn(lambda: mm(a).block_until_ready(), 5)


def run_peak_flops(peak_flops_per_device: float, backend: str, num_devices: int,
                   measure: Callable[[], float] = matmul_peak_flops) -> float:
    """The whole run's peak FLOP/s (module docstring): given per device, or measured."""
    if peak_flops_per_device > 0:
        return peak_flops_per_device * num_devices
    measured = measure()
    return measured if backend == "cpu" else measured * num_devices


def decode_metrics(cfg, prompt_lengths: Sequence[int], response_lengths: Sequence[int],
                   generated: Sequence[int], seconds: float, peak: float) -> dict[str, float]:
    """Decode throughput of one rollout: rows' prompt / response lengths and generated (model)
    tokens [n]; ``seconds`` the sampler time. Empty when nothing was timed."""
    tokens = float(np.sum(generated))
    if seconds <= 0 or tokens == 0:
        return {}
    rows = zip(prompt_lengths, response_lengths, generated)
    flops = sum(decode_flops_per_token(cfg, p + r) * g for p, r, g in rows)
    return {"perf/decode_tokens": tokens, "perf/decode_tokens_per_s": tokens / seconds,
            "perf/decode_mfu": flops / seconds / peak}


def update_metrics(cfg, valid: np.ndarray, epochs: int, seconds: float, peak: float,
                   frozen_weights: bool = False) -> dict[str, float]:
    """Update throughput: ``valid`` [B, L] the real tokens of the batch, passed ``epochs`` times
    through forward + backward in ``seconds`` (``frozen_weights``: LoRA)."""
    tokens = float(valid.sum()) * epochs
    if seconds <= 0 or tokens == 0:
        return {}
    flops = train_flops_per_token(cfg, valid.shape[1], frozen_weights) * tokens
    return {"perf/update_tokens": tokens, "perf/update_tokens_per_s": tokens / seconds,
            "perf/update_mfu": flops / seconds / peak}


def step_metrics(cfg, rows: Sequence, valid: np.ndarray, epochs: int, decode_seconds: float,
                 update_seconds: float, peak: float, frozen_weights: bool) -> dict[str, float]:
    """``perf/*`` of one RL step: the rollout's ``rows`` (generated tokens: rollout loss mask 1)
    over the sampler's time, and the on-policy batch's real tokens ``valid`` [B, L] over the
    update's time (``frozen_weights``: LoRA trains adapters only)."""
    metrics = decode_metrics(cfg, [r.prompt_ids.shape[0] for r in rows], [r.response_length for r in rows],
                             [int(r.loss_mask.sum()) for r in rows], decode_seconds, peak)
    metrics.update(update_metrics(cfg, valid, epochs, update_seconds, peak, frozen_weights))
    metrics["perf/peak_flops"] = peak
    return metrics
