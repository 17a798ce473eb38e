"""End-of-generation tests on device: eos ids and (multi-token) stop sequences.

Each row keeps a window of its last K generated tokens (K = longest stop sequence, bucketed),
filled with -1 before the first generated token, so only generated tokens can complete a stop
sequence. Stop sequences are stored right-aligned in a [S, K] table; sequence s matches when
its tokens equal the last len(s) window entries.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NO_TOKEN = -1
# Smallest table sizes: typical eos sets and stop strings fit without a new program.
MIN_EOS, MIN_STOPS, MIN_STOP_LENGTH = 4, 4, 8


def _bucket(n: int, minimum: int) -> int:
    return 1 << (max(n, minimum) - 1).bit_length()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopTable:
    """eos_ids [E] int32 (NO_TOKEN padding); stops [S, K] int32 right-aligned (NO_TOKEN padding);
    stop_lengths [S] int32 (0 = padding row)."""

    eos_ids: jax.Array
    stops: jax.Array
    stop_lengths: jax.Array

    @property
    def window(self) -> int:
        return self.stops.shape[1]

    @classmethod
    def make(cls, eos_ids, stop_sequences) -> "StopTable":
        """Host -> device, with E, S and K padded to powers of two (at least MIN_EOS, MIN_STOPS,
        MIN_STOP_LENGTH) so that changing the stop sets rarely changes the compiled program."""
        eos = np.full((_bucket(len(eos_ids), MIN_EOS),), NO_TOKEN, np.int32)
        eos[: len(eos_ids)] = eos_ids
        k = _bucket(max((len(s) for s in stop_sequences), default=1), MIN_STOP_LENGTH)
        stops = np.full((_bucket(len(stop_sequences), MIN_STOPS), k), NO_TOKEN, np.int32)
        lengths = np.zeros((stops.shape[0],), np.int32)
        for i, seq in enumerate(stop_sequences):
            stops[i, k - len(seq):] = seq
            lengths[i] = len(seq)
        return cls(eos_ids=jnp.asarray(eos), stops=jnp.asarray(stops), stop_lengths=jnp.asarray(lengths))


def empty_window(batch: int, table: StopTable) -> jax.Array:
    """[B, K] window holding no generated token yet."""
    return jnp.full((batch, table.window), NO_TOKEN, jnp.int32)


def push(window: jax.Array, tokens: jax.Array, live: jax.Array) -> jax.Array:
    """Append tokens [B] to the windows [B, K] of the rows where live [B] is True."""
    shifted = jnp.concatenate([window[:, 1:], tokens[:, None]], axis=1)
    return jnp.where(live[:, None], shifted, window)


def is_eos(tokens: jax.Array, table: StopTable) -> jax.Array:
    """tokens [B] -> [B] bool."""
    return jnp.any(tokens[:, None] == table.eos_ids[None, :], axis=1)


def ends_with_stop(window: jax.Array, table: StopTable) -> jax.Array:
    """window [B, K] -> [B] bool: the window ends with one of the stop sequences."""
    used = table.stops != NO_TOKEN                                            # [S, K]
    equal = (window[:, None, :] == table.stops[None]) | ~used[None]           # [B, S, K]
    return jnp.any(jnp.all(equal, axis=2) & (table.stop_lengths > 0)[None], axis=1)
