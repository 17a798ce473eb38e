"""The packed training batch: every array's name, shape, dtype and meaning, declared once.

A batch is a dict of numpy arrays sharing the row axis B (padded with empty rows,
``row_valid = False``); per-token arrays are [B, L] and aligned with ``tokens``. The packer
(``spear_jax.batching``) writes the ``PACKED`` fields, the preparation stages
(``spear_jax.prepare``) add the ``PREPARED`` ones, the update step reads ``UPDATE_FIELDS`` (plus
what its configured terms declare, ``train_step.batch_keys``) and the replay buffer stores
``REPLAY_ROW_FIELDS`` of each admitted row (its checkpoint uses the same names).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
    """One batch array: ``per_token`` [B, L] or per row [B]."""

    dtype: type
    per_token: bool
    meaning: str


_TOKEN, _ROW = True, False

# Written by the packer; the per-row fields whose name is a ``rollout.Row`` attribute are copied
# from the row (``ROW_ATTRIBUTES``).
PACKED: dict[str, Field] = {
    "tokens": Field(np.int32, _TOKEN, "prompt | response | pad ids"),
    "valid": Field(np.bool_, _TOKEN, "real (non-padding) tokens"),
    "loss_mask": Field(np.float32, _TOKEN, "1 on the response tokens that are trained"),
    "logprobs": Field(np.float32, _TOKEN, "the sampler's log-probs (0 off the loss mask)"),
    "prompt_length": Field(np.int32, _ROW, "prompt tokens kept"),
    "response_length": Field(np.int32, _ROW, "response tokens"),
    "prompt_truncated": Field(np.bool_, _ROW, "the prompt was cut from the left to fit"),
    "row_valid": Field(np.bool_, _ROW, "a real row (False for batch padding)"),
    "row_index": Field(np.int64, _ROW, "index into the packed row list (-1 on padding)"),
    "group_id": Field(np.int64, _ROW, "group (task / prompt) id"),
    "traj_id": Field(np.int64, _ROW, "trajectory (episode) id"),
    "step_index": Field(np.int32, _ROW, "position of the row in its trajectory"),
    "reward": Field(np.float32, _ROW, "the environment's reward of the row's step"),
    "episode_return": Field(np.float32, _ROW, "the episode's environment return"),
    "episode_length": Field(np.int32, _ROW, "environment steps of the episode"),
    "action_valid": Field(np.bool_, _ROW, "the row's action was well formed"),
    "num_tool_calls": Field(np.int32, _ROW, "tool calls of the row's trajectory"),
    "anchor_id": Field(np.int64, _ROW, "id of the row's anchor observation"),
    "won": Field(np.bool_, _ROW, "the episode succeeded"),
    "overlong": Field(np.bool_, _ROW, "the response reached the length limit"),
    "incomplete": Field(np.bool_, _ROW, "the response has no action / answer"),
    "num_turns": Field(np.int32, _ROW, "assistant turns in the row"),
}
ROW_ATTRIBUTES = tuple(name for name in PACKED if name not in (
    "tokens", "valid", "loss_mask", "logprobs", "prompt_length", "response_length", "prompt_truncated",
    "row_valid", "row_index"))

# Added by the preparation stages.
PREPARED: dict[str, Field] = {
    "scores": Field(np.float32, _ROW, "the score advantages see: shaped reward minus penalties"),
    "step_return_offsets": Field(np.float32, _ROW, "added to GiGPO's step returns (invalid-action penalty)"),
    "old_logprobs": Field(np.float32, _TOKEN, "pre-update policy log-probs (0 off the loss mask)"),
    "ref_logprobs": Field(np.float32, _TOKEN, "reference policy log-probs (with a reference only)"),
    "row_advantage": Field(np.float32, _ROW, "the row's scalar advantage (0 on padding)"),
    "advantages": Field(np.float32, _TOKEN, "row_advantage broadcast over the loss mask"),
}
FIELDS: dict[str, Field] = {**PACKED, **PREPARED}

# The arrays every update reads.
UPDATE_FIELDS = ("tokens", "valid", "loss_mask", "old_logprobs", "advantages", "row_valid")
# What the replay buffer stores of each admitted row, besides the arrays the update reads.
REPLAY_ROW_FIELDS = ("scores", "row_advantage", "loss_mask", "group_id", "traj_id", "num_tool_calls")


def check_declared(names, where: str) -> None:
    """Raises naming ``where`` unless every name is a declared batch field."""
    unknown = [name for name in names if name not in FIELDS]
    if unknown:
        raise KeyError(f"{where} names {unknown}, which are not batch fields; declared fields: "
                       f"{sorted(FIELDS)} (spear_jax.batch_schema)")
