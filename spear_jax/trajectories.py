"""Samples of a training step's episodes, for inspection: JSONL files and tracking tables.

Every ``logging.trajectories_every`` steps the trainer hands this step's kept rows (after the
low-variance group filter, with their shaped rewards, quality flags and advantages) to
``TrajectoryLogger.record``. It draws ``logging.trajectories_per_step`` episodes (trajectory ids,
uniformly without replacement) and writes one JSON line per episode to
``<workdir>/trajectories/step_<step:06d>.jsonl``::

    {"step", "traj_id", "group_id", "task_id", "task_type", "won", "episode_return",
     "episode_length", "turns": [{
        "step_index", "prompt", "observation", "segments": [{"role", "text", "trained"}, ...],
        "env_reward", "shaped_reward", "advantage", "action_valid", "finish_reason",
        "flags": {"incomplete", "overlong", "repetitive", "unreadable", "invalid_action"},
        "trained_tokens", "masked"}]}

A turn is one row: one env step for step rows, the whole episode for trajectory rows. Its
response is cut into segments of equal (role, trained): role ``assistant`` for generated tokens
(rollout loss mask 1) and ``observation`` for tokens the environment or the template added (tool
output, follow-up messages; loss mask 0); ``trained`` is whether the tokens carry loss after the
quality filters (a flagged row's assistant tokens are ``trained: false``). ``masked`` means the
row trains on no token. ``advantage`` is the row's advantage before broadcasting over its mask.
The same turns go to TensorBoard text and the wandb / mlflow tables (``MetricsWriter.write_table``);
``python -m spear_jax.inspect`` prints a file readably.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

TRAJECTORY_DIR = "trajectories"
FLAG_NAMES = ("incomplete", "overlong", "repetitive", "unreadable")
TABLE_COLUMNS = ("traj_id", "turn", "prompt", "response", "env_reward", "shaped_reward",
                 "advantage", "flags", "trained_tokens")


def trajectory_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, TRAJECTORY_DIR, f"step_{int(step):06d}.jsonl")


def saved_steps(workdir: str) -> list[int]:
    """Steps with a trajectory file in ``workdir``, ascending."""
    folder = os.path.join(workdir, TRAJECTORY_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted(int(name[5:-6]) for name in os.listdir(folder)
                  if name.startswith("step_") and name.endswith(".jsonl"))


def read_trajectories(workdir: str, step: int) -> list[dict]:
    with open(trajectory_path(workdir, step), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def segments(response_ids: np.ndarray, rollout_mask: np.ndarray, trained: np.ndarray,
             decode: Callable[[Sequence[int]], str]) -> list[dict]:
    """Runs of equal (role, trained) over a response: ids, rollout mask and trained mask [R]."""
    out: list[dict] = []
    start = 0
    for end in range(1, len(response_ids) + 1):
        if end == len(response_ids) or (rollout_mask[end], trained[end]) != (rollout_mask[start], trained[start]):
            out.append({"role": "assistant" if rollout_mask[start] else "observation",
                        "text": decode([int(t) for t in response_ids[start:end]]),
                        "trained": bool(trained[start])})
            start = end
    return out


def segment_style(segment: Mapping) -> str:
    """``observation`` (no loss), ``masked`` (generated, loss masked) or ``assistant`` (trained)."""
    if segment["role"] == "observation":
        return "observation"
    return "assistant" if segment["trained"] else "masked"


def marked_text(segment: Mapping) -> str:
    """A segment's text, observation tokens inside ``[[obs]]...[[/obs]]`` and generated tokens
    without loss inside ``[[masked]]...[[/masked]]`` (trained tokens bare)."""
    marker = {"observation": "obs", "masked": "masked"}.get(segment_style(segment))
    return f"[[{marker}]]{segment['text']}[[/{marker}]]" if marker else segment["text"]


def plain_response(turn_segments: Sequence[Mapping]) -> str:
    """A turn's response as plain text with the ``marked_text`` markers."""
    return "".join(marked_text(segment) for segment in turn_segments)


