"""What ``config.trainer.init_from`` points at: the weights a new run starts RL from.

A new run (nothing saved in its own workdir yet) takes its starting weights from ``init_from``
instead of ``config.model`` and the warm start: RL step 0, a fresh optimizer, an empty replay
buffer; the KL reference, when used, is these weights. The path may be

* a run workdir (it has ``checkpoints/``): its newest complete checkpoint, e.g. the
  ``warm_start/`` of another run or a finished RL run;
* a run's ``checkpoints/`` directory: its newest complete checkpoint;
* one checkpoint step, ``<workdir>/checkpoints/<step>``: that step;
* a Hugging Face directory (``config.json`` with ``model_type`` and safetensors, e.g. the output
  of ``python -m spear_jax.export``): its architecture, weights and tokenizer.

Only the ``params`` of a run checkpoint are read. A run that resumes from its own workdir
restores its own checkpoint over these weights (``init_from`` then only rebuilds the KL
reference), so a rerun of the same command continues rather than starting over.
"""
from __future__ import annotations

import dataclasses
import json
import os

from spear_jax.checkpoint import complete_steps

CHECKPOINT_SUBDIR = "checkpoints"
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class InitFromError(FileNotFoundError):
    """``config.trainer.init_from`` names nothing a run can start from."""


@dataclasses.dataclass(frozen=True)
class InitSource:
    """``kind`` ``"hf"`` (``directory`` is the HF directory) or ``"run"`` (``directory`` holds
    the step directories; ``step`` None = the newest complete one)."""

    kind: str
    directory: str
    step: int | None = None


def _is_hf_directory(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config) or not any(os.path.isfile(os.path.join(path, f)) for f in _HF_WEIGHTS):
        return False
    with open(config) as handle:
        return "model_type" in json.load(handle)


def _has_step_directories(path: str) -> bool:
    return any(name.isdigit() and os.path.isdir(os.path.join(path, name)) for name in os.listdir(path))


def _run_source(path: str) -> InitSource:
    """The run checkpoint at ``path`` (workdir, ``checkpoints/`` or one step directory)."""
    parent, name = os.path.split(os.path.normpath(path))
    if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
        directory, step = os.path.join(path, CHECKPOINT_SUBDIR), None
    elif name.isdigit() and not _has_step_directories(path):
        directory, step = parent, int(name)
    else:
        directory, step = path, None
    steps = complete_steps(directory)
    if not steps or (step is not None and step not in steps):
        wanted = "no complete checkpoint" if step is None else f"step {step} is not a complete checkpoint"
        raise InitFromError(f"config.trainer.init_from={path!r}: {wanted} in {directory} (complete "
                            f"steps: {steps}); point it at a run workdir, its checkpoints/ or one "
                            f"complete step directory")
    return InitSource("run", directory, step)


def resolve_init_from(path: str) -> InitSource:
    """The source ``config.trainer.init_from = path`` names (module docstring); raises
    ``InitFromError`` naming the field when it names none."""
    if not os.path.isdir(path):
        raise InitFromError(f"config.trainer.init_from={path!r}: no such directory; give a run workdir, "
                            f"a run checkpoint directory or a Hugging Face model directory")
    if _is_hf_directory(path) and not os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
        return InitSource("hf", path)
    if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)) or _has_step_directories(path) or \
            os.path.basename(os.path.normpath(path)).isdigit():
        return _run_source(path)
    raise InitFromError(f"config.trainer.init_from={path!r}: neither a run checkpoint (no "
                        f"{CHECKPOINT_SUBDIR}/ or step directories) nor a Hugging Face directory "
                        f"(config.json with model_type and {' or '.join(_HF_WEIGHTS)})")
