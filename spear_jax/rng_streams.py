"""The named random streams of a run: every draw comes from ``(config.seed, stream, step)``.

One derivation, used everywhere:

    jax key of (stream, step):    fold_in(fold_in(key(seed), stream), step)
    numpy generator of (stream, step):  default_rng([seed, stream, step])
    update key of minibatch (epoch, first row):
        fold_in(jax key of (UPDATE or UPDATE_REPLAY, step), epoch * UPDATE_EPOCH_STRIDE + first row)

A stream's number is part of every random value it gives, so the numbers below never change (a
new stream takes an unused number); the warm start draws its examples from
``default_rng([seed, SFT_EXAMPLES])`` (no step). A resumed run re-derives each step's streams and
so repeats the uninterrupted run.
"""
from __future__ import annotations

import enum

import jax
import numpy as np


class Stream(enum.IntEnum):
    """What a random stream is for (its number is folded into every key it gives)."""

    ROLLOUT = 0  # jax: the sampler's keys of a training rollout
    REPLAY_SUBSAMPLE = 1  # numpy: the rows a triggered replay draws
    TASK_DRAW = 2  # numpy: the training tasks of a step
    GROUP_FILTER = 3  # numpy: the power-of-two row truncation after the group filter
    UPDATE = 4  # jax: on-policy minibatch keys (Clip-Cov / KL-Cov selection)
    UPDATE_REPLAY = 5  # jax: replay (SIL) minibatch keys
    SHUFFLE = 6  # numpy: on-policy row order of each epoch (actor.shuffle)
    SHUFFLE_REPLAY = 7  # numpy: replay row order of each epoch
    EVAL = 9  # jax: the sampler's keys of an evaluation
    TRAJECTORY_SAMPLE = 10  # numpy: which trajectories the logger writes
    SFT_EXAMPLES = 17  # numpy, no step: the warm start's examples and batches


UPDATE_EPOCH_STRIDE = 100_003  # > any batch's row count, so (epoch, first row) pairs never collide


def jax_key(seed: int, stream: Stream, step: int) -> jax.Array:
    """The JAX key of ``stream`` at ``step``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), int(stream)), step)


def numpy_rng(seed: int, stream: Stream, step: int) -> np.random.Generator:
    """The numpy generator of ``stream`` at ``step``."""
    return np.random.default_rng([seed, int(stream), step])


def update_key(seed: int, replay: bool, step: int, epoch: int, first_row: int) -> jax.Array:
    """The key of the minibatch starting at row ``first_row`` of epoch ``epoch``."""
    stream = Stream.UPDATE_REPLAY if replay else Stream.UPDATE
    return jax.random.fold_in(jax_key(seed, stream, step), epoch * UPDATE_EPOCH_STRIDE + first_row)


def shuffle_rng(seed: int, replay: bool, step: int) -> np.random.Generator:
    """The generator of a step's epoch permutations (on-policy or replay rows)."""
    return numpy_rng(seed, Stream.SHUFFLE_REPLAY if replay else Stream.SHUFFLE, step)
