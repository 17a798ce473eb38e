"""Rollout rows -> padded numpy training batches in a few static length buckets.

Both row layouts pack the same way: a row is ``prompt_ids`` [P] followed by ``response_ids``
[R] (for trajectory rows the response interleaves model and observation tokens, told apart by
its ``loss_mask``). Each row goes to the smallest bucket ``L >= P + R`` and is laid out as::

    tokens[b]    = prompt (P) | response (R) | pad_id ...            [L] int32
    valid[b]     = 1 ...................... 1 | 0 ...                 [L] bool
    loss_mask[b] = 0 (P)    | row.loss_mask  | 0 ...                 [L] float32
    logprobs[b]  = 0 (P)    | row.logprobs   | 0 ...                 [L] float32

``loss_mask[b, t]`` and ``logprobs[b, t]`` refer to the token ``tokens[b, t]``, which the model
predicts from the logits at position ``t - 1`` (the prompt is never empty, so ``t >= 1`` on every
masked-in position). Rows of one bucket form one batch, in their original order; the batch
dimension is padded with empty rows (``row_valid = False``, all masks 0) to a multiple of
``row_multiple`` so the jitted train step sees only ``len(buckets)`` (x a few batch sizes)
shapes.

Overflow: a row longer than the largest bucket ``L_max`` is, with ``overflow="truncate_prompt"``
(default), cut from the *left of its prompt* to ``L_max - R`` tokens (``prompt_truncated``
is set; the response, its mask and logprobs are untouched, so the loss terms are those of the
row but conditioned on a shortened context); with ``overflow="error"`` it raises. A row whose
response alone does not leave one prompt token in ``L_max`` always raises: raise the largest
bucket or lower the generation limit.

Per-row metadata travels as ``[B]`` arrays (``ROW_FIELDS``); ``row_index`` points back into the
input row list for the non-array fields (texts, info).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from spear_jax.batch_schema import PACKED, ROW_ATTRIBUTES
from spear_jax.rollout import Row

OVERFLOW_MODES = ("truncate_prompt", "error")

# Row attribute -> dtype of its [B] array (declared in ``spear_jax.batch_schema``).
ROW_FIELDS: dict[str, type] = {name: PACKED[name].dtype for name in ROW_ATTRIBUTES}


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """How rows are padded.

    Attributes:
      buckets: the allowed sequence lengths, strictly increasing.
      pad_id: token id written on padding (never attended to, never in the loss).
      row_multiple: the batch dimension of every bucket is padded to a multiple of this.
      overflow: ``"truncate_prompt"`` or ``"error"`` for rows longer than the largest bucket.
    """

    buckets: tuple[int, ...] = (256, 512, 1024, 2048)
    pad_id: int = 0
    row_multiple: int = 1
    overflow: str = "truncate_prompt"

    def __post_init__(self):
        buckets = tuple(self.buckets)
        if not buckets or any(not isinstance(b, (int, np.integer)) or b < 2 for b in buckets):
            raise ValueError(f"BatchingConfig.buckets must be ints >= 2, got {self.buckets!r}")
        if any(a >= b for a, b in zip(buckets, buckets[1:])):
            raise ValueError(f"BatchingConfig.buckets must be strictly increasing, got {buckets}")
        if not isinstance(self.row_multiple, int) or self.row_multiple < 1:
            raise ValueError(f"BatchingConfig.row_multiple must be a positive int, got {self.row_multiple!r}")
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"BatchingConfig.overflow must be one of {OVERFLOW_MODES}, got {self.overflow!r}")


@dataclasses.dataclass
class PackedBatch:
    """One bucket's rows: ``arrays`` holds every ``batch_schema.PACKED`` field (``tokens``,
    ``valid``, ``loss_mask``, ``logprobs`` [B, L]; ``prompt_length``, ``response_length``,
    ``prompt_truncated``, ``row_valid``, ``row_index`` and every ``ROW_FIELDS`` entry [B])."""

    length: int
    arrays: dict[str, np.ndarray]

    @property
    def num_rows(self) -> int:
        """Real (non-padding) rows."""
        return int(self.arrays["row_valid"].sum())


def check_row(row: Row, where: str) -> None:
    """Shapes and dtypes of a row's arrays; raises naming ``where``."""
    if row.prompt_ids.ndim != 1 or row.prompt_ids.shape[0] == 0:
        raise ValueError(f"{where}.prompt_ids must be a non-empty 1-D array, got shape {row.prompt_ids.shape}")
    n = row.response_ids.shape
    if row.response_ids.ndim != 1:
        raise ValueError(f"{where}.response_ids must be 1-D, got shape {n}")
    for name in ("loss_mask", "logprobs"):
        if getattr(row, name).shape != n:
            raise ValueError(f"{where}.{name} has shape {getattr(row, name).shape}, response_ids has {n}")
    for name in ("prompt_ids", "response_ids"):
        if not np.issubdtype(getattr(row, name).dtype, np.integer):
            raise ValueError(f"{where}.{name} must hold integer ids, got {getattr(row, name).dtype}")


def bucket_length(total: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``total`` tokens, else the largest bucket."""
    for b in buckets:
        if total <= b:
            return int(b)
    return int(buckets[-1])


def pack_rows(rows: Sequence[Row], config: BatchingConfig) -> list[PackedBatch]:
    """Packs ``rows`` into one ``PackedBatch`` per used bucket, shortest bucket first."""
    largest = config.buckets[-1]
    by_bucket: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        check_row(row, f"rows[{i}]")
        total = row.prompt_ids.shape[0] + row.response_ids.shape[0]
        if total > largest:
            if row.response_ids.shape[0] >= largest:
                raise ValueError(
                    f"rows[{i}] has a {row.response_ids.shape[0]}-token response; the largest bucket "
                    f"({largest}) must leave room for at least one prompt token: raise "
                    "BatchingConfig.buckets or lower the generation limit"
                )
            if config.overflow == "error":
                raise ValueError(f"rows[{i}] has {total} tokens, more than the largest bucket {largest} "
                                 "(BatchingConfig.overflow='error')")
        by_bucket.setdefault(bucket_length(total, config.buckets), []).append(i)
    return [_pack_bucket(rows, by_bucket[length], length, config) for length in sorted(by_bucket)]


def _pack_bucket(rows: Sequence[Row], indices: list[int], length: int, config: BatchingConfig) -> PackedBatch:
    size = -(-len(indices) // config.row_multiple) * config.row_multiple
    arrays = {name: np.zeros((size, length) if spec.per_token else (size,), dtype=spec.dtype)
              for name, spec in PACKED.items()}
    arrays["tokens"][:] = config.pad_id
    arrays["row_index"][:] = -1
    for b, i in enumerate(indices):
        row = rows[i]
        response = row.response_ids.shape[0]
        prompt = row.prompt_ids[max(0, row.prompt_ids.shape[0] - (length - response)):]
        p = prompt.shape[0]
        arrays["tokens"][b, :p] = prompt
        arrays["tokens"][b, p:p + response] = row.response_ids
        arrays["valid"][b, :p + response] = True
        arrays["loss_mask"][b, p:p + response] = row.loss_mask
        arrays["logprobs"][b, p:p + response] = np.where(row.loss_mask != 0, row.logprobs, 0.0)
        arrays["prompt_length"][b] = p
        arrays["response_length"][b] = response
        arrays["prompt_truncated"][b] = p < row.prompt_ids.shape[0]
        arrays["row_valid"][b] = True
        arrays["row_index"][b] = i
        for name in ROW_FIELDS:
            arrays[name][b] = getattr(row, name)
    return PackedBatch(length=length, arrays=arrays)
