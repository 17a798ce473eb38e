"""Atomic, verified, resumable checkpoints of a whole training run, behind one small class.

A checkpoint holds three parts, saved together by one orbax ``CheckpointManager`` step (orbax
writes into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint as the latest one):

* ``device``: a pytree of (possibly sharded) jax arrays: params and optimizer state. Restored
  directly into the sharding of the abstract target the caller passes.
* ``host``: a nested dict of numpy arrays: the replay buffer's state, the reward-baseline
  history, PRNG key data. Orbax rejects zero-size arrays, and an empty replay buffer is full of
  them, so this part is packed into one ``.npz`` byte blob (a uint8 array) and unpacked on
  restore, with dtypes and shapes exact.
* ``meta``: JSON-able values: step, the run's full config.

Layout of older steps: a step whose ``params`` keep one ``blocks/<i>`` entry per decoder layer
(written before the blocks were stacked over layers) restores its params alone (``partial``
restores of ``{"params": ...}``: warm starts, ``init_from``, export), converted to the stacked
layout; a full restore of such a step (a resume with its optimizer state) raises
``CheckpointError`` naming the cause.

Integrity: once orbax has finished a step, ``integrity.json`` (size and sha256 of every file of
the step) is written into it atomically; only then does the step count as complete. Restore
re-hashes the files; a damaged step (a file missing, truncated or changed) is refused with a
warning naming the step and the files, moved to ``rejected/``, and the previous complete step is
restored instead. Old steps beyond ``max_to_keep`` are removed only after a new step is complete.
A save that fails (read-only or full disk) raises ``CheckpointError`` at once with the OS error.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from spear_jax import distributed
from spear_jax.model.weight_layout import stacked_blocks, unstacked_blocks

_SEPARATOR = "/"
MANIFEST_FILE = "integrity.json"  # in each step directory: size and sha256 of its other files
REJECTED_SUBDIR = "rejected"  # damaged steps are moved here, not restored
SUPERSEDED_SUBDIR = "superseded"  # steps after the one a run was resumed from (resume_step)
_HASH_CHUNK_BYTES = 8 << 20
_log = logging.getLogger(__name__)


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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or restored; the message names the step, the file and
    what to do about it."""


def _digest(path: str) -> str:
    """sha256 hex digest of the file at ``path``, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def _digests(step_dir: str, relative_paths: list[str]) -> list[str]:
    """Digests of several files of ``step_dir``, hashed in parallel (hashlib releases the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda rel: _digest(os.path.join(step_dir, rel)), relative_paths))


def write_manifest(step_dir: str) -> None:
    """Records size and sha256 of every file under ``step_dir`` in ``MANIFEST_FILE`` (written to a
    temporary name, fsynced and renamed, so the manifest is either absent or whole)."""
    relative = sorted(
        os.path.relpath(os.path.join(root, name), step_dir)
        for root, _, names in os.walk(step_dir) for name in names)
    relative = [rel for rel in relative if rel != MANIFEST_FILE]
    files = {rel: {"bytes": os.path.getsize(os.path.join(step_dir, rel)), "sha256": digest}
             for rel, digest in zip(relative, _digests(step_dir, relative))}
    target = os.path.join(step_dir, MANIFEST_FILE)
    with open(target + ".tmp", "w", encoding="utf-8") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(target + ".tmp", target)
    _fsync_directory(step_dir)


