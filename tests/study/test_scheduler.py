"""The study scheduler with a fake runner (nothing trains): finished runs are skipped, partial
runs are run again with the same command (``spear_jax.main`` resumes them), warm starts come
before their seed's runs, and runs overlap with ``parallel``."""
import json
import os
import threading
import time

import jax.numpy as jnp
import pytest

from configs.studies._common import method, study
from spear_jax import checkpoint
from spear_jax.metrics import RUN_CONFIG_FILE
from spear_jax.study import scheduler
from spear_jax.study import spec as study_spec

TOTAL_STEPS = 3


def _study(seeds=(0,), names=("a", "b", "c")):
    return study("toy", "toy", seeds, baseline=names[0],
                 methods=tuple(method(n, n.upper(), "configs/drbot.py:twx_tiny") for n in names),
                 warm_start_config="configs/sft.py:twx_tiny", warm_start_data="gold",
                 total_steps=TOTAL_STEPS, eval_every=1, eval_episodes=8)


def _save_checkpoint(workdir, step):
    ckpt = checkpoint.RunCheckpointer(os.path.join(workdir, scheduler.CHECKPOINTS), max_to_keep=1)
    ckpt.save(step, checkpoint.RunState(device={"params": {"w": jnp.ones(8)}}, host={}, meta={"step": step}))
    ckpt.close()


def _write_metrics(workdir, last_step):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as handle:
        for step in range(1, last_step + 1):
            handle.write(json.dumps({"split": "train", "step": step, "success_rate": 0.5}) + "\n")


def _finish(spec):
    """What a successful run leaves behind."""
    _save_checkpoint(spec.workdir, spec.total_steps)
    if spec.kind == "rl":
        _write_metrics(spec.workdir, spec.total_steps)
        with open(os.path.join(spec.workdir, scheduler.SUMMARY_FILE), "w") as handle:
            json.dump({"eval_success_final": 0.5}, handle)