def _turn(row, i: int, shaped: np.ndarray, flags: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
          decode: Callable[[Sequence[int]], str]) -> dict:
    """The record of kept row ``i`` (module docstring); ``batch`` is the packed step batch."""
    start = int(batch["prompt_length"][i])
    trained = batch["loss_mask"][i, start:start + row.response_length] > 0
    row_flags = {name: bool(flags[name][i]) for name in FLAG_NAMES if name in flags}
    row_flags["invalid_action"] = not row.action_valid
    return {
        "step_index": int(row.step_index), "prompt": decode([int(t) for t in row.prompt_ids]),
        "observation": row.anchor_obs,
        "segments": segments(row.response_ids, row.loss_mask, trained, decode),
        "env_reward": float(row.reward), "shaped_reward": float(shaped[i]),
        "advantage": float(batch["row_advantage"][i]), "action_valid": bool(row.action_valid),
        "finish_reason": row.finish_reason, "flags": row_flags,
        "trained_tokens": int(trained.sum()), "masked": not trained.any(),
    }


def episode_records(step: int, rows: Sequence, shaped: np.ndarray, flags: Mapping[str, np.ndarray],
                    batch: Mapping[str, np.ndarray], traj_ids: Sequence[int],
                    decode: Callable[[Sequence[int]], str]) -> list[dict]:
    """One record per trajectory id in ``traj_ids`` from the kept ``rows`` (shaped rewards and
    flags [n] aligned with them, ``batch`` their packed arrays), turns in step order."""
    records = []
    for traj_id in traj_ids:
        index = sorted((i for i, r in enumerate(rows) if r.traj_id == traj_id), key=lambda i: rows[i].step_index)
        first, last = rows[index[0]], rows[index[-1]]
        records.append({
            "step": int(step), "traj_id": int(traj_id), "group_id": int(first.group_id),
            "task_id": first.task_id, "task_type": first.task_type, "won": bool(last.won),
            "episode_return": float(first.episode_return), "episode_length": int(first.episode_length),
            "turns": [_turn(rows[i], i, shaped, flags, batch, decode) for i in index],
        })
    return records


def table_rows(records: Sequence[Mapping]) -> list[list]:
    """One ``TABLE_COLUMNS`` row per turn of ``records``."""
    out = []
    for record in records:
        for turn in record["turns"]:
            raised = ",".join(name for name, on in turn["flags"].items() if on) or "-"
            out.append([record["traj_id"], turn["step_index"], turn["prompt"], plain_response(turn["segments"]),
                        turn["env_reward"], turn["shaped_reward"], turn["advantage"], raised,
                        turn["trained_tokens"]])
    return out


class TrajectoryLogger:
    """Writes sampled episodes every ``every`` steps (0 = never); see the module docstring."""

    def __init__(self, workdir: str, writer, decode: Callable[[Sequence[int]], str], every: int, per_step: int):
        self.workdir, self.writer, self.decode = workdir, writer, decode
        self.every, self.per_step = every, per_step

    def due(self, step: int) -> bool:
        """Every ``every`` steps, on the process that writes the run's files (process 0)."""
        from spear_jax import distributed

        return self.every > 0 and step % self.every == 0 and distributed.is_writer()

    def record(self, step: int, rows: Sequence, shaped: np.ndarray, flags: Mapping[str, np.ndarray],
               batch: Mapping[str, np.ndarray], rng: np.random.Generator) -> list[dict]:
        """Samples, writes and returns this step's episode records (nothing when not due)."""
        if not self.due(step) or not rows:
            return []
        traj_ids = sorted({int(r.traj_id) for r in rows})
        picked = rng.choice(traj_ids, size=min(self.per_step, len(traj_ids)), replace=False)
        records = episode_records(step, rows, shaped, flags, batch, sorted(int(t) for t in picked), self.decode)
        path = trajectory_path(self.workdir, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, default=str) + "\n")
        self.writer.write_table(step, "trajectories", TABLE_COLUMNS, table_rows(records))
        return records
