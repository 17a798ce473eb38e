"""The setting pilot: its config builds valid runs, a setting's row is read from its results
folder, each attempt's wall time is recorded, the committed report is rewritten byte for byte
from the committed results, and the studies' setting is the pilot's chosen one."""
import json
import math
import os
import shutil

import pytest

from configs.studies import math_methods, math_pilot, twx_ablations, twx_methods, twx_pilot
from spear_jax.study import pilot, report, scheduler
from spear_jax.study import spec as study_spec
from spear_jax.study.__main__ import check_runs

PILOT = "configs/studies/twx_pilot.py"
COMMITTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results", "twx_pilot")


def test_every_setting_is_a_valid_one_run_study_of_its_game(tmp_path):
    config = pilot.load_pilot(PILOT)
    for setting, (name, _, overrides, rl_steps) in zip(config.settings, twx_pilot.SETTINGS):
        (spec,) = study_spec.run_specs(setting.study, str(tmp_path / setting.name))
        check_runs([spec])  # the warm start is checked once its data is recorded
        for run in (spec, spec.warm_start):
            resolved = study_spec.resolved_config(run)
            params = resolved.env.kwargs.game_params
            assert (params.numLocations, params.numDistractorItems, params.includeDoors, resolved.env.max_steps) == (
                tuple(value for _, value in overrides))
        run = study_spec.resolved_config(spec)
        assert setting.name == name and run.trainer.total_steps == rl_steps
        # a run of 0 steps evaluates the warm start once (no second evaluation before training)
        assert run.trainer.eval_before_train == (rl_steps > 0)


def test_every_math_setting_sets_its_problems_and_warm_start_length(tmp_path):
    config = pilot.load_pilot("configs/studies/math_pilot.py")
    assert [s.name for s in config.settings] == [name for name, *_ in math_pilot.SETTINGS]
    for setting, (_, _, overrides, warm_steps, rl_steps, rl_overrides) in zip(config.settings, math_pilot.SETTINGS):
        (spec,) = study_spec.run_specs(setting.study, str(tmp_path / setting.name))
        check_runs([spec])
        assert study_spec.resolved_config(spec).actor.lr == dict(rl_overrides).get("actor.lr", 5e-4)
        assert study_spec.resolved_config(spec.warm_start).actor.lr == 5e-4  # the warm start is shared
        for run in (spec, spec.warm_start):
            options = study_spec.resolved_config(run).env.kwargs.generator_options
            assert options.to_dict() == {field.rsplit(".", 1)[1]: value for field, value in overrides}
            assert study_spec.resolved_config(run).rollout.max_response_length == 128
        assert study_spec.resolved_config(spec.warm_start).sft.steps == warm_steps
        assert study_spec.resolved_config(spec).trainer.total_steps == rl_steps
    assert math_pilot.PRESET == math_pilot.arithmetic(2, 6, 1, 4, ("+", "-", "*", "/"), True, True)


def test_the_math_study_runs_the_pilots_chosen_setting(tmp_path):
    """math_methods: the problems and warm start of three_terms_320, the RL lr of its lr5e-5
    attempt, for every method; its warm start at the presets' lr, its runs at 5e-5."""
    chosen = {name: (overrides, warm_steps, dict(rl)) for name, _, overrides, warm_steps, _, rl in math_pilot.SETTINGS}
    overrides, warm_steps, rl = chosen["three_terms_320_lr5e-5"]
    assert overrides == chosen["three_terms_320"][0] == math_methods.PROBLEMS
    specs = study_spec.run_specs(math_methods.get_config(), str(tmp_path))
    check_runs(specs)
    assert {spec.method for spec in specs} == {"grpo", "drbot", "spear_drbot"} and len(specs) == 9
    for spec in specs:
        run, warm = study_spec.resolved_config(spec), study_spec.resolved_config(spec.warm_start)
        assert run.actor.lr == rl["actor.lr"] and warm.actor.lr == 5e-4 and warm.sft.steps == warm_steps
        for config in (run, warm):
            options = config.env.kwargs.generator_options
            assert options.to_dict() == {field.rsplit(".", 1)[1]: value for field, value in overrides}
            assert config.rollout.max_response_length == 128


def test_the_math_studys_replay_trigger_is_a_small_share_of_the_staleness_window(tmp_path):
    """One row per math episode: more than 1.5 x buffer_size rows above P50 must be at most a tenth
    of the rows of the staleness window (the tiny preset's 32 asked for 30%, and replay never fired)."""
    for spec in study_spec.run_specs(math_methods.get_config(), str(tmp_path)):
        config = study_spec.resolved_config(spec)
        window = config.data.train_tasks_per_step * config.data.group_size * config.replay.tolerate_steps
        assert config.env.row_layout == "trajectory" and config.replay.buffer_size == 8
        assert math.floor(1.5 * config.replay.buffer_size) + 1 <= 0.1 * window


def _write_setting(folder, walls=True, metrics=True):
    """A hand-made results folder of one setting: 300 gold episodes of 1800 turns, held-out
    success 0.25 -> 0.40 over 10 RL steps, a warm start of 150 s and an RL run of 200 + 100 s."""
    setting = twx_pilot.setting_study("coinX", twx_pilot.coin(5, 0, 0, 12), 10)
    report.write_study_json(str(folder), json.loads(setting.to_json()))
    (folder / "warm_start_data").mkdir()
    (folder / "warm_start_data" / "seed0.json").write_text(
        json.dumps({"episodes": 300, "rows": 1800, "gold_win_rate": 0.8}))
    if walls:
        (folder / pilot.WALL_FILE).write_text(json.dumps({"warm_start": [150.0], "rl": [200.0, 100.0]}))
    if metrics:
        path = report.compact_path(str(folder), "drbot_grpo", 0)
        os.makedirs(os.path.dirname(path))
        records = [{"split": "eval", "step": 0, "success_rate": 0.25, "episode_length": 9.0},
                   {"split": "eval", "step": 10, "success_rate": 0.4, "episode_length": 7.5}]
        records += [{"split": "train", "step": s, "success_rate": s / 20} for s in range(1, 11)]
        with open(path, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)


