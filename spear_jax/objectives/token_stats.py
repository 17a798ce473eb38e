"""Per-token statistics of a categorical policy given its logits.

With temperature tau, logits z_t = l_t / tau over a vocabulary of size V:

    log pi(y_t) = z_{t, y_t} - logsumexp(z_t)
    H_t        = logsumexp(z_t) - sum_v softmax(z_t)_v * z_{t, v}
               = -sum_v p_v log p_v   (evaluated in this form: no cancellation when H_t -> 0)

All computations run in float32 whatever the logits' dtype. These are the single source of the
formulas: the model's chunked log-prob pass and the losses both call them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _scaled_logits(logits: jax.Array, temperature: float) -> jax.Array:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits.astype(jnp.float32) / temperature


@jax.custom_vjp
def _picked(z: jax.Array, token_ids: jax.Array) -> jax.Array:
    """z[..., y]: a gather in the forward (no pass over [..., V]); its gradient is the masked
    select g * [v = y], an elementwise op that fuses with the softmax's gradient, not a scatter
    into a [..., V] array of zeros. z [..., V], token_ids [...] -> [...]."""
    return jnp.take_along_axis(z, token_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _picked_forward(z, token_ids):
    return _picked(z, token_ids), (token_ids, z.shape[-1])


def _picked_backward(residuals, g):  # d/dz_v z_y = [v = y]; the ids get no gradient
    token_ids, vocab_size = residuals
    vocab = jnp.arange(vocab_size, dtype=jnp.int32)
    return jnp.where(vocab == token_ids[..., None].astype(jnp.int32), g[..., None], 0.0), None


_picked.defvjp(_picked_forward, _picked_backward)


def token_logprobs_and_entropy(
    logits: jax.Array, token_ids: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Log-probability of ``token_ids`` and entropy of the distribution, sharing one logsumexp.

    Args:
      logits: [..., V] unnormalised logits.
      token_ids: [...] integer ids, same leading shape as ``logits``.
      temperature: logits are divided by it before normalising.

    Returns:
      (logprobs [...], entropy [...]) in float32.
    """
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"token_ids shape {token_ids.shape} must equal logits shape without the vocabulary "
            f"axis {logits.shape[:-1]}"
        )
    z = _scaled_logits(logits, temperature)
    log_z = jax.nn.logsumexp(z, axis=-1)
    log_probs = z - log_z[..., None]
    picked = _picked(z, token_ids) - log_z
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return picked, entropy


def token_logprobs(logits: jax.Array, token_ids: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log pi(token_ids) under softmax(logits / temperature); shapes as in
    ``token_logprobs_and_entropy``."""
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"token_ids shape {token_ids.shape} must equal logits shape without the vocabulary "
            f"axis {logits.shape[:-1]}"
        )
    z = _scaled_logits(logits, temperature)
    return _picked(z, token_ids) - jax.nn.logsumexp(z, axis=-1)


def token_entropy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy H_t of softmax(logits / temperature): [..., V] -> [...] float32."""
    z = _scaled_logits(logits, temperature)
    log_probs = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
