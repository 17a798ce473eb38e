"""The setting pilot: candidate game settings, each a one-method study, summarised in one table.

    python -m spear_jax.study.pilot --pilot=configs/studies/twx_pilot.py --workdir=studies/twx_pilot \
        [--settings=coin3,coin5] [--results=results/twx_pilot]
    python -m spear_jax.study.pilot --report=results/twx_pilot

A pilot config (``configs/studies/twx_pilot.py``) has ``name``, ``title`` and ``settings``, a tuple
of ``{name, label, study}`` where ``study`` is a study config (``spear_jax/study/spec.py``) whose
``overrides`` are the setting. Each setting's study runs in ``<workdir>/<setting>/`` and writes its
results folder ``<results>/<setting>/`` (resumable like any study: rerun the same command);
``--settings`` runs only the named ones (two processes can share the settings). Every run's wall
time is added to ``<run>/wall_s.json`` (one entry per attempt) and copied next to the setting's
compact metrics as ``<results>/<setting>/wall_s.json``.

``<results>/pilot.json`` and ``<results>/report.md`` are then written from the results folders
alone (``--report`` rewrites both byte for byte). Per setting: the recorded gold data (episodes,
gold turns, mean gold-path length = turns / episodes, cut at ``env.max_steps``, and the fraction of
gold paths that won within it), held-out success after the warm start (the RL run's step-0
evaluation) and at the end of the RL run, the held-out mean episode length, the train success
of each RL step, and the wall minutes of the warm start and the RL run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Sequence

import ml_collections

from spear_jax.metrics import curves, markdown_table, read_metrics
from spear_jax.study import report, scheduler
from spear_jax.study import spec as study_spec

WALL_FILE = "wall_s.json"
PILOT_FIELDS = ("name", "title", "settings")
SETTING_FIELDS = ("name", "label", "study")


def load_pilot(path: str) -> ml_collections.ConfigDict:
    """The checked pilot config of the Python file ``path`` (its ``get_config()``)."""
    if not os.path.isfile(path):
        raise study_spec.StudyConfigError(f"--pilot={path}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"_pilot_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    pilot = module.get_config()
    missing = [f for f in PILOT_FIELDS if f not in pilot]
    if missing:
        raise study_spec.StudyConfigError(f"{path}: pilot config lacks {missing} (see spear_jax/study/pilot.py)")
    for i, setting in enumerate(pilot.settings):
        absent = [f for f in SETTING_FIELDS if f not in setting]
        if absent:
            raise study_spec.StudyConfigError(f"{path}: settings[{i}] lacks {absent}")
        study_spec.check_study(setting.study, f"{path}: settings[{i}] ({setting.name})")
        if len(setting.study.seeds) != 1 or len(setting.study.methods) != 1:
            raise study_spec.StudyConfigError(f"{path}: settings[{i}] ({setting.name}): a pilot setting is one "
                                              f"method on one seed")
    names = [s.name for s in pilot.settings]
    if len(set(names)) != len(names):
        raise study_spec.StudyConfigError(f"{path}: settings have repeated names {names}")
    return pilot


def timed_runner(spec: study_spec.RunSpec) -> int:
    """``scheduler.subprocess_runner``, appending the attempt's wall seconds to ``<run>/wall_s.json``."""
    start = time.monotonic()
    status = scheduler.subprocess_runner(spec)
    path = os.path.join(spec.workdir, WALL_FILE)
    attempts = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else []
    attempts.append(round(time.monotonic() - start, 1))
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(attempts, handle)
    return status


def copy_wall_times(setting_workdir: str, setting_results: str, study: ml_collections.ConfigDict) -> None:
    """``<results>/<setting>/wall_s.json``: ``{"warm_start": [s, ...], "rl": [s, ...]}``, each run's
    attempts (a run not timed here, e.g. finished earlier by ``spear_jax.study``, has none)."""
    (rl,) = study_spec.run_specs(study, setting_workdir)
    walls = {}
    for kind, spec in (("warm_start", rl.warm_start), ("rl", rl)):
        path = os.path.join(spec.workdir, WALL_FILE)
        walls[kind] = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else []
    with open(os.path.join(setting_results, WALL_FILE), "w", encoding="utf-8") as handle:
        json.dump(walls, handle, sort_keys=True)
        handle.write("\n")


