"""Running a study's runs: one after another or ``parallel`` at once, resuming an interrupted study.

Each run is in one of three states (``run_state``):

* ``finished``: an RL run whose ``summary.json`` exists (``spear_jax.main`` writes it when the run
  ends) and whose ``metrics.jsonl`` reaches the study's ``total_steps``; a warm start with a
  complete, intact checkpoint. Finished runs are skipped.
* ``partial``: an RL run with a checkpoint but not finished. Its command is run again and
  ``spear_jax.main`` resumes it from its newest intact checkpoint.
* ``new``: nothing yet.

Before any run, each seed's warm-start data is recorded (``warm_data``) unless its file exists.
Then a pool of ``parallel`` workers runs the warm starts and, as soon as a seed's warm start is
finished, that seed's RL runs (seed-major order). A run is executed by ``runner(spec) -> exit
status``; the default starts ``spec.command`` as a subprocess logging to ``<run>/study.log``.
A failed warm start fails its seed's runs without running them; a failed run fails alone.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
from typing import Callable, Sequence

import ml_collections

from spear_jax.checkpoint import complete_steps, verify_step
from spear_jax.metrics import METRICS_FILE, read_metrics
from spear_jax.study import spec as study_spec
from spear_jax.study.spec import RunSpec

CHECKPOINTS = "checkpoints"  # spear_jax.policy.CHECKPOINT_SUBDIR
SUMMARY_FILE = "summary.json"
LOG_FILE = "study.log"
Runner = Callable[[RunSpec], int]


def last_train_step(workdir: str) -> int:
    """The largest step of a train record in the run's metrics (0 when there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    return max((int(r["step"]) for r in read_metrics(path) if r.get("split") == "train"), default=0)


def run_state(spec: RunSpec) -> str:
    """``finished`` | ``partial`` | ``new`` (module docstring)."""
    checkpoints = os.path.join(spec.workdir, CHECKPOINTS)
    steps = complete_steps(checkpoints) if os.path.isdir(checkpoints) else []
    if spec.kind == "warm_start":
        intact = bool(steps) and not verify_step(os.path.join(checkpoints, str(steps[-1])))
        return "finished" if intact else "new"
    if os.path.isfile(os.path.join(spec.workdir, SUMMARY_FILE)) and last_train_step(spec.workdir) >= spec.total_steps:
        return "finished"
    return "partial" if steps else "new"


EXTENDABLE_FIELDS = ("trainer.total_steps",)  # raised to continue finished runs (docs/experiments.md)


def check_recorded_configs(specs: Sequence[RunSpec], keep_finished: bool = False,
                           log: Callable[[str], None] = print) -> None:
    """Compares the config each started run recorded (``spec.config_changes``) with the study's
    now, so that a changed study never resumes a run under two configs or reports an old run
    as the new setting's. A changed partial run is a ``StudyConfigError``; so is a changed
    finished one, unless ``keep_finished`` (then it is kept and named in the log). Fields in
    ``EXTENDABLE_FIELDS`` may change. Nothing is moved or deleted: the error names the fix."""
    for spec in [*study_spec.warm_start_specs(specs), *specs]:
        state = run_state(spec)
        changes = {field: values for field, values in study_spec.config_changes(spec).items()
                   if field not in EXTENDABLE_FIELDS} if state != "new" else {}
        if not changes:
            continue
        listed = "; ".join(f"{field}: {old!r} -> {new!r}" for field, (old, new) in changes.items())
        if state == "finished" and keep_finished:
            log(f"{spec.name}: finished under another config ({listed}); kept (--keep-finished)")
            continue
        fix = f"move {spec.workdir} aside to run it again"
        if state == "finished":
            fix += ", or pass --keep-finished to keep its results as they are"
        raise study_spec.StudyConfigError(
            f"{spec.name}: {state} under another config than the study's ({listed}): {fix}")


def subprocess_runner(spec: RunSpec) -> int:
    """Runs ``spec``'s ``spear_jax.main`` command, appending its output to ``<run>/study.log``."""
    os.makedirs(spec.workdir, exist_ok=True)
    argv = study_spec.command(spec)
    with open(os.path.join(spec.workdir, LOG_FILE), "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def record_warm_data(study: ml_collections.ConfigDict, warm_starts: Sequence[RunSpec]) -> None:
    """Records the warm-start data of every seed whose file is missing (``warm_data``); data
    that cannot be recorded (e.g. a gold prompt too long to write as text) is a
    ``StudyConfigError`` naming the seed."""
    from spear_jax.study import warm_data

    for warm in warm_starts:
        path = dict(warm.overrides)["sft.data_path"]
        if os.path.isfile(path):
            continue
        print(f"recording the warm-start data of seed {warm.seed} into {path}", flush=True)
        try:
            stats = warm_data.record(study.warm_start.data, study_spec.resolved_config(warm), path)
        except ValueError as error:
            raise study_spec.StudyConfigError(f"{warm.name}: recording its data: {error}") from None
        print(f"  {json.dumps(stats, sort_keys=True)}", flush=True)


def _ready(spec: RunSpec, outcome: dict[str, str]) -> str | None:
    """``run`` when ``spec`` can start, ``wait`` while its warm start runs, ``skip`` after it failed."""
    if spec.warm_start is None:
        return "run"
    state = outcome.get(spec.warm_start.name)
    if state in ("finished", "skipped (finished)"):
        return "run"
    return "wait" if state is None else "skip"


def execute(specs: Sequence[RunSpec], parallel: int = 1, runner: Runner = subprocess_runner,
            log: Callable[[str], None] = print) -> dict[str, str]:
    """Runs every unfinished run of ``specs`` (RL runs; their warm starts come first) with
    ``parallel`` workers; returns ``{run name: outcome}`` (``finished``, ``skipped (finished)``,
    ``failed (exit N)``, ``not run (warm start failed)``)."""
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    outcome: dict[str, str] = {}
    todo = []
    for spec in [*study_spec.warm_start_specs(specs), *specs]:
        state = run_state(spec)
        if state == "finished":
            outcome[spec.name] = "skipped (finished)"
        else:
            todo.append(spec)
            log(f"{spec.name}: {'resuming from its checkpoint' if state == 'partial' else 'queued'}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        running: dict[concurrent.futures.Future, RunSpec] = {}
        while todo or running:
            for spec in list(todo):
                readiness = _ready(spec, outcome)
                if readiness == "skip":
                    todo.remove(spec)
                    outcome[spec.name] = "not run (warm start failed)"
                elif readiness == "run" and len(running) < parallel:
                    todo.remove(spec)
                    log(f"{spec.name}: started")
                    running[pool.submit(runner, spec)] = spec
            if not running:
                break
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                spec, status = running.pop(future), future.result()
                outcome[spec.name] = "finished" if status == 0 else f"failed (exit {status})"
                log(f"{spec.name}: {outcome[spec.name]}")
    return outcome
