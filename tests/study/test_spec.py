"""Study configs read into runs: the shipped studies build valid run configs, the commands carry
the shared budget, and a bad study config is refused naming the field."""
import os

import pytest

from configs.studies._common import method, study
from spear_jax.study import spec as study_spec
from spear_jax.study.__main__ import check_runs, main

STUDIES = ("configs/studies/twx_methods.py", "configs/studies/twx_ablations.py", "configs/studies/math_methods.py")


@pytest.mark.parametrize("path", STUDIES)
def test_shipped_studies_build_valid_run_configs(path, tmp_path):
    config = study_spec.load_study(path)
    specs = study_spec.run_specs(config, str(tmp_path))
    assert len(specs) == len(config.methods) * len(config.seeds)
    check_runs(specs)
    for spec in specs:
        run = study_spec.resolved_config(spec)
        assert (run.trainer.total_steps, run.trainer.eval_every, run.data.eval_episodes) == (
            config.budget.total_steps, config.budget.eval_every, config.budget.eval_episodes)
        assert run.seed == spec.seed and run.trainer.init_from == os.path.abspath(spec.warm_start.workdir)


def test_paper_table_rows_and_ablations_change_what_they_name(tmp_path):
    methods = {s.method: study_spec.resolved_config(s) for s in study_spec.run_specs(
        study_spec.load_study(STUDIES[0]), str(tmp_path)) if s.seed == 0}
    assert methods["gigpo"].algorithm.adv_estimator == "gigpo" and not methods["gigpo"].replay.enable
    assert methods["spear_drbot_gigpo"].replay.enable and methods["spear_drbot_gigpo"].algorithm.adv_estimator == "gigpo"
    assert methods["drbot_grpo"].actor.clip_ratio_high == 0.28 and methods["grpo"].actor.clip_ratio_high == 0.2
    ablations = {s.method: study_spec.resolved_config(s) for s in study_spec.run_specs(
        study_spec.load_study(STUDIES[1]), str(tmp_path)) if s.seed == 0}
    full = ablations["spear"]
    assert full.algorithm.use_toolcall_reward == "cosine" and ablations["no_toolcall_reward"].algorithm.use_toolcall_reward == "none"
    assert full.replay.enable and not ablations["no_sil"].replay.enable
    assert full.replay.weight_decay <= 0 and ablations["no_recalibration"].replay.weight_decay == 1.0
    assert full.actor.loss_mode == "clip_cov" and ablations["no_clip_cov"].actor.loss_mode == "vanilla"


def test_the_warm_start_data_kinds_are_the_recorders():
    from spear_jax.study import warm_data

    assert set(study_spec.WARM_START_DATA) == set(warm_data.RECORDERS)


def test_command_passes_every_override_as_a_flag(tmp_path):
    config = study("toy", "toy", (3,), "a", (method("a", "A", "configs/spear.py:twx_tiny,drbot",
                                                      (("replay.enable", False), ("trainer.length_buckets", (64, 128)))),),
                   "configs/sft.py:twx_tiny", "gold", 7, 2, 16, overrides=(("env.max_steps", 4),))
    (spec,) = study_spec.run_specs(config, str(tmp_path))
    argv = study_spec.command(spec, python="python")
    assert argv[:5] == ["python", "-m", "spear_jax.main", "--config=configs/spear.py:twx_tiny,drbot",
                        f"--workdir={tmp_path}/runs/a/seed3"]
    for flag in ("--config.env.max_steps=4", "--config.trainer.total_steps=7", "--config.trainer.eval_every=2",
                 "--config.trainer.checkpoint_every=2", "--config.data.eval_episodes=16", "--config.seed=3",
                 "--config.replay.enable=False", "--config.trainer.length_buckets=(64, 128)"):
        assert flag in argv


@pytest.mark.parametrize("edit, message", [
    (lambda c: setattr(c, "baseline", "nope"), "baseline 'nope' is not one of the methods"),
    (lambda c: setattr(c.warm_start, "data", "files"), "warm_start.data 'files' must be one of"),
    (lambda c: setattr(c, "seeds", (1, 1)), "seeds must be a non-empty tuple of distinct ints"),
    (lambda c: setattr(c, "methods", c.methods + (method("a", "A2", "configs/grpo.py:twx_tiny"),)),
     "repeated names"),
    (lambda c: setattr(c, "methods", c.methods + (method("warm_start", "W", "configs/grpo.py:twx_tiny"),)),
     "'warm_start' is the warm starts' directory"),
])
def test_a_bad_study_config_is_refused_naming_the_field(edit, message):
    config = study("toy", "toy", (0,), "a", (method("a", "A", "configs/grpo.py:twx_tiny"),),
                   "configs/sft.py:twx_tiny", "gold", 1, 1, 8)
    edit(config)
    with pytest.raises(study_spec.StudyConfigError, match=message):
        study_spec.check_study(config, "toy.py")


def test_an_unknown_override_field_is_refused_before_anything_runs(tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text(
        "from configs.studies._common import method, study\n"
        "def get_config():\n"
        "    return study('bad', 'bad', (0,), 'a', (method('a', 'A', 'configs/grpo.py:twx_tiny',\n"
        "                 (('actor.clip_ratio', 0.3),)),), 'configs/sft.py:twx_tiny', 'gold', 1, 1, 8)\n")
    assert main([f"--study={path}", f"--workdir={tmp_path / 'w'}"]) == 2
    assert "a/seed0: override 'actor.clip_ratio': the config has no field 'clip_ratio'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
