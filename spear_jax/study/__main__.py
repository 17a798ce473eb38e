"""``python -m spear_jax.study``: run a study and write its results, or rewrite a results folder.

    python -m spear_jax.study --study=configs/studies/twx_methods.py --workdir=studies/twx [--parallel=N]
        [--results=results/<study name>] [--methods=a,b] [--keep-finished] [--collect]
    python -m spear_jax.study --report=results/twx_methods [--docs README.md docs/results.md]

A study run records the warm-start data, trains what is not finished (an interrupted study
resumes: rerun the same command), copies the finished runs' compact metrics into the results
folder and writes ``results.json``, ``results.md`` and the figures there. ``--methods`` trains only
the listed methods' runs (e.g. the pair a comparison needs, before the others); the report covers
the whole study. ``--collect`` does only the copying and the report: it trains nothing and
reports the runs finished so far (e.g. of a sweep still running or stopped half-way; the report
lists the runs it lacks). ``--report`` rewrites those three from the folder's ``study.json`` and
compact metrics alone; with ``--docs`` it also rewrites the study's headline table in those
markdown files, between ``<!-- results:<study> -->`` and ``<!-- /results:<study> -->``.

A run started under another config than the study's now (the ``config.json`` it recorded; e.g.
after an edit of the study) stops the study before anything runs, with an error naming the run,
the changed fields and the fix (move the run aside); ``--keep-finished`` keeps such finished
runs as they are, named in the log.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from spear_jax.study import report, scheduler
from spear_jax.study import spec as study_spec


def study_dict(study) -> dict:
    """The study config as the JSON ``study.json`` holds (tuples as lists)."""
    return json.loads(study.to_json())


def check_runs(specs: Sequence[study_spec.RunSpec]) -> None:
    """Builds and validates the config of each run of ``specs``; an RL run's
    ``trainer.init_from`` (its warm start, trained later) is checked empty."""
    from spear_jax import run_config

    for spec in specs:
        config = study_spec.resolved_config(spec)
        if spec.kind == "rl":
            study_spec.set_field(config, "trainer.init_from", "", spec.name)
        try:
            run_config.validate(config)
        except run_config.ConfigError as error:
            raise study_spec.StudyConfigError(f"{spec.name}: {error}") from None


def collect(study, specs: Sequence[study_spec.RunSpec], workdir: str, results_dir: str) -> None:
    """Copies the finished runs' compact metrics and the study config into ``results_dir``; the
    compact metrics of a run that is no longer finished (its budget was raised) are removed."""
    report.write_study_json(results_dir, study_dict(study))
    for spec in specs:
        target = report.compact_path(results_dir, spec.method, spec.seed)
        if scheduler.run_state(spec) == "finished":
            report.write_compact(spec.workdir, target)
        elif os.path.isfile(target):
            os.remove(target)
    report.copy_warm_start_stats(workdir, results_dir, list(study.seeds))


def run_study(study_path: str, workdir: str, parallel: int, results_dir: str | None,
              runner: scheduler.Runner | None = None, methods: Sequence[str] = (),
              keep_finished: bool = False) -> dict[str, str]:
    """The whole study (module docstring), or the runs of ``methods`` only; returns each run's
    outcome. ``runner`` executes one run (default ``scheduler.subprocess_runner``)."""
    return run_loaded_study(study_spec.load_study(study_path), workdir, parallel, results_dir, runner, methods,
                            keep_finished)


def selected_specs(study, specs: Sequence[study_spec.RunSpec], methods: Sequence[str]) -> list[study_spec.RunSpec]:
    """The runs of ``methods`` (all runs when empty); an unknown name is a ``StudyConfigError``."""
    known = [m.name for m in study.methods]
    unknown = [name for name in methods if name not in known]
    if unknown:
        raise study_spec.StudyConfigError(f"--methods: {unknown} not in the study; its methods are {known}")
    return [spec for spec in specs if not methods or spec.method in methods]


def run_loaded_study(study, workdir: str, parallel: int, results_dir: str | None,
                     runner: scheduler.Runner | None = None, methods: Sequence[str] = (),
                     keep_finished: bool = False) -> dict[str, str]:
    """``run_study`` of an already loaded and checked study config."""
    specs = selected_specs(study, study_spec.run_specs(study, workdir), methods)
    check_runs(specs)
    scheduler.check_recorded_configs(specs, keep_finished)
    os.makedirs(workdir, exist_ok=True)
    report.write_study_json(workdir, study_dict(study))
    scheduler.record_warm_data(study, study_spec.warm_start_specs(specs))
    check_runs(study_spec.warm_start_specs(specs))
    outcome = scheduler.execute(specs, parallel, runner or scheduler.subprocess_runner)
    collect_and_report(study, workdir, results_dir)
    return outcome


def collect_and_report(study, workdir: str, results_dir: str | None) -> dict[str, str]:
    """Copies the finished runs of ``workdir`` into the results folder (default
    ``results/<study name>``) and writes its report; trains nothing. Returns each run's state
    (``scheduler.run_state``)."""
    specs = study_spec.run_specs(study, workdir)
    results_dir = results_dir or os.path.join("results", study.name)
    collect(study, specs, workdir, results_dir)
    report.write_report(results_dir)
    print(f"results: {results_dir}/results.md", flush=True)
    return {spec.name: scheduler.run_state(spec) for spec in specs}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m spear_jax.study", description=__doc__.split("\n")[0])
    parser.add_argument("--study", help="study config file (configs/studies/*.py)")
    parser.add_argument("--workdir", help="the study's directory of runs")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (subprocesses)")
    parser.add_argument("--results", default=None, help="results folder (default results/<study name>)")
    parser.add_argument("--methods", default="", help="comma-separated: train only these methods' runs")
    parser.add_argument("--keep-finished", action="store_true",
                        help="keep finished runs recorded under another config than the study's (named in the log)")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: report the runs of --workdir finished so far")
    parser.add_argument("--report", default=None, help="only rewrite the report of this results folder")
    parser.add_argument("--docs", nargs="*", default=(),
                        help="with --report: markdown files whose <!-- results:<study> --> table to rewrite")
    args = parser.parse_args(argv)
    if args.report is None and not (args.study and args.workdir):
        parser.error("give --study and --workdir (run a study) or --report=results/<study> (rewrite its report)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report is not None:
        if not os.path.isfile(os.path.join(args.report, "study.json")):
            print(f"error: --report={args.report}: no study.json there (a results/<study> folder)", file=sys.stderr)
            return 2
        results = report.write_report(args.report)
        for path in args.docs:
            if not report.update_marked_blocks(path, results):
                start, end = report.marked_block(results["study"])
                print(f"error: --docs {path}: no {start} ... {end} block to rewrite", file=sys.stderr)
                return 2
        return 0
    try:
        if args.collect:
            states = collect_and_report(study_spec.load_study(args.study), args.workdir, args.results)
            unfinished = sorted(name for name, state in states.items() if state != "finished")
            print(f"{len(states) - len(unfinished)} of {len(states)} runs finished" +
                  (f"; not yet: {', '.join(unfinished)}" if unfinished else ""), flush=True)
            return 0
        methods = [name for name in args.methods.split(",") if name]
        outcome = run_study(args.study, args.workdir, args.parallel, args.results, methods=methods,
                            keep_finished=args.keep_finished)
    except study_spec.StudyConfigError as error:
        print(f"study config error: {error}", file=sys.stderr)
        return 2
    failed = {name: state for name, state in outcome.items() if state.startswith(("failed", "not run"))}
    for name, state in failed.items():
        print(f"{name}: {state}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
