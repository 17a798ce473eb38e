"""Cutting a packed batch into the minibatches of the updates (RL and the warm start).

A step's batch is cut into minibatches of ``size`` rows, epoch after epoch. With a generator the
real rows are permuted before each epoch is cut (padding rows stay last); a minibatch holding
only padding rows is skipped. Each minibatch reaches the update as ``[size / micro, micro, ...]``
arrays (micro-batches along the leading axis).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np


def epoch_order(row_valid: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """Row order of one epoch [B]: the real rows (first ``row_valid.sum()``), permuted by
    ``rng`` when given, then the padding rows."""
    real = int(row_valid.sum())
    order = np.arange(row_valid.shape[0])
    if rng is not None:
        order[:real] = rng.permutation(real)
    return order


def minibatch_rows(row_valid: np.ndarray, epochs: int, size: int,
                   rng: np.random.Generator | None) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, first position in the epoch's order, row ids [size]) of every minibatch holding
    at least one real row; ``row_valid`` [B] with B a multiple of ``size``."""
    for epoch in range(epochs):
        order = epoch_order(row_valid, rng)
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            if row_valid[rows].any():
                yield epoch, start, rows


def micro_split(batch: Mapping[str, np.ndarray], rows: np.ndarray, keys: Sequence[str], micro: int,
                length: int | None = None) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of rows ``rows`` as ``[len(rows) / micro, micro, ...]``; with ``length``
    the token axis is cut to that many columns (rows are left-aligned, so only padding goes)."""
    out = {}
    for key in keys:
        picked = batch[key][rows] if length is None or batch[key].ndim == 1 else batch[key][rows, :length]
        out[key] = picked.reshape((len(rows) // micro, micro) + picked.shape[1:])
    return out


def mean_metrics(outputs: Sequence[Mapping[str, float]], prefix: str) -> dict[str, float]:
    """Each update output averaged over the minibatches (summed in order), named
    ``<prefix><name>``, and ``<prefix>optimizer_steps``."""
    sums: dict[str, float] = {}
    for out in outputs:
        for name, value in out.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    metrics = {f"{prefix}{k}": v / len(outputs) for k, v in sums.items()} if outputs else {}
    metrics[f"{prefix}optimizer_steps"] = float(len(outputs))
    return metrics