def _record_nothing(kind, config, path):
    """A stand-in for ``warm_data.record``: an empty data file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    return {}


def _finish_with_eval(spec, success_rate=0.25):
    """``_finish``, and an RL run gets a step-0 held-out evaluation (what the report reads)."""
    _finish(spec)
    if spec.kind == "rl":
        with open(os.path.join(spec.workdir, "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps({"split": "eval", "step": 0, "success_rate": success_rate}) + "\n")
    return 0


def _write_study(path, seeds=(0,), names="ab"):
    """A study config file: methods ``names`` (label: the name upper-cased), baseline the first."""
    path.write_text("from configs.studies._common import method, study\n"
                    "def get_config():\n"
                    f"    return study('toy', 'toy', {tuple(seeds)!r}, {names[0]!r}, tuple(method(n, n.upper(), "
                    f"'configs/drbot.py:twx_tiny') for n in {names!r}), 'configs/sft.py:twx_tiny', 'gold', 3, 1, 8)\n")
    return path


class FakeRunner:
    """Records the commands it is given and finishes each run, or fails the ones in ``fail``."""

    def __init__(self, fail=(), delay=0.0):
        self.calls, self.fail, self.delay = [], set(fail), delay
        self.lock, self.active, self.max_active = threading.Lock(), 0, 0

    def __call__(self, spec):
        with self.lock:
            self.calls.append((spec.name, study_spec.command(spec)))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        if spec.name in self.fail:
            return 1
        _finish(spec)
        return 0


def test_finished_runs_are_skipped_and_partial_runs_run_again_with_their_command(tmp_path):
    specs = study_spec.run_specs(_study(), str(tmp_path))
    a, b, c = specs
    _finish(a.warm_start)
    _finish(a)
    _save_checkpoint(b.workdir, 1)  # interrupted after its first checkpoint
    _write_metrics(b.workdir, 2)
    assert [scheduler.run_state(s) for s in (a.warm_start, a, b, c)] == ["finished", "finished", "partial", "new"]
    runner = FakeRunner()
    outcome = scheduler.execute(specs, runner=runner, log=lambda line: None)
    assert [name for name, _ in runner.calls] == ["b/seed0", "c/seed0"]
    assert runner.calls[0][1] == study_spec.command(b)  # the same command: spear_jax.main resumes it
    assert outcome == {"warm_start/seed0": "skipped (finished)", "a/seed0": "skipped (finished)",
                       "b/seed0": "finished", "c/seed0": "finished"}
    rerun = FakeRunner()
    scheduler.execute(specs, runner=rerun, log=lambda line: None)
    assert rerun.calls == []


def test_a_summary_short_of_the_budget_is_not_finished(tmp_path):
    (spec,) = study_spec.run_specs(_study(names=("a",)), str(tmp_path))
    _finish(spec)
    _write_metrics(spec.workdir, TOTAL_STEPS - 1)  # the summary of a run with a smaller budget
    assert scheduler.run_state(spec) == "partial"


def test_warm_starts_come_first_and_a_failed_one_skips_its_seed(tmp_path):
    specs = study_spec.run_specs(_study(seeds=(0, 1), names=("a", "b")), str(tmp_path))
    runner = FakeRunner(fail={"warm_start/seed1"})
    outcome = scheduler.execute(specs, runner=runner, log=lambda line: None)
    order = [name for name, _ in runner.calls]
    assert order.index("warm_start/seed0") < min(order.index("a/seed0"), order.index("b/seed0"))
    assert "a/seed1" not in order and outcome["a/seed1"] == "not run (warm start failed)"
    assert outcome["warm_start/seed1"] == "failed (exit 1)" and outcome["b/seed0"] == "finished"
    warm_command = dict(runner.calls)["warm_start/seed0"]
    assert "--config=configs/sft.py:twx_tiny" in warm_command and "--config.sft.source=conversations" in warm_command
    assert f"--config.trainer.init_from={os.path.abspath(specs[0].warm_start.workdir)}" in dict(runner.calls)["a/seed0"]


def test_parallel_runs_overlap(tmp_path):
    specs = study_spec.run_specs(_study(seeds=(0,), names=("a", "b", "c")), str(tmp_path))
    _finish(specs[0].warm_start)
    runner = FakeRunner(delay=0.5)
    scheduler.execute(specs, parallel=3, runner=runner, log=lambda line: None)
    assert runner.max_active == 3
    with pytest.raises(ValueError, match="--parallel"):
        scheduler.execute(specs, parallel=0, runner=runner)


def test_warm_start_data_is_recorded_once_per_seed(tmp_path, monkeypatch):
    recorded = []

    def fake_record(kind, config, path):
        recorded.append((kind, config.seed, path))
        open(path, "w").close()
        return {}

    monkeypatch.setattr("spear_jax.study.warm_data.record", fake_record)
    config = _study(seeds=(0, 1))
    warm = study_spec.warm_start_specs(study_spec.run_specs(config, str(tmp_path)))
    os.makedirs(tmp_path / "warm_start_data")
    scheduler.record_warm_data(config, warm)
    scheduler.record_warm_data(config, warm)
    assert recorded == [("gold", seed, os.path.abspath(study_spec.warm_start_data_path(str(tmp_path), seed)))
                        for seed in (0, 1)]


def test_a_study_collects_the_finished_runs_only(tmp_path, monkeypatch):
    """run_study with the fake runner: the failed run is reported, its stale compact metrics from
    an earlier collection are removed, and the report covers the finished runs."""
    from spear_jax.study import report
    from spear_jax.study.__main__ import run_study

    monkeypatch.setattr("spear_jax.study.warm_data.record", _record_nothing)
    monkeypatch.setattr("spear_jax.study.__main__.check_runs", lambda specs: None)
    study_file = _write_study(tmp_path / "toy.py")
    results = tmp_path / "results"
    stale = report.compact_path(str(results), "b", 0)
    os.makedirs(os.path.dirname(stale))
    open(stale, "w").close()
    runner = FakeRunner(fail={"b/seed0"})
    runner_with_evals = lambda spec: runner(spec) or _finish_with_eval(spec)  # noqa: E731
    outcome = run_study(str(study_file), str(tmp_path / "w"), 1, str(results), runner=runner_with_evals)
    assert outcome["b/seed0"] == "failed (exit 1)" and outcome["a/seed0"] == "finished"
    assert not os.path.exists(stale)
    data = json.loads((results / "results.json").read_text())
    assert [r["seed"] for r in data["methods"]["a"]["seeds"]] == [0] and data["methods"]["b"]["seeds"] == []
    assert "B seed 0" in (results / "results.md").read_text()


def test_warm_start_data_that_cannot_be_recorded_is_a_study_config_error(tmp_path, monkeypatch):
    def refuse(kind, config, path):
        raise ValueError("raise config.rollout.max_prompt_length")

    monkeypatch.setattr("spear_jax.study.warm_data.record", refuse)
    config = _study(seeds=(4,))
    warm = study_spec.warm_start_specs(study_spec.run_specs(config, str(tmp_path)))
    with pytest.raises(study_spec.StudyConfigError, match="warm_start/seed4: recording its data: raise config"):
        scheduler.record_warm_data(config, warm)


def test_collect_reports_the_finished_runs_and_trains_nothing(tmp_path, monkeypatch, capsys):
    """``--collect`` on a sweep half done: the finished run is reported, the partial one is listed
    as missing, and no runner is called."""
    from spear_jax.study.__main__ import main

    def no_run(spec):
        raise AssertionError(f"{spec.name} ran")

    monkeypatch.setattr(scheduler, "subprocess_runner", no_run)
    study_file = _write_study(tmp_path / "toy.py")
    workdir, results = tmp_path / "w", tmp_path / "results"
    finished, partial = study_spec.run_specs(study_spec.load_study(str(study_file)), str(workdir))
    _finish_with_eval(finished)
    _save_checkpoint(partial.workdir, 1)
    _write_metrics(partial.workdir, 1)
    argv = [f"--study={study_file}", f"--workdir={workdir}", f"--results={results}", "--collect"]
    assert main(argv) == 0
    assert "1 of 2 runs finished; not yet: b/seed0" in capsys.readouterr().out
    data = json.loads((results / "results.json").read_text())
    assert data["methods"]["a"]["seeds"][0]["eval_success"] == [0.25] and data["methods"]["b"]["seeds"] == []
    assert "B seed 0" in (results / "results.md").read_text()
    assert not (results / "metrics" / "b" / "seed0.jsonl").exists()


def test_methods_option_trains_only_the_listed_methods_and_reports_the_whole_study(tmp_path, monkeypatch):
    from spear_jax.study.__main__ import run_study

    monkeypatch.setattr("spear_jax.study.warm_data.record", _record_nothing)
    monkeypatch.setattr("spear_jax.study.__main__.check_runs", lambda specs: None)
    study_file = _write_study(tmp_path / "toy.py", seeds=(0, 1), names="abc")
    runner = FakeRunner()
    outcome = run_study(str(study_file), str(tmp_path / "w"), 1, str(tmp_path / "r"),
                        runner=lambda spec: runner(spec) or _finish_with_eval(spec, 0.5), methods=["c", "a"])
    assert [name for name, _ in runner.calls] == ["warm_start/seed0", "warm_start/seed1", "a/seed0", "c/seed0",
                                                  "a/seed1", "c/seed1"]
    assert set(outcome) == {name for name, _ in runner.calls}
    assert "B seed 0, B seed 1" in (tmp_path / "r" / "results.md").read_text()  # b is listed as not run
    with pytest.raises(study_spec.StudyConfigError, match=r"--methods: \['d'\] not in the study; its methods are"):
        run_study(str(study_file), str(tmp_path / "w"), 1, str(tmp_path / "r"), runner=runner, methods=["d"])


def _record_config(spec, **changes):
    """The ``config.json`` spear_jax.main writes, of the spec's config with ``changes`` (field
    path with "__" for ".") set: what a run started before the study was edited recorded."""
    config = study_spec.resolved_config(spec)
    for field, value in changes.items():
        study_spec.set_field(config, field.replace("__", "."), value, spec.name)
    os.makedirs(spec.workdir, exist_ok=True)
    with open(os.path.join(spec.workdir, RUN_CONFIG_FILE), "w") as handle:
        handle.write(config.to_json_best_effort())


def test_a_run_recorded_under_another_config_stops_the_study_unless_kept(tmp_path):
    """A finished run whose recorded config differs from the study's is an error naming the run,
    the field (old -> new) and the fix, or is kept and logged with ``keep_finished``; a partial
    one is an error either way. An unchanged record, a raised step budget and a path linked to
    the recorded one pass."""
    specs = study_spec.run_specs(_study(), str(tmp_path))
    a, b, c = specs
    for spec in (a.warm_start, a):
        _finish(spec)
        _record_config(spec)
    scheduler.check_recorded_configs(specs)  # as recorded; c has no record yet
    _record_config(a, trainer__total_steps=TOTAL_STEPS - 1)  # a budget raised since: it continues
    scheduler.check_recorded_configs(specs)
    _record_config(a, actor__lr=1e-3, replay__buffer_size=16)
    with pytest.raises(study_spec.StudyConfigError) as error:
        scheduler.check_recorded_configs(specs)
    assert str(error.value) == (
        f"a/seed0: finished under another config than the study's (actor.lr: 0.001 -> 0.0005; "
        f"replay.buffer_size: 16 -> 32): move {a.workdir} aside to run it again, or pass --keep-finished "
        f"to keep its results as they are")
    logged = []
    scheduler.check_recorded_configs(specs, keep_finished=True, log=logged.append)
    assert logged == ["a/seed0: finished under another config (actor.lr: 0.001 -> 0.0005; "
                      "replay.buffer_size: 16 -> 32); kept (--keep-finished)"]
    _record_config(a)
    warm, data = a.warm_start, dict(a.warm_start.overrides)["sft.data_path"]
    shared = tmp_path / "other_study" / "seed0.jsonl"  # a warm start recorded in another study
    shared.parent.mkdir()
    shared.write_text("")
    _record_config(warm, sft__data_path=str(shared))
    with pytest.raises(study_spec.StudyConfigError, match="warm_start/seed0: finished .*sft.data_path"):
        scheduler.check_recorded_configs(specs)
    os.makedirs(os.path.dirname(data), exist_ok=True)
    os.symlink(shared, data)  # this study's data path is a link to that file: the same data
    scheduler.check_recorded_configs(specs)
    _save_checkpoint(b.workdir, 1)
    _record_config(b, data__group_size=8)
    with pytest.raises(study_spec.StudyConfigError, match=r"^b/seed0: partial under another config than the "
                       r"study's \(data.group_size: 8 -> 4\): move \S+ aside to run it again$"):
        scheduler.check_recorded_configs(specs, keep_finished=True, log=logged.append)


def test_the_command_line_refuses_a_changed_run_before_running_anything(tmp_path, monkeypatch, capsys):
    from spear_jax.study.__main__ import main

    runner = FakeRunner()
    monkeypatch.setattr(scheduler, "subprocess_runner", lambda spec: runner(spec) or _finish_with_eval(spec))
    monkeypatch.setattr("spear_jax.study.warm_data.record", _record_nothing)
    monkeypatch.setattr("spear_jax.study.__main__.check_runs", lambda specs: None)
    study_file = _write_study(tmp_path / "toy.py")
    workdir = tmp_path / "w"
    a, b = study_spec.run_specs(study_spec.load_study(str(study_file)), str(workdir))
    for spec in (a.warm_start, a):
        _finish_with_eval(spec)
        _record_config(spec)
    _record_config(a, actor__lr=1e-3)
    argv = [f"--study={study_file}", f"--workdir={workdir}", f"--results={tmp_path / 'r'}"]
    assert main(argv) == 2
    assert "study config error: a/seed0: finished under another config" in capsys.readouterr().err
    assert runner.calls == []
    assert main(argv + ["--keep-finished"]) == 0
    assert [name for name, _ in runner.calls] == ["b/seed0"]
    assert "a/seed0: finished under another config (actor.lr: 0.001 -> 0.0005); kept" in capsys.readouterr().out
