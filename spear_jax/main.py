"""Command-line entry point.

    python -m spear_jax.main --config=configs/spear.py:twx_tiny --workdir=runs/spear_twx

Any field can be overridden, e.g. ``--config.trainer.total_steps=100``. With ``config.sft.enable``
(the tiny presets) the run first trains the supervised warm start into ``<workdir>/warm_start``
(skipped when it is already there) and starts RL from it. A ``configs/sft.py`` config runs the
warm start alone. With ``config.trainer.init_from`` RL starts from those weights instead and the
warm start is skipped (``spear_jax.init_from``). Re-running with the same ``--workdir`` resumes
from the newest checkpoint (``config.trainer.resume_step``: from that step).

A config error (``run_config.ConfigError``, a bad flag or config file) prints one line to stderr
and exits with status 2; Ctrl-C prints one line and exits with status 130.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

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
    from spear_jax import compile_cache, distributed, run_config, workdir_lock

    distributed.initialize(config)  # before any device is touched; a no-op for one process
    run_config.validate(config)
    compile_cache.use(config.trainer.compilation_cache_dir)  # before the first program compiles
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
    from spear_jax import metrics, resume
    from spear_jax.checkpoint import complete_steps
    from spear_jax.policy import CHECKPOINT_SUBDIR
    from spear_jax.sft import run_sft

    resume.check_resume_step(config, os.path.join(workdir, CHECKPOINT_SUBDIR))
    if config.name == "sft" or not complete_steps(os.path.join(workdir, CHECKPOINT_SUBDIR)):
        metrics.record_config(workdir, config)  # a resumed run records it once the trainer accepts it
    if config.name == "sft":
        run_sft(config, workdir)
        return {"warm_start": workdir}

    summary = {}
    if config.sft.enable and config.trainer.init_from:
        print(f"config.trainer.init_from is set: the warm start is skipped, RL starts from "
              f"{config.trainer.init_from}", flush=True)
    elif config.sft.enable:
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


def _exit_with(message: str, status: int) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)


def _one_line(text: str) -> str:
    """An error message on one line; a quoted traceback (a config file that raised) is reduced
    to the message's first line and the exception line that ends it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last):" in lines:
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)


def _unquoted(error: Exception) -> str:
    """The text of a KeyError-style message that holds the repr of a string."""
    text = str(error)
    if len(text) > 1 and text[0] == text[-1] == "'":
        text = text[1:-1].replace("\\n", "\n").replace("\\'", "'")
    return text


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag, config field or config file reported as one line
    (status 2). The config file loads lazily, so it is touched here to surface its failure."""
    try:
        remaining = flags.FLAGS(argv)
        getattr(_CONFIG.value, "name", None)
    except flags.Error as error:
        _exit_with(f"config error: {_one_line(str(error))}", 2)
    except (AttributeError, KeyError) as error:  # an override of a field the config lacks
        _exit_with(f"config error: no such config field: {_one_line(_unquoted(error))}", 2)
    except OSError as error:  # the config file is missing or unreadable
        _exit_with(f"config error: {_one_line(str(error))}", 2)
    return remaining


def exit_on_interrupt(workdir: str) -> None:
    """Makes Ctrl-C (SIGINT) end the process at once with one line on stderr and status 130.

    The signal's C-level handler writes to a pipe that a watcher thread reads, so the exit waits
    neither for the main thread (which may sit in a long XLA compile) nor on a KeyboardInterrupt
    (which Python swallows when it lands in a finalizer or a gc callback, leaving the run going
    on against a TextWorldExpress JVM the same Ctrl-C stopped). Ending at once is a kill: a
    checkpoint being written is abandoned and a rerun resumes from the newest finished one; the
    JVM and the sandbox workers end with the process (stdin closed; parent-death signal).
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    message = f"interrupted: rerun the same command to resume {workdir} from its newest checkpoint"

    def watch() -> None:
        while os.read(read_fd, 1) != bytes([signal.SIGINT]):
            pass
        print(message, file=sys.stderr, flush=True)
        os._exit(130)

    threading.Thread(target=watch, name="exit-on-interrupt", daemon=True).start()
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # the watcher acts
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)


def main_reporting_errors(argv) -> None:
    """``main`` with a config error as one line on stderr (status 2), a held workdir, no intact
    checkpoint or a silent peer process as one message (status 1), and Ctrl-C as one line (status 130 = 128 + SIGINT, see
    ``exit_on_interrupt``)."""
    from spear_jax.checkpoint import CheckpointError
    from spear_jax.distributed import PeerTimeoutError
    from spear_jax.run_config import ConfigError
    from spear_jax.workdir_lock import WorkdirLockedError

    exit_on_interrupt(_WORKDIR.value)
    try:
        main(argv)
    except ConfigError as error:
        _exit_with(f"config error: {error}", 2)
    except (WorkdirLockedError, CheckpointError, PeerTimeoutError) as error:
        _exit_with(f"error: {error}", 1)


if __name__ == "__main__":
    app.run(main_reporting_errors, flags_parser=parse_flags)