def verify_step(step_dir: str) -> list[str]:
    """What is wrong with the checkpoint in ``step_dir`` against its manifest (empty: intact):
    a missing or unreadable manifest, and each listed file that is missing, has another size, or
    whose sha256 differs from the one recorded at save time."""
    try:
        with open(os.path.join(step_dir, MANIFEST_FILE), encoding="utf-8") as handle:
            files = {rel: (int(entry["bytes"]), str(entry["sha256"]))
                     for rel, entry in json.load(handle)["files"].items()}
    except FileNotFoundError:
        return [f"{MANIFEST_FILE} is missing (the save did not finish)"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return [f"{MANIFEST_FILE} is unreadable ({error})"]
    problems, same_size = [], []
    for rel, (size, _) in sorted(files.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel}: missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{rel}: {os.path.getsize(path)} bytes where {size} were written (truncated?)")
        else:
            same_size.append(rel)
    for rel, digest in zip(same_size, _digests(step_dir, same_size)):
        if digest != files[rel][1]:
            problems.append(f"{rel}: contents differ from those written (sha256 mismatch)")
    return problems


def complete_steps(directory: str) -> list[int]:
    """Steps under ``directory`` whose save finished: a step directory holding a manifest."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isfile(os.path.join(directory, name, MANIFEST_FILE)))


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _probe_writable(directory: str) -> None:
    """Creates, fsyncs and removes a small file in ``directory``; raises the OSError if it cannot."""
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        if os.path.exists(probe):
            os.remove(probe)


class RunCheckpointer:
    """Saves and restores ``RunState`` under ``directory`` (one sub-directory per step).

    A step counts as complete once its manifest is written, after orbax has finished it. Restore
    verifies the manifest first and falls back to the previous complete step when the newest is
    damaged; saving raises ``CheckpointError`` with the real OS error when the disk refuses.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        self._verified: set[int] = set()  # steps whose files this checkpointer has hashed
        # Retention is ours (after the manifest), so a save that never completes cannot push the
        # previous complete step out. Synchronous saves raise a write error in this thread at
        # once; the asynchronous path waits on a signal that never comes.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                                 enable_async_checkpointing=False),
        )

    def step_directory(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return complete_steps(self.directory)

    def save(self, step: int, state: RunState) -> None:
        """Writes ``state`` as checkpoint ``step``, blocks until it is complete on disk (manifest
        included), then removes complete steps beyond ``max_to_keep`` and unfinished ones."""
        self._verified.discard(step)
        parts = ocp.args.Composite(
            device=ocp.args.StandardSave(state.device),
            host=ocp.args.ArraySave(pack_host_arrays(state.host)),
            meta=ocp.args.JsonSave(state.meta),
        )
        try:
            _probe_writable(self.directory)
            if step in self._manager.all_steps():  # an unfinished or superseded save of this step
                self._manager.delete(step)
            self._manager.save(step, args=parts, force=True)
            self._manager.wait_until_finished()
            if distributed.is_writer():  # every process's shards are on disk once orbax returns
                write_manifest(self.step_directory(step))
            distributed.barrier(f"checkpoint {step} saved")
        except Exception as error:
            if distributed.is_writer():
                self._discard_unfinished(step)
            raise CheckpointError(
                f"saving checkpoint step {step} to {self.step_directory(step)} failed: "
                f"{type(error).__name__}: {error}. {self._newest_note()} If the disk is full or "
                f"read-only, free space or make {self.directory} writable, then rerun the same "
                f"command to resume.") from error
        keep = set(self.all_steps()[-self.max_to_keep:])
        for old in self._manager.all_steps():
            if old not in keep:
                self._manager.delete(old)

    def restore(self, abstract_device: Any, step: int | None = None, partial: bool = False) -> RunState:
        """Restores checkpoint ``step`` (default: ``newest_intact_step()``) after verifying it.

        Args:
          abstract_device: a pytree like the saved ``device`` part whose leaves are arrays or
            ``jax.ShapeDtypeStruct`` with the target sharding; restored arrays take it.
          partial: restore only the entries ``abstract_device`` names (e.g. ``{"params": ...}``
            of a checkpoint that also holds ``opt_state``); the others are not read.
        """
        if step is None:
            step = self.newest_intact_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available: {self.all_steps()}")
        self._verify(step)
        return self._restore_step(abstract_device, step, partial)

    def newest_intact_step(self) -> int | None:
        """The newest complete step whose files match its manifest; None when the directory
        holds no step at all.

        A damaged step (a file missing, truncated or changed) is logged as a warning naming the
        step and the files, moved to ``rejected/``, and the next older one is tried;
        ``CheckpointError`` when every complete step is damaged, or when the only steps are ones
        orbax finished but that have no manifest (killed while it was written, or saved without
        one): starting over would delete them, so that is left to the user. Process 0 decides (it
        alone moves damaged steps); the others take its answer.
        """
        outcome = distributed.allgather(self._newest_intact_here() if distributed.is_writer() else None)[0]
        if not distributed.is_writer():
            self._manager.reload()
        if isinstance(outcome, str):
            raise CheckpointError(outcome)
        if outcome is not None:
            self._verified.add(outcome)
        return outcome

    def _newest_intact_here(self) -> int | str | None:
        """``newest_intact_step``'s answer on this process: the step, None, or the error text."""
        damaged = []
        for step in self.all_steps()[::-1]:
            problems = verify_step(self.step_directory(step))
            if not problems:
                self._verified.add(step)
                if damaged:
                    _log.warning("restoring checkpoint step %d of %s instead (the newer %s %s damaged)",
                                 step, self.directory, damaged, "is" if len(damaged) == 1 else "are")
                return step
            where = self._reject(step)
            _log.warning("checkpoint step %d in %s is damaged and is not restored: %s; %s",
                         step, self.directory, "; ".join(problems), where)
            damaged.append(step)
        if damaged:
            return (f"no intact checkpoint in {self.directory}: steps {damaged} are damaged (moved to "
                    f"{os.path.join(self.directory, REJECTED_SUBDIR)}; see the warnings above). Restore "
                    f"them from a backup, or start over in a new workdir.")
        unfinished = sorted(self._manager.all_steps())
        if unfinished:
            return (
                f"{self.directory} holds steps {unfinished} but none with {MANIFEST_FILE}, so none "
                f"can be verified (killed while its manifest was written, or saved without one). "
                f"To start over, delete them (rm -r {self.step_directory(unfinished[-1])} ...) or "
                f"use a new workdir.")
        return None

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` part of complete step ``step`` alone (verified first)."""
        self._verify(step)
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def _verify(self, step: int) -> None:
        """Raises ``CheckpointError`` unless ``step`` matches its manifest (each step is hashed
        once per checkpointer)."""
        if step in self._verified:
            return
        problems = verify_step(self.step_directory(step))
        if problems:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: "
                                  f"{'; '.join(problems)}. Restore another step "
                                  f"(available: {self.all_steps()}) or the files from a backup.")
        self._verified.add(step)

    def _restore_step(self, abstract_device: Any, step: int, partial: bool) -> RunState:
        target = jax.tree.map(_abstract, abstract_device)
        layers = self._unstacked_layers(step)
        if layers:
            target = self._unstacked_target(target, step, partial, layers)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                device=_device_restore_args(target, partial),
                host=ocp.args.ArrayRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        device = restored.device
        if layers:
            device = {"params": stacked_blocks(device["params"], abstract_device["params"])}
        return RunState(
            device=device,
            host=unpack_host_arrays(np.asarray(restored.host)),
            meta=dict(restored.meta),
        )

    def _unstacked_layers(self, step: int) -> int:
        """How many ``params/blocks/<i>`` entries step ``step`` holds: checkpoints written before
        the decoder blocks were stacked over layers keep one per layer (0: the stacked layout)."""
        saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.step_directory(step), "device"))
        tree = getattr(saved, "tree", saved)
        blocks = tree.get("params", {}).get("blocks", {}) if isinstance(tree, dict) else {}
        keys = list(blocks) if isinstance(blocks, dict) else []
        return len(keys) if keys and all(str(k).isdigit() for k in keys) else 0

    def _unstacked_target(self, target: Any, step: int, partial: bool, layers: int) -> Any:
        """The restore target of an unstacked-layout step: its params alone, one entry per layer
        (they are stacked after the restore). Anything else (a resume's optimizer state) cannot
        be converted: ``CheckpointError`` names the cause and the way on."""
        if not partial or set(target) != {"params"}:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} stores the decoder blocks one per layer "
                f"(params/blocks/0 ... /{layers - 1}), the layout before the blocks were stacked over "
                f"layers; its optimizer state cannot be resumed in the stacked layout. Start a new run "
                f"from its weights instead: config.trainer.init_from=<its workdir> (params convert on "
                f"load), or export them with python -m spear_jax.export.")
        return {"params": unstacked_blocks(target["params"], layers)}

    def set_aside_after(self, step: int) -> str | None:
        """Moves every step directory newer than ``step`` (complete or not) into
        ``superseded/<time>/``, so a run resumed from ``step`` writes its own later steps and no
        later resume picks up the abandoned ones; returns where they went (None: there were none)."""
        newer = sorted(s for s in self._manager.all_steps() if s > step)
        if not newer:
            return None
        target = distributed.allgather(time.strftime("%Y%m%dT%H%M%S"))[0]  # process 0's name
        target = os.path.join(self.directory, SUPERSEDED_SUBDIR, target)
        if distributed.is_writer():  # one process moves them; the others wait until it has
            os.makedirs(target, exist_ok=True)
            for old in newer:
                os.rename(self.step_directory(old), os.path.join(target, str(old)))
        distributed.barrier(f"steps after {step} set aside")
        self._verified.difference_update(newer)
        self._manager.reload()
        return target

    def _reject(self, step: int) -> str:
        """Moves damaged ``step`` to ``rejected/`` (so a new save of that step can take its place);
        returns where it went, for the log."""
        target = os.path.join(self.directory, REJECTED_SUBDIR, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(self.step_directory(step), target)
            where = f"moved to {target}"
        except OSError as error:
            where = f"left in place ({error})"
        self._manager.reload()
        return where

    def _discard_unfinished(self, step: int) -> None:
        """Best-effort removal of what a failed save of ``step`` left behind."""
        for name in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
            path = os.path.join(self.directory, name)
            unfinished = name == str(step) and not os.path.isfile(os.path.join(path, MANIFEST_FILE))
            if unfinished or name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(path, ignore_errors=True)
        try:
            self._manager.reload()
        except OSError:  # the listing itself may fail on the broken filesystem
            pass

    def _newest_note(self) -> str:
        newest = self.latest_step()
        if newest is None:
            return "There is no earlier complete checkpoint."
        return f"The newest complete checkpoint, step {newest}, is untouched."

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