def test_setting_row_reads_gold_length_success_and_minutes(tmp_path):
    _write_setting(tmp_path)
    row = pilot.setting_row(str(tmp_path))
    assert row["mean_gold_steps"] == 6.0 and row["gold_win_rate"] == 0.8
    assert (row["warm_start_success"], row["rl_success"]) == (0.25, 0.4)
    assert row["eval_episode_length"] == [9.0, 7.5] and row["train_success"] == [s / 20 for s in range(1, 11)]
    assert row["warm_start_minutes"] == 2.5 and row["rl_minutes"] == 5.0 and row["rl_steps"] == 10


def test_a_setting_of_no_rl_steps_has_a_warm_start_success_and_no_rl_result(tmp_path):
    _write_setting(tmp_path, metrics=False)
    study = json.loads((tmp_path / "study.json").read_text())
    study["budget"]["total_steps"] = 0
    (tmp_path / "study.json").write_text(json.dumps(study))
    path = report.compact_path(str(tmp_path), "drbot_grpo", 0)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as handle:
        handle.write(json.dumps({"split": "eval", "step": 0, "success_rate": 0.25, "episode_length": 9.0}) + "\n")
    row = pilot.setting_row(str(tmp_path))
    assert row["warm_start_success"] == 0.25 and row["rl_success"] is None and row["rl_steps"] == 0
    assert pilot._row({"label": "x", "results": row})[4:7] == (0, "-", "-")


def test_report_row_of_a_setting_and_of_one_not_run_yet(tmp_path):
    results = tmp_path / "results"
    _write_setting(results / "coin5")
    _write_setting(results / "coin7", walls=False, metrics=False)
    config = pilot.load_pilot(PILOT)
    config.settings = tuple(s for s in config.settings if s.name in ("coin5", "coin7"))
    pilot.write_pilot_study(str(results), config)
    text = pilot.write_report(str(results)) and (results / "report.md").read_text()
    # first half of train success: steps 1-5 -> mean 0.15; second half 6-10 -> 0.4
    assert ("| coin, 5 rooms, max 12 steps | 6.00 | 0.80 | 0.250 | 10 | 0.400 | 0.150 | 9.00 / 7.50 | "
            "0.150 / 0.400 | 2.5 | 5.0 | 0.50 |") in text
    assert "| coin, 7 rooms, max 16 steps | 6.00 | 0.80 | - | 10 | - | - | - | - | - | - | - |" in text


def test_timed_runner_records_each_attempt(tmp_path, monkeypatch):
    spec = study_spec.RunSpec("rl", "m", 0, str(tmp_path / "run"), "configs/drbot.py:twx_tiny", (), 1)
    statuses = iter((1, 0))

    def fake_runner(run):
        os.makedirs(run.workdir, exist_ok=True)
        return next(statuses)

    monkeypatch.setattr(scheduler, "subprocess_runner", fake_runner)
    assert pilot.timed_runner(spec) == 1 and pilot.timed_runner(spec) == 0
    attempts = json.loads((tmp_path / "run" / pilot.WALL_FILE).read_text())
    assert len(attempts) == 2 and all(a >= 0 for a in attempts)


def test_a_setting_of_two_methods_or_an_unknown_setting_name_is_refused(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import ml_collections\n"
        "from configs.studies._common import method, study\n"
        "def get_config():\n"
        "    s = study('x', 'x', (0,), 'a', (method('a', 'A', 'configs/drbot.py:twx_tiny'),\n"
        "              method('b', 'B', 'configs/grpo.py:twx_tiny')), 'configs/sft.py:twx_tiny', 'gold', 1, 1, 8)\n"
        "    return ml_collections.ConfigDict({'name': 'p', 'title': 't',\n"
        "        'settings': (ml_collections.ConfigDict({'name': 'x', 'label': 'X', 'study': s}),)})\n")
    with pytest.raises(study_spec.StudyConfigError, match="one method on one seed"):
        pilot.load_pilot(str(bad))
    with pytest.raises(study_spec.StudyConfigError, match="--settings: unknown"):
        pilot.run_pilot(pilot.load_pilot(PILOT), str(tmp_path / "w"), str(tmp_path / "r"), only=("coin9",))


@pytest.mark.parametrize("committed", [COMMITTED, os.path.join(os.path.dirname(COMMITTED), "math_pilot")])
def test_report_command_rewrites_the_committed_pilot_byte_for_byte(tmp_path, committed):
    folder = tmp_path / os.path.basename(committed)
    shutil.copytree(committed, folder)
    for name in ("pilot.json", "report.md"):
        (folder / name).unlink()
    assert pilot.main(["--report", str(folder)]) == 0
    for name in ("pilot.json", "report.md"):
        assert (folder / name).read_bytes() == open(os.path.join(committed, name), "rb").read(), name


def test_the_studies_play_the_chosen_setting_and_it_is_neither_hopeless_nor_saturated():
    chosen = twx_pilot.setting_overrides(twx_pilot.CHOSEN)
    assert twx_methods.OVERRIDES == chosen and twx_ablations.OVERRIDES == chosen
    results = json.load(open(os.path.join(COMMITTED, "pilot.json")))
    (row,) = [s["results"] for s in results["settings"] if s["name"] == twx_pilot.CHOSEN]
    assert 0.15 <= row["warm_start_success"] <= 0.5
