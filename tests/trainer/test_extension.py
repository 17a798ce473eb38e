"""Extension by registration: an advantage estimator that needs an extra per-row input is added
in this module (its estimator and its input's provider registered, nothing else) and selected
with one config line; it then trains an RL step through the real trainer."""
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax import run_config
from spear_jax.objectives.advantages import grpo_advantages, register_advantage_estimator
from spear_jax.prepare import register_advantage_input
from spear_jax.run_config import ConfigError
from tests.trainer.test_trainer import _coin, _config, _run, _train_records

SEEN = {}


def turn_bonus(batch, rows):
    """[B] float32: 0.01 per assistant turn of the row (0 on padding rows)."""
    return (0.01 * batch["num_turns"]).astype(np.float32)


def grpo_with_turn_bonus(inputs, config):
    """GRPO's advantage plus the row's turn bonus."""
    advantages, metrics = grpo_advantages(inputs, config)
    bonus = inputs.extra["turn_bonus"]
    advantages = jnp.where(inputs.row_valid, advantages + bonus, 0.0)
    SEEN.update(bonus=np.asarray(bonus), advantages=np.asarray(advantages), row_valid=np.asarray(inputs.row_valid))
    metrics["turn_bonus_mean"] = jnp.sum(jnp.where(inputs.row_valid, bonus, 0.0)) / jnp.sum(inputs.row_valid)
    return advantages, metrics


register_advantage_input("turn_bonus", turn_bonus)
register_advantage_estimator("grpo_turn_bonus", grpo_with_turn_bonus, inputs=("turn_bonus",),
                             options=lambda algorithm: {"normalize_by_std": False})


def test_a_registered_name_passes_validation_and_unknown_names_list_it():
    c = _config("grpo")
    c.algorithm.adv_estimator = "grpo_turn_bonus"
    run_config.validate(c, num_devices=8)
    assert run_config.advantage_setup(c).config.normalize_by_std is False  # its own options
    c.algorithm.adv_estimator = "nope"
    with pytest.raises(ConfigError, match="registered estimators.*'grpo_turn_bonus'"):
        run_config.validate(c, num_devices=8)


@pytest.mark.slow
def test_a_registered_estimator_with_an_extra_input_trains_a_step(tmp_path):
    c = _coin(_config("grpo", steps=1))
    c.algorithm.adv_estimator = "grpo_turn_bonus"  # the one config line
    SEEN.clear()
    _run(c, tmp_path, random_admissible=True)
    (record,) = _train_records(tmp_path)
    valid = SEEN["row_valid"]
    np.testing.assert_allclose(SEEN["bonus"][valid], 0.01)  # step rows: one turn each
    assert record["advantage/turn_bonus_mean"] == pytest.approx(0.01)
    assert record["advantage/mean_abs"] == pytest.approx(float(np.abs(SEEN["advantages"][valid]).mean()), rel=1e-6)
    assert record["actor/optimizer_steps"] >= 1


def test_an_estimator_declares_the_row_layouts_it_works_on():
    c = _config("gigpo", preset="math_tiny")
    c.algorithm.adv_estimator = "gigpo"
    with pytest.raises(ConfigError, match=r"adv_estimator='gigpo' needs config.env.row_layout in \('step',\)"):
        run_config.validate(c, num_devices=8)
