"""References for the sampler tests: random peaked weights, cache-free forward, numpy
log-softmax and stop search."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spear_jax.model import forward, init_model

MAX_LEN = 32
MAX_BATCH = 8

_full_forward = jax.jit(forward, static_argnums=0)


def random_state(cfg, seed):
    """Weights with larger spread than the default init, so that logits are peaked and greedy
    sequences vary; norms away from 1 so that every parameter matters."""
    graphdef, state = nnx.split(init_model(cfg, seed))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
    leaves = [x + (0.1 if x.ndim == 1 else 0.15) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(treedef, leaves)


def teacher_forced_logits(graphdef, state, sequence):
    """Reference: one cache-free forward over the whole sequence -> logits [n, V] (float64)."""
    tokens = jnp.asarray(np.asarray(sequence, np.int32))[None]
    logits, _ = _full_forward(graphdef, state, tokens, jnp.ones_like(tokens, bool))
    return np.asarray(logits[0], np.float64)


def log_softmax(x, temperature=1.0):
    z = x / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def reference_first_stop(generated, stop_sequences, eos_ids):
    """numpy: index (1-based length) after which generation ends, and why, or (None, None)."""
    for n in range(1, len(generated) + 1):
        if generated[n - 1] in eos_ids:
            return n, "eos"
        if any(n >= len(s) and tuple(generated[n - len(s):n]) == tuple(s) for s in stop_sequences):
            return n, "stop"
    return None, None