def run_pilot(pilot: ml_collections.ConfigDict, workdir: str, results_dir: str,
              only: Sequence[str] = ()) -> dict[str, str]:
    """Runs (or resumes) the settings of ``pilot`` (those named in ``only``, else all) and
    rewrites the pilot report; returns each run's outcome by ``<setting>/<run>``."""
    from spear_jax.study.__main__ import run_loaded_study

    unknown = set(only) - {s.name for s in pilot.settings}
    if unknown:
        raise study_spec.StudyConfigError(f"--settings: unknown {sorted(unknown)}; the pilot has "
                                          f"{[s.name for s in pilot.settings]}")
    outcome = {}
    for setting in pilot.settings:
        if only and setting.name not in only:
            continue
        setting_workdir, setting_results = (os.path.join(d, setting.name) for d in (workdir, results_dir))
        ran = run_loaded_study(setting.study, setting_workdir, 1, setting_results, runner=timed_runner)
        outcome.update({f"{setting.name}/{run}": state for run, state in ran.items()})
        copy_wall_times(setting_workdir, setting_results, setting.study)
    write_pilot_study(results_dir, pilot)
    write_report(results_dir)
    return outcome


def write_pilot_study(results_dir: str, pilot: ml_collections.ConfigDict) -> None:
    """``<results>/pilot_study.json``: the pilot's name, title and settings (names, labels, overrides)."""
    settings = [{"name": s.name, "label": s.label, "overrides": json.loads(s.study.to_json())["overrides"]}
                for s in pilot.settings]
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "pilot_study.json"), "w", encoding="utf-8") as handle:
        json.dump({"name": pilot.name, "title": pilot.title, "settings": settings}, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def setting_row(setting_results: str) -> dict:
    """The pilot's summary of one setting from its results folder (module docstring); fields of a
    part that has not run yet are None."""
    study = json.load(open(os.path.join(setting_results, "study.json"), encoding="utf-8"))
    (method,), (seed,) = study["methods"], study["seeds"]
    stats_path = os.path.join(setting_results, "warm_start_data", f"seed{seed}.json")
    gold = json.load(open(stats_path, encoding="utf-8")) if os.path.isfile(stats_path) else {}
    walls_path = os.path.join(setting_results, WALL_FILE)
    walls = json.load(open(walls_path, encoding="utf-8")) if os.path.isfile(walls_path) else {}
    metrics_path = report.compact_path(setting_results, method["name"], seed)
    records = read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    eval_steps, eval_success = curves(records, "success_rate", "eval")
    _, eval_length = curves(records, "episode_length", "eval")
    train_steps, train_success = curves(records, "success_rate", "train")
    total = study["budget"]["total_steps"]
    rl_s = sum(walls.get("rl", [])) or None
    return {
        "gold_episodes": gold.get("episodes"), "gold_turns": gold.get("rows"),
        "gold_win_rate": gold.get("gold_win_rate"),
        "mean_gold_steps": gold["rows"] / gold["episodes"] if gold else None,
        "eval_steps": eval_steps, "eval_success": eval_success, "eval_episode_length": eval_length,
        "warm_start_success": eval_success[0] if eval_steps and eval_steps[0] == 0 else None,
        "rl_success": eval_success[-1] if total and eval_steps and eval_steps[-1] == total else None,
        "train_steps": train_steps, "train_success": train_success,
        "warm_start_minutes": sum(walls["warm_start"]) / 60 if walls.get("warm_start") else None,
        "rl_minutes": rl_s / 60 if rl_s else None,
        "rl_steps": total,
        "rl_method": method["label"],
    }


def pilot_results(results_dir: str) -> dict:
    """``pilot.json``: the pilot's settings, each with its ``setting_row``."""
    pilot = json.load(open(os.path.join(results_dir, "pilot_study.json"), encoding="utf-8"))
    settings = []
    for setting in pilot["settings"]:
        folder = os.path.join(results_dir, setting["name"])
        row = setting_row(folder) if os.path.isfile(os.path.join(folder, "study.json")) else None
        settings.append({**setting, "results": row})
    return {"name": pilot["name"], "title": pilot["title"], "settings": settings}


def _cell(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(setting: dict) -> tuple:
    """The report's table row of one setting (``-`` for what has not run)."""
    r = setting["results"] or {}
    change = (r["rl_success"] - r["warm_start_success"]
              if r.get("rl_success") is not None and r.get("warm_start_success") is not None else None)
    half = len(r.get("train_success") or []) // 2
    train = (f"{_cell(_mean(r['train_success'][:half]))} / {_cell(_mean(r['train_success'][half:]))}"
             if half else "-")
    per_step = r["rl_minutes"] / r["rl_steps"] if r.get("rl_minutes") and r["rl_steps"] else None
    lengths = " / ".join(_cell(x, 2) for x in r.get("eval_episode_length") or []) or "-"
    return (setting["label"], _cell(r.get("mean_gold_steps"), 2), _cell(r.get("gold_win_rate"), 2),
            _cell(r.get("warm_start_success")), r.get("rl_steps", "-"), _cell(r.get("rl_success")), _cell(change),
            lengths, train, _cell(r.get("warm_start_minutes"), 1), _cell(r.get("rl_minutes"), 1), _cell(per_step, 2))


def markdown(results: dict) -> str:
    """``report.md``: one row per setting, then each setting's overrides."""
    columns = ("setting", "mean gold steps", "gold won", "held-out success, warm start", "RL steps",
               "after RL", "RL change", "held-out ep. length", "train success (1st / 2nd half)",
               "warm start min", "eval + RL run min", "min / RL step")
    lines = [f"# {results['title']}", "",
             "Held-out success: 96 `test` episodes at the evaluation temperature, after the warm start "
             "(the RL run's step-0 evaluation) and after the RL run's steps (Dr.BoT (GRPO)); gold steps: "
             "turns of the recorded gold paths per episode, cut at `env.max_steps`; gold won: the "
             "fraction of gold paths that won within it. Minutes are wall time on the shared machine "
             "(start-up, compilation and evaluations included).", "",
             markdown_table(columns, [_row(s) for s in results["settings"]]), "", "## Settings", ""]
    for setting in results["settings"]:
        overrides = ", ".join(f"`{field}={value}`" for field, value in setting["overrides"])
        lines.append(f"* `{setting['name']}` ({setting['label']}): {overrides}")
    return "\n".join(lines) + "\n"


def write_report(results_dir: str) -> dict:
    """Writes ``pilot.json`` and ``report.md`` of ``results_dir`` from its contents alone."""
    results = pilot_results(results_dir)
    with open(os.path.join(results_dir, "pilot.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    with open(os.path.join(results_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(results))
    return results


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m spear_jax.study.pilot", description=__doc__.split("\n")[0])
    parser.add_argument("--pilot", help="pilot config file (configs/studies/twx_pilot.py)")
    parser.add_argument("--workdir", help="the pilot's directory of runs")
    parser.add_argument("--settings", default="", help="comma-separated setting names to run (default: all)")
    parser.add_argument("--results", default=None, help="results folder (default results/<pilot name>)")
    parser.add_argument("--report", default=None, help="only rewrite pilot.json and report.md of this folder")
    args = parser.parse_args(argv)
    if args.report is None and not (args.pilot and args.workdir):
        parser.error("give --pilot and --workdir (run the pilot) or --report=results/<pilot> (rewrite its report)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report is not None:
        if not os.path.isfile(os.path.join(args.report, "pilot_study.json")):
            print(f"error: --report={args.report}: no pilot_study.json there (a results/<pilot> folder)",
                  file=sys.stderr)
            return 2
        write_report(args.report)
        return 0
    try:
        pilot = load_pilot(args.pilot)
        only = tuple(name for name in args.settings.split(",") if name)
        outcome = run_pilot(pilot, args.workdir, args.results or os.path.join("results", pilot.name), only)
    except study_spec.StudyConfigError as error:
        print(f"pilot config error: {error}", file=sys.stderr)
        return 2
    failed = {name: state for name, state in outcome.items() if state.startswith(("failed", "not run"))}
    for name, state in failed.items():
        print(f"{name}: {state}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
