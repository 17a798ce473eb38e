"""The jitted update: log-probs, losses, exact micro-batch gradient accumulation, optax step.

A minibatch is a dict of arrays with a leading micro-batch axis, ``[n_micro, micro_bs, ...]``:

    tokens        [n, b, L] int32    prompt + response token ids
    valid         [n, b, L] bool     real tokens (padding False)
    loss_mask     [n, b, L] float    1 on the response tokens that are trained
    old_logprobs  [n, b, L] float32  behaviour log-probs aligned with ``tokens`` (0 off-mask)
    advantages    [n, b, L] float32  token advantages (A_i * loss_mask)
    row_valid     [n, b]    bool     real rows (False for batch padding)
    ...           [n, b] or [n, b, L] the extra arrays the configured loss terms declare
                                     (``ref_logprobs`` for the KL term; ``batch_keys``)

One optimizer step per minibatch. For micro-batch j the objective returns a pair
``(S_j, N_j)`` (``spear_jax.objectives``); the minibatch loss and its gradient are

    loss = sum_j S_j / sum_j N_j,        grad = sum_j grad S_j / sum_j N_j,

which equal the full-minibatch values exactly (the normalisers do not depend on the params).
Then ``global-norm clip -> AdamW``. For a LoRA state (``spear_jax.model.lora``) the gradient
is taken w.r.t. the adapters only, and the optimizer state covers only them. A non-finite loss
or gradient leaves params and optimizer state unchanged and reports ``skipped = 1``.

On-policy minibatches use ``policy_objective`` with the on-policy term list (the KL term's
aggregated value is reported as ``kl_loss``); replay (SIL) minibatches use ``sil_objective``
with the replay term list and the SIL weight lambda(t) as a traced argument (no recompilation
as it changes). Only scalar metrics are logged (token arrays such as ``cov_selected`` are for
direct callers of the objectives).

The learning rate follows ``OptimizerConfig.schedule_clock``: optax's update count, or a rate
the caller sets in the optimizer state (``set_learning_rate``; the RL trainer, once per RL step).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spear_jax import distributed
from spear_jax.batch_schema import UPDATE_FIELDS
from spear_jax.model.logprobs import selected_token_stats, sequence_token_stats
from spear_jax.model.lora import combine, split_trainable
from spear_jax.objectives import ObjectiveConfig, SILConfig, policy_objective, sil_objective
from spear_jax.objectives.aggregation import finalize
from spear_jax.objectives.terms import REFERENCE_INPUT, declared_inputs

MINIBATCH_KEYS = UPDATE_FIELDS  # declared in spear_jax.batch_schema
REFERENCE_KEY = REFERENCE_INPUT  # the reference policy's log-probs (the KL term's input)
SFT_KEYS = ("tokens", "valid", "loss_mask", "row_valid")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """Static options of the update (hashable: part of the jit cache key)."""

    objective: ObjectiveConfig
    sil: SILConfig
    temperature: float = 1.0
    logprob_chunk_size: int = 512
    logprob_positions: int = 0  # K > 0: logits at <= K loss-mask positions per row (_token_stats)


SCHEDULE_CLOCKS = ("update", "external")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a (warmup +) constant / cosine learning rate.

    ``schedule_clock`` says what advances the schedule: ``"update"``, optax's own count (one
    tick per optimizer update: the supervised warm start); ``"external"``, the caller, which sets
    the rate of the coming updates with :func:`set_learning_rate` (the RL trainer, once per RL
    step as the reference's scheduler). ``total_steps`` and ``warmup_steps`` count ticks of that
    clock.
    """

    lr: float = 1e-6
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    total_steps: int = 1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    schedule_clock: str = "update"  # update | external

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.schedule_clock not in SCHEDULE_CLOCKS:
            raise ValueError(f"schedule_clock must be one of {SCHEDULE_CLOCKS}, got {self.schedule_clock!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and total_steps >= 1")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """lr(s) for tick s = 0, 1, ...: linear warmup 0 -> lr over ``warmup_steps`` ticks, then
    constant, or cosine ``lr (1 + cos(pi (s - W) / (T - W))) / 2`` reaching 0 at s = T."""
    if config.schedule == "constant":
        schedule = optax.constant_schedule(config.lr)
    else:
        schedule = optax.cosine_decay_schedule(config.lr, max(config.total_steps - config.warmup_steps, 1))
    if config.warmup_steps:
        warmup = optax.linear_schedule(0.0, config.lr, config.warmup_steps)
        schedule = optax.join_schedules([warmup, schedule], [config.warmup_steps])
    return schedule


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping followed by AdamW at the rate of ``config``'s clock."""
    if config.schedule_clock == "update":
        adamw = optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.999, eps=1e-8,
                            weight_decay=config.weight_decay)
    else:
        adamw = optax.inject_hyperparams(optax.adamw)(
            learning_rate=config.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)


