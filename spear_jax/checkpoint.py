"""Atomic, resumable checkpoints of a whole training run, behind one small class.

A checkpoint holds three parts, saved together by one orbax ``CheckpointManager`` step (orbax
writes into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint as the latest one):

* ``device``: a pytree of (possibly sharded) jax arrays: params and optimizer state. Restored
  directly into the sharding of the abstract target the caller passes.
* ``host``: a nested dict of numpy arrays: the replay buffer's state, the reward-baseline
  history, PRNG key data. Orbax rejects zero-size arrays, and an empty replay buffer is full of
  them, so this part is packed into one ``.npz`` byte blob (a uint8 array) and unpacked on
  restore, with dtypes and shapes exact.
* ``meta``: JSON-able values: step, curriculum state, config fingerprint.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_SEPARATOR = "/"


class _SingleProcessMergeNotice(logging.Filter):
    """Drops orbax's per-save warning that a single-process save has no per-process OCDBT
    subdirectories to merge (there is nothing to merge; the checkpoint is complete)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


logging.getLogger("absl").addFilter(_SingleProcessMergeNotice())


@dataclasses.dataclass
class RunState:
    """Everything a resumed run needs. ``host`` values are numpy arrays or nested dicts of them."""

    device: Any
    host: dict[str, Any]
    meta: dict[str, Any]


def pack_host_arrays(tree: dict[str, Any]) -> np.ndarray:
    """Nested dict of numpy arrays -> one uint8 array holding an ``.npz`` archive."""
    flat: dict[str, np.ndarray] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            if not node:
                flat[prefix + _SEPARATOR] = np.zeros((0,), np.uint8)  # marks an empty dict
            for key, value in node.items():
                if not isinstance(key, str) or _SEPARATOR in key or not key:
                    raise ValueError(f"host state key {prefix + _SEPARATOR + str(key)!r} must be a "
                                     f"non-empty string without {_SEPARATOR!r}")
                visit(f"{prefix}{_SEPARATOR}{key}" if prefix else key, value)
        else:
            array = np.asarray(node)
            if array.dtype == object:
                raise TypeError(f"host state entry {prefix!r} is not a numeric numpy array")
            flat[prefix] = array

    visit("", tree)
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


def unpack_host_arrays(blob: np.ndarray) -> dict[str, Any]:
    """Inverse of ``pack_host_arrays``."""
    tree: dict[str, Any] = {}
    with np.load(io.BytesIO(np.asarray(blob, np.uint8).tobytes()), allow_pickle=False) as archive:
        for name in archive.files:
            *parents, leaf = name.split(_SEPARATOR)
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            if leaf:  # an empty leaf name is the empty-dict marker
                node[leaf] = archive[name]
    return tree


class RunCheckpointer:
    """Saves and restores ``RunState`` under ``directory`` (one sub-directory per step)."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: RunState) -> None:
        """Writes ``state`` as checkpoint ``step`` and blocks until it is complete on disk."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                device=ocp.args.StandardSave(state.device),
                host=ocp.args.ArraySave(pack_host_arrays(state.host)),
                meta=ocp.args.JsonSave(state.meta),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, abstract_device: Any, step: int | None = None, partial: bool = False) -> RunState:
        """Restores checkpoint ``step`` (default: the latest).

        Args:
          abstract_device: a pytree like the saved ``device`` part whose leaves are arrays or
            ``jax.ShapeDtypeStruct`` with the target sharding; restored arrays take it.
          partial: restore only the entries ``abstract_device`` names (e.g. ``{"params": ...}``
            of a checkpoint that also holds ``opt_state``); the others are not read.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available: {self.all_steps()}")
        target = jax.tree.map(_abstract, abstract_device)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                device=_device_restore_args(target, partial),
                host=ocp.args.ArrayRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return RunState(
            device=restored.device,
            host=unpack_host_arrays(np.asarray(restored.host)),
            meta=dict(restored.meta),
        )

    def close(self) -> None:
        self._manager.close()


def _device_restore_args(target: Any, partial: bool):
    """Orbax restore arguments of the ``device`` part: all of it into ``target``, or (``partial``)
    only the entries ``target`` names."""
    if not partial:
        return ocp.args.StandardRestore(target)
    return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))
