"""Which config changes a resumed run accepts (spear_jax.resume)."""
import importlib

import pytest

from spear_jax import resume
from spear_jax.run_config import ConfigError


def _config(method="spear", preset="twx_tiny"):
    c = importlib.import_module(f"configs.{method}").get_config(preset)
    c.unlock()
    return c


def test_safe_changes_are_allowed_and_reported():
    saved = resume.config_record(_config())
    c = _config()
    c.trainer.total_steps, c.trainer.eval_every, c.data.eval_episodes = 500, 7, 3
    c.mesh.fsdp, c.rollout.decode_layers = 2, "unrolled"
    c.trainer.compilation_cache_dir = "/scratch/xla"
    changes = resume.check_resumable(saved, c, "run/checkpoints/4")
    assert changes == [f"config.data.eval_episodes: {saved['data']['eval_episodes']!r} -> 3",
                       "config.mesh.fsdp: 1 -> 2",
                       "config.rollout.decode_layers: 'auto' -> 'unrolled'",
                       "config.trainer.compilation_cache_dir: '' -> '/scratch/xla'",
                       f"config.trainer.eval_every: {saved['trainer']['eval_every']!r} -> 7",
                       f"config.trainer.total_steps: {saved['trainer']['total_steps']!r} -> 500"]
    assert resume.check_resumable(saved, _config(), "x") == []


def test_incompatible_changes_are_refused_field_by_field():
    saved = resume.config_record(_config())
    c = _config("grpo")  # another method: name, replay switch, ...
    c.seed = 3
    c.trainer.total_steps = 999  # allowed, so not listed among the refused
    with pytest.raises(ConfigError) as refused:
        resume.check_resumable(saved, c, "run/checkpoints/4")
    message = str(refused.value)
    assert "cannot resume run/checkpoints/4" in message
    assert "config.seed: 0 -> 3" in message and f"config.name: {saved['name']!r} -> 'grpo'" in message
    assert "config.replay.enable: True -> False" in message
    assert "--config.seed=0" in message and "new --workdir" in message
    assert "config.trainer.total_steps:" not in message


def test_a_record_older_than_an_added_field_resumes_with_the_value_it_implied():
    saved = resume.config_record(_config())
    for section, name in (("env", "domain"), ("actor", "loss_terms"), ("replay", "loss_terms"),
                          ("rollout", "decode_layers"), ("trainer", "compilation_cache_dir")):
        del saved[section][name]
    assert resume.check_resumable(saved, _config(), "x") == []
    c = _config()
    c.replay.loss_terms = ("pg",)  # not what the saved run did
    with pytest.raises(ConfigError, match=r"config.replay.loss_terms: \['pg', 'entropy'\] -> \['pg'\]"):
        resume.check_resumable(saved, c, "x")
    math_saved = resume.config_record(_config("grpo", "math_tiny"))
    del math_saved["env"]["domain"]
    assert resume.check_resumable(math_saved, _config("grpo", "math_tiny"), "x") == []


def test_a_field_present_on_one_side_only_is_a_change():
    saved = resume.config_record(_config())
    del saved["actor"]["lr"]
    with pytest.raises(ConfigError, match=r"config.actor.lr: '<absent>' -> "):
        resume.check_resumable(saved, _config(), "x")
    with pytest.raises(ConfigError, match="records no config"):
        resume.check_resumable(None, _config(), "x")