def init_optimizer_state(optimizer: optax.GradientTransformation, trainable, mesh):
    """``optimizer.init(trainable)`` computed on ``mesh`` with every per-parameter leaf of the
    state (AdamW's first and second moments) sharded like its parameter, and the other leaves
    (the step count, the injected learning rate) replicated; so an fsdp / tensor-sharded model's
    optimizer state is split like the model rather than held whole on every device."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def like_parameter(_, parameter):
        sharding = getattr(parameter, "sharding", None)
        on_mesh = isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh
        return sharding if on_mesh else replicated

    shardings = optax.tree_map_params(
        optimizer, like_parameter, jax.eval_shape(optimizer.init, trainable), trainable,
        transform_non_params=lambda subtree: jax.tree.map(lambda _: replicated, subtree))
    return jax.jit(optimizer.init, out_shardings=shardings)(trainable)


def set_learning_rate(opt_state, lr: float):
    """The state of a ``schedule_clock="external"`` optimizer with the rate of the coming
    updates set to ``lr`` (placed like the rate it replaces, so the jitted update sees one
    device set)."""
    clip_state, adamw_state = opt_state
    if "learning_rate" not in getattr(adamw_state, "hyperparams", {}):
        raise TypeError("set_learning_rate needs the state of an optimizer made with "
                        "OptimizerConfig(schedule_clock='external')")
    current = adamw_state.hyperparams["learning_rate"]
    rate = distributed.global_array(np.asarray(lr, current.dtype), current.sharding)
    return clip_state, adamw_state._replace(hyperparams={**adamw_state.hyperparams, "learning_rate": rate})


def _terms(config: UpdateConfig, replay: bool):
    return config.sil.terms if replay else config.objective.terms


def batch_keys(config: UpdateConfig, replay: bool) -> tuple[str, ...]:
    """The batch arrays the update reads: ``MINIBATCH_KEYS``, then the extra inputs the loss
    terms of the on-policy (``replay=False``) or replay objective declare (``ref_logprobs`` for
    the KL term, and whatever a registered term needs)."""
    extra = declared_inputs(_terms(config, replay))
    return MINIBATCH_KEYS + tuple(key for key in extra if key not in MINIBATCH_KEYS)


def check_minibatch(minibatch: dict[str, jax.Array],
                    keys: tuple[str, ...] = MINIBATCH_KEYS) -> tuple[int, int, int]:
    """Validates ``keys`` (e.g. ``batch_keys(config, replay)``) and their shapes: row arrays
    ``[n, b]``, token arrays ``[n, b, L]`` (a term's extra input may be either); returns
    (n_micro, micro_bs, L)."""
    missing = [k for k in keys if k not in minibatch]
    if missing:
        raise KeyError(f"minibatch is missing {missing}; required keys: {list(keys)}")
    n, b, length = minibatch["tokens"].shape
    for key in keys:
        shape = tuple(minibatch[key].shape)
        if key == "row_valid":
            allowed = [(n, b)]
        elif key in MINIBATCH_KEYS:
            allowed = [(n, b, length)]
        else:
            allowed = [(n, b), (n, b, length)]
        if shape not in allowed:
            raise ValueError(f"minibatch[{key!r}] has shape {shape}, expected {' or '.join(map(str, allowed))}")
    return n, b, length


def _token_stats(graphdef, params, micro, config: UpdateConfig):
    """(logp, entropy) [b, L] of a micro-batch. With ``logprob_positions`` K in (0, L) they are
    computed at the loss-mask positions only (``selected_token_stats``: the LM head runs on K
    positions per row when no row has more mask positions, else on all), 0 elsewhere; every term
    aggregates over the mask, so the loss, its gradient and the metrics equal the full pass's."""
    tokens, valid = micro["tokens"], micro["valid"]
    if 0 < config.logprob_positions < tokens.shape[-1]:
        return selected_token_stats(graphdef, params, tokens, valid, micro["loss_mask"] > 0,
                                    config.logprob_positions, config.temperature, config.logprob_chunk_size)
    return sequence_token_stats(graphdef, params, tokens, valid, config.temperature, config.logprob_chunk_size)


def _real_rows_token_stats(graphdef, params, micro, config: UpdateConfig):
    """``_token_stats`` of micro-batch ``micro`` ([b, L] arrays), or zeros when it holds
    no real row (``row_valid`` all False), the model's forward and backward passes then skipped
    at run time by ``lax.cond`` (no new shape, no recompilation). Exact: a micro-batch of padding
    rows alone (the tail of a step's last minibatch, of a replay batch) has an all-zero loss
    mask, so every term, normaliser and metric reads none of its log-probs or entropies, and
    its gradient is 0 either way."""

    def compute():
        return _token_stats(graphdef, params, micro, config)

    def zeros():
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(compute))

    return jax.lax.cond(jnp.any(micro["row_valid"]), compute, zeros)


