"""Saving and restoring the state of an RL run: params, optimizer state, replay buffer, step.

A checkpoint holds the policy params and optimizer state (on device), the replay buffer's
``state_dict`` (host) and the step with the config it ran under (meta). Restoring checks the
config may resume it (``spear_jax.resume``) and places the arrays back on the mesh.
"""
from __future__ import annotations

import dataclasses
import logging

import ml_collections

from spear_jax import resume
from spear_jax.checkpoint import RunCheckpointer, RunState
from spear_jax.replay import ReplayBuffer, ReplayConfig
from spear_jax.trainer_setup import on_mesh


@dataclasses.dataclass
class Restored:
    """What a resumed run continues from."""

    step: int
    params: object
    opt_state: object
    buffer: ReplayBuffer | None


def save(checkpointer: RunCheckpointer, step: int, params, opt_state, buffer: ReplayBuffer | None,
         config: ml_collections.ConfigDict) -> None:
    """Writes the checkpoint of ``step``."""
    host = {"replay": buffer.state_dict()} if buffer is not None else {}
    checkpointer.save(step, RunState(device={"params": params, "opt_state": opt_state}, host=host,
                                     meta={"step": step, "config": resume.config_record(config)}))


def restore(checkpointer: RunCheckpointer, config: ml_collections.ConfigDict, params, opt_state,
            replay_config: ReplayConfig | None, mesh) -> Restored | None:
    """The newest intact checkpoint in the workdir, or ``trainer.resume_step``'s, after checking
    that ``config`` may resume it; None when there is none. Steps after a chosen ``resume_step``
    are moved to ``checkpoints/superseded/`` (the resumed run writes its own). ``params`` and
    ``opt_state`` give the structure to restore into."""
    step = resume.resume_step(config, checkpointer)
    if step is None:
        return None
    where = checkpointer.step_directory(step)
    for change in resume.check_resumable(checkpointer.read_meta(step).get("config"), config, where):
        logging.warning("resuming %s with %s", where, change)
    state = checkpointer.restore({"params": params, "opt_state": opt_state}, step=step)
    device = on_mesh(state.device, mesh)
    buffer = (ReplayBuffer.from_state_dict(replay_config, state.host["replay"])
              if replay_config is not None else None)
    moved = checkpointer.set_aside_after(step)
    if moved:
        logging.warning("resumed from config.trainer.resume_step=%d: the newer checkpoints are "
                        "moved to %s", step, moved)
    return Restored(int(state.meta["step"]), device["params"], device["opt_state"], buffer)
