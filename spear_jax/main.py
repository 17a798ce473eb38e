"""Command-line entry point.

    python -m spear_jax.main --config=configs/spear.py:twx_tiny --workdir=runs/spear_twx

Any field can be overridden, e.g. ``--config.trainer.total_steps=100``. With ``config.sft.enable``
(the tiny presets) the run first trains the supervised warm start into ``<workdir>/warm_start``
(skipped when it is already there) and starts RL from it. A ``configs/sft.py`` config runs the
warm start alone. Re-running with the same ``--workdir`` resumes from the newest checkpoint.
"""
from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/spear.py", "Run config file (and preset).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics and plots.")

WARM_START_DIR = "warm_start"
PLOTTED = ("success_rate", "episode_return", "actor/entropy", "actor/pg_clipfrac", "replay/sil_weight",
           "reward/toolcall_factor", "tool_calls", "actor/grad_norm")


def run(config, workdir: str) -> dict:
    """Runs the job ``config`` describes in ``workdir``, holding the workdir's lock (one run per
    workdir: ``spear_jax.workdir_lock``); returns a summary dict."""
    from spear_jax import run_config, workdir_lock

    run_config.validate(config)
    with workdir_lock.hold(workdir):
        return _run_locked(config, workdir)


def _warm_start_done(warm: str) -> bool:
    """True when ``warm`` holds a complete warm-start checkpoint whose files match its manifest
    (a warm start killed while saving, or damaged since, is trained again)."""
    from spear_jax.checkpoint import complete_steps, verify_step
    from spear_jax.policy import CHECKPOINT_SUBDIR

    directory = os.path.join(warm, CHECKPOINT_SUBDIR)
    steps = complete_steps(directory)
    problems = verify_step(os.path.join(directory, str(steps[-1]))) if steps else ["no complete checkpoint"]
    if steps and problems:
        logging.warning("the warm start in %s is damaged (%s): training it again", warm, "; ".join(problems))
    return not problems


def _run_locked(config, workdir: str) -> dict:
    from spear_jax import metrics
    from spear_jax.sft import run_sft

    with open(os.path.join(workdir, "config.json"), "w") as handle:
        handle.write(config.to_json_best_effort(indent=2))
    if config.name == "sft":
        run_sft(config, workdir)
        return {"warm_start": workdir}

    summary = {}
    if config.sft.enable:
        warm = os.path.join(workdir, WARM_START_DIR)
        if not _warm_start_done(warm):
            print(f"training the warm start into {warm}", flush=True)
            run_sft(config, warm)
        config = config.copy_and_resolve_references()
        config.model.checkpoint_format, config.model.checkpoint_path = "orbax", warm
        summary["warm_start"] = warm

    from spear_jax.trainer import Trainer

    trainer = Trainer(config, workdir)
    try:
        final = trainer.train()
    finally:
        trainer.close()
    records = metrics.read_metrics(workdir)
    evals = metrics.curves(records, "success_rate", split="eval")
    summary.update(
        eval_success_first=evals[1][0] if evals[0] else None,
        eval_success_final=final.get("success_rate"),
        eval_steps=evals[0], eval_success=evals[1],
        plots=metrics.plot_run(workdir, PLOTTED),
    )
    with open(os.path.join(workdir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def main(argv) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        # Library INFO lines (orbax's per-save messages, backend probing) would bury the
        # progress bars; --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    summary = run(_CONFIG.value, _WORKDIR.value)
    print(json.dumps({k: v for k, v in summary.items() if k != "plots"}, indent=2))


if __name__ == "__main__":
    app.run(main)
