"""The jitted update: log-probs, losses, exact micro-batch gradient accumulation, optax step.

A minibatch is a dict of arrays with a leading micro-batch axis, ``[n_micro, micro_bs, ...]``:

    tokens        [n, b, L] int32    prompt + response token ids
    valid         [n, b, L] bool     real tokens (padding False)
    loss_mask     [n, b, L] float    1 on the response tokens that are trained
    old_logprobs  [n, b, L] float32  behaviour log-probs aligned with ``tokens`` (0 off-mask)
    advantages    [n, b, L] float32  token advantages (A_i * loss_mask)
    row_valid     [n, b]    bool     real rows (False for batch padding)
    ref_logprobs  [n, b, L] float32  optional, only when the KL loss is on

One optimizer step per minibatch. For micro-batch j the objective returns a pair
``(S_j, N_j)`` (``spear_jax.objectives``); the minibatch loss and its gradient are

    loss = sum_j S_j / sum_j N_j,        grad = sum_j grad S_j / sum_j N_j,

which equal the full-minibatch values exactly (the normalisers do not depend on the params).
Then ``global-norm clip -> AdamW``. A non-finite loss or gradient leaves params and optimizer
state unchanged and reports ``skipped = 1``.

On-policy minibatches use ``policy_objective``; replay (SIL) minibatches use ``sil_objective``
with the SIL weight lambda(t) as a traced argument (no recompilation as it changes).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from spear_jax.model.logprobs import sequence_token_stats
from spear_jax.objectives import ObjectiveConfig, SILConfig, policy_objective, sil_objective
from spear_jax.objectives.aggregation import finalize

MINIBATCH_KEYS = ("tokens", "valid", "loss_mask", "old_logprobs", "advantages", "row_valid")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """Static options of the update (hashable: part of the jit cache key)."""

    objective: ObjectiveConfig
    sil: SILConfig
    temperature: float = 1.0
    logprob_chunk_size: int = 512


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-6
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    total_steps: int = 1
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and total_steps >= 1")


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping followed by AdamW with a (warmup +) constant/cosine LR."""
    if config.schedule == "constant":
        schedule = optax.constant_schedule(config.lr)
    else:
        schedule = optax.cosine_decay_schedule(config.lr, max(config.total_steps - config.warmup_steps, 1))
    if config.warmup_steps:
        warmup = optax.linear_schedule(0.0, config.lr, config.warmup_steps)
        schedule = optax.join_schedules([warmup, schedule], [config.warmup_steps])
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay),
    )


def check_minibatch(minibatch: dict[str, jax.Array]) -> tuple[int, int, int]:
    """Validates keys and shapes; returns (n_micro, micro_bs, L)."""
    missing = [k for k in MINIBATCH_KEYS if k not in minibatch]
    if missing:
        raise KeyError(f"minibatch is missing {missing}; required keys: {list(MINIBATCH_KEYS)}")
    n, b, length = minibatch["tokens"].shape
    for key in MINIBATCH_KEYS + (("ref_logprobs",) if "ref_logprobs" in minibatch else ()):
        want = (n, b) if key == "row_valid" else (n, b, length)
        if tuple(minibatch[key].shape) != want:
            raise ValueError(f"minibatch[{key!r}] has shape {tuple(minibatch[key].shape)}, expected {want}")
    return n, b, length


def _micro_batch_objective(graphdef, params, micro, key, sil_weight, config: UpdateConfig, replay: bool, mesh):
    """(S_j, N_j, metrics) of one micro-batch; differentiable in ``params``."""
    logp, entropy = sequence_token_stats(
        graphdef, params, micro["tokens"], micro["valid"], config.temperature, config.logprob_chunk_size
    )
    common = dict(entropy=entropy, row_valid=micro["row_valid"], mesh=mesh)
    if replay:
        return sil_objective(
            logp, micro["old_logprobs"], micro["advantages"], micro["loss_mask"],
            config.objective, config.sil, sil_weight, key, **common,
        )
    return policy_objective(
        logp, micro["old_logprobs"], micro["advantages"], micro["loss_mask"], config.objective, key,
        ref_logp=micro.get("ref_logprobs"), **common,
    )


def make_update_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                   config: UpdateConfig, replay: bool, mesh=None) -> Callable:
    """Returns ``update(params, opt_state, minibatch, key, sil_weight) -> (params, opt_state,
    metrics)``, jitted with params and optimizer state donated. ``mesh`` is needed only for the
    per-device Clip-Cov / KL-Cov selection scope."""

    def update(params, opt_state, minibatch, key, sil_weight):
        n_micro = minibatch["tokens"].shape[0]

        def accumulate(carry, inputs):
            grad_sum, loss_sum, norm_sum = carry
            micro, index = inputs
            micro_key = jax.random.fold_in(key, index)

            def objective(p):
                s, n, metrics = _micro_batch_objective(graphdef, p, micro, micro_key, sil_weight, config, replay, mesh)
                return s, (n, metrics)

            (s, (n, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(params)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, loss_sum + s, norm_sum + n), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.float32(0.0), jnp.float32(0.0))
        (grad_sum, loss_sum, norm_sum), micro_metrics = jax.lax.scan(
            accumulate, init, (minibatch, jnp.arange(n_micro))
        )
        safe_norm = jnp.where(norm_sum > 0, norm_sum, 1.0)
        grads = jax.tree.map(lambda g: jnp.where(norm_sum > 0, g / safe_norm, 0.0), grad_sum)
        loss = finalize(loss_sum, norm_sum)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        metrics = {name: jnp.mean(value) for name, value in micro_metrics.items()}
        metrics.update(loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    return jax.jit(update, donate_argnums=(0, 1))


def make_token_stats_fn(graphdef: nnx.GraphDef, temperature: float, chunk_size: int) -> Callable:
    """Jitted ``(params, tokens [B, L], valid [B, L]) -> (logprobs, entropy)``: the pre-update
    recomputation of behaviour log-probs (reference step 4) and the entropy metric."""

    def stats(params, tokens, valid):
        return sequence_token_stats(graphdef, params, tokens, valid, temperature, chunk_size)

    return jax.jit(stats)
