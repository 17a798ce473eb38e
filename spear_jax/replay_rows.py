"""Between the packed batch and the replay buffer: the rows a step stores, and a replay draw
padded back into a batch the update reads (names from ``spear_jax.batch_schema``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from spear_jax.batch_schema import REPLAY_ROW_FIELDS, check_declared
from spear_jax.prepare import pad_rows

# Arrays the buffer keeps in its own form: the scalar advantage (recalibrated at replay) and the
# rows themselves (every stored row is real).
OWN_ARRAYS = ("advantages", "row_valid")


def carried_arrays(update_keys: Sequence[str]) -> tuple[str, ...]:
    """The batch arrays a replay update reads that the buffer stores as they are:
    ``train_step.batch_keys(update_config, replay=True)`` minus ``OWN_ARRAYS``; each must be a
    ``batch_schema`` field."""
    check_declared(update_keys, "train_step.batch_keys(update_config, replay=True)")
    return tuple(key for key in update_keys if key not in OWN_ARRAYS)


def buffer_rows(batch: Mapping[str, np.ndarray], carried: Sequence[str]) -> dict[str, np.ndarray]:
    """The real rows of a step's batch: the ``carried`` arrays and ``REPLAY_ROW_FIELDS``."""
    keep = batch["row_valid"]
    return {name: batch[name][keep] for name in dict.fromkeys((*carried, *REPLAY_ROW_FIELDS))}


def replay_batch(replay: Mapping[str, np.ndarray], carried: Sequence[str], row_multiple: int) -> dict[str, np.ndarray]:
    """A replay draw padded to a multiple of ``row_multiple`` rows, its recalibrated
    ``row_advantage`` broadcast over the loss masks as ``advantages`` [B, L]."""
    rows = len(replay["scores"])
    padded = -(-rows // row_multiple) * row_multiple
    batch = {name: pad_rows(replay[name], padded) for name in carried}
    batch["row_valid"] = pad_rows(np.ones(rows, bool), padded)
    batch["advantages"] = pad_rows(replay["row_advantage"].astype(np.float32), padded)[:, None] * batch["loss_mask"]
    return batch