def _micro_batch_objective(graphdef, params, micro, key, sil_weight, config: UpdateConfig, replay: bool, mesh):
    """(S_j, N_j, scalar metrics) of one micro-batch; differentiable in ``params``."""
    logp, entropy = _real_rows_token_stats(graphdef, params, micro, config)
    arrays = dict(logp=logp, old_logp=micro["old_logprobs"], advantages=micro["advantages"],
                  mask=micro["loss_mask"], key=key, entropy=entropy, row_valid=micro["row_valid"],
                  inputs={k: micro[k] for k in declared_inputs(_terms(config, replay))}, mesh=mesh)
    if replay:
        loss_sum, normaliser, metrics = sil_objective(config.objective, config.sil, sil_weight, **arrays)
    else:
        loss_sum, normaliser, metrics = policy_objective(config.objective, **arrays)
    # agg(KL(pi || pi_ref)) is logged under the reference's name; token arrays are not logged.
    metrics = {("kl_loss" if name == "kl" else name): value
               for name, value in metrics.items() if jnp.ndim(value) == 0}
    return loss_sum, normaliser, metrics


def _make_update(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                 micro_objective: Callable) -> Callable:
    """The accumulate -> clip -> AdamW -> non-finite-guard step around ``micro_objective(params,
    micro, key, scalar) -> (S_j, N_j, metrics)`` (module docstring), jitted with params and
    optimizer state donated. Gradients, clipping and the optimizer see only
    ``trainable_params(params)`` (the LoRA adapters of a LoRA state, else every leaf); the
    optimizer state must be ``optimizer.init`` of that subset."""

    def update(params, opt_state, minibatch, key, scalar):
        n_micro = minibatch["tokens"].shape[0]
        trainable, frozen = split_trainable(params)

        def accumulate(carry, inputs):
            grad_sum, loss_sum, norm_sum = carry
            micro, index = inputs

            def objective(t):
                s, n, metrics = micro_objective(combine(t, frozen), micro, jax.random.fold_in(key, index), scalar)
                return s, (n, metrics)

            (s, (n, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, loss_sum + s, norm_sum + n), metrics

        init = (jax.tree.map(jnp.zeros_like, trainable), jnp.float32(0.0), jnp.float32(0.0))
        (grad_sum, loss_sum, norm_sum), micro_metrics = jax.lax.scan(
            accumulate, init, (minibatch, jnp.arange(n_micro))
        )
        safe_norm = jnp.where(norm_sum > 0, norm_sum, 1.0)
        grads = jax.tree.map(lambda g: jnp.where(norm_sum > 0, g / safe_norm, 0.0), grad_sum)
        loss = finalize(loss_sum, norm_sum)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        metrics = {name: jnp.mean(value) for name, value in micro_metrics.items()}
        metrics.update(loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
        new_params = combine(keep_if_finite(new_trainable, trainable), frozen)
        return new_params, keep_if_finite(new_opt_state, opt_state), metrics

    return jax.jit(update, donate_argnums=(0, 1))


def make_update_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                   config: UpdateConfig, replay: bool, mesh=None) -> Callable:
    """Returns ``update(params, opt_state, minibatch, key, sil_weight) -> (params, opt_state,
    metrics)`` for on-policy (``replay=False``) or replay (SIL) minibatches. ``mesh`` is needed
    only for the per-device Clip-Cov / KL-Cov selection scope."""

    def micro_objective(params, micro, key, sil_weight):
        return _micro_batch_objective(graphdef, params, micro, key, sil_weight, config, replay, mesh)

    return _make_update(graphdef, optimizer, micro_objective)


def make_sft_update_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                       chunk_size: int = 512) -> Callable:
    """Supervised update on minibatches with ``SFT_KEYS``: the token-mean negative log-likelihood

        L = - sum_{i,t} M_{i,t} log pi(y_{i,t} | y_{i,<t}) / sum_{i,t} M_{i,t}

    accumulated exactly over micro-batches. The returned ``update`` has the same signature as
    ``make_update_fn``'s (its key and scalar arguments are unused)."""

    def micro_objective(params, micro, key, scalar):
        del key, scalar
        logp, _ = sequence_token_stats(graphdef, params, micro["tokens"], micro["valid"], 1.0, chunk_size)
        mask = micro["loss_mask"].astype(jnp.float32)
        nll_sum = -jnp.sum(logp * mask)
        tokens = jnp.sum(mask)
        return nll_sum, tokens, {"nll": finalize(jax.lax.stop_gradient(nll_sum), tokens)}

    return _make_update(graphdef, optimizer, micro_objective)


def make_token_stats_fn(graphdef: nnx.GraphDef, temperature: float, chunk_size: int,
                        entropy: bool = True, positions: int = 0) -> Callable:
    """Jitted ``(params, tokens [B, L], valid [B, L], selected [B, L] | None) -> (logprobs,
    entropy)``: the pre-update recomputation of behaviour log-probs (reference step 4) and the
    entropy metric. With ``entropy=False`` it returns the log-probs alone and XLA drops the
    entropy computation (the reference policy's pass). With ``positions`` K in (0, L) and a
    ``selected`` mask (the loss mask) the statistics are computed at the selected positions only
    and are 0 elsewhere (``selected_token_stats``: the LM head runs on K positions per row when no
    row selects more); every consumer reads them under the loss mask, so this is exact."""

    def stats(params, tokens, valid, selected=None):
        if selected is not None and 0 < positions < tokens.shape[-1]:
            out = selected_token_stats(graphdef, params, tokens, valid, selected, positions, temperature, chunk_size)
        else:
            out = sequence_token_stats(graphdef, params, tokens, valid, temperature, chunk_size)
        return out if entropy else out[0]

    return jax.jit(stats)
