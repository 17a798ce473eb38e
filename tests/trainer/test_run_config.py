import importlib

import pytest

from configs.base import PRESETS
from environments.registry import make_env
from spear_jax import run_config
from spear_jax.run_config import ConfigError
from tests.environments.webshop_data import write_webshop_data_dir

METHODS = ("grpo", "drbot", "gigpo", "spear", "sft")


def _config(method="spear", arg=None):
    return importlib.import_module(f"configs.{method}").get_config(arg)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_the_default_preset_validates(method):
    run_config.validate(_config(method), num_devices=8)


@pytest.mark.parametrize("preset", [p for p in PRESETS if "qwen" not in p])
def test_local_presets_validate(preset):
    run_config.validate(_config("spear", preset), num_devices=8)


@pytest.mark.parametrize("preset", [p for p in PRESETS if "qwen" in p])
def test_paper_presets_ask_for_weights(preset):
    with pytest.raises(ConfigError, match="config.model.checkpoint_path"):
        run_config.validate(_config("spear", preset), num_devices=8)


def test_paper_settings_carry_reference_values():
    c = _config("spear", "alfworld_qwen2.5_1.5b")
    assert (c.actor.clip_ratio_low, c.actor.clip_ratio_high, c.actor.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert c.actor.loss_agg_mode == "seq-mean-token-sum-norm" and c.actor.loss_mode == "clip_cov"
    assert (c.replay.clip_cov_ratio, c.replay.clip_cov_lb, c.replay.clip_cov_ub) == (0.02, 2.0, 60.0)
    assert (c.replay.buffer_size, c.replay.tolerate_steps, c.replay.weight_decay) == (2048, 5, -1.0)
    assert (c.replay.max_loss_steps, c.algorithm.max_toolcall_steps) == (100, 200)
    assert c.data.train_tasks_per_step * c.data.group_size == 256 and c.env.max_steps == 50
    assert not c.actor.use_kl_loss and not c.algorithm.use_kl_in_reward
    assert c.model.compute_dtype == c.rollout.weight_dtype == "bfloat16"
    math = _config("spear", "aime_qwen3_32b")
    assert math.actor.entropy_coeff == 0.0 and math.replay.clip_cov_ignores_replay_params
    assert math.algorithm.toolcall_reward_recipe == "qwen3" and math.env.row_layout == "trajectory"
    assert _config("gigpo", "webshop_qwen2.5_1.5b").replay.max_loss_steps == 200
    grpo = _config("grpo")
    assert grpo.algorithm.norm_adv_by_std_in_grpo and grpo.actor.clip_ratio_high == 0.2


def test_spear_base_argument():
    assert _config("spear", "twx_tiny,drbot_gigpo").algorithm.adv_estimator == "gigpo"
    with pytest.raises(ValueError, match="PRESET,BASE"):
        _config("spear", "twx_tiny,gigpo,extra")
    with pytest.raises(ValueError, match="must be PRESET"):
        _config("grpo", "twx_tiny,gigpo")
    with pytest.raises(ValueError, match="unknown preset"):
        _config("grpo", "no_such_preset")
    with pytest.raises(ValueError, match="unknown base"):
        _config("spear", "twx_tiny,ppo")


def test_unknown_fields_are_rejected():
    c = _config()
    with pytest.raises(AttributeError, match="does not exist"):
        c.actor.clip_ratio = 0.3


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: setattr(c.data, "group_size", 1), "config.data.group_size"),
        (lambda c: setattr(c.actor, "ppo_micro_batch_size", 6), "config.actor.ppo_micro_batch_size"),
        (lambda c: setattr(c.actor, "ppo_mini_batch_size", 48), "ppo_mini_batch_size"),
        (lambda c: setattr(c.actor, "clip_ratio_low", 1.5), "config.actor.clip_ratio_low"),
        (lambda c: setattr(c.actor, "clip_ratio_c", 0.5), "config.actor.clip_ratio_c"),
        (lambda c: setattr(c.actor, "loss_agg_mode", "sum"), "config.actor.loss_agg_mode"),
        (lambda c: setattr(c.actor, "loss_mode", "ppo"), "loss_mode"),
        (lambda c: setattr(c.algorithm, "adv_estimator", "ppo"), "config.algorithm.adv_estimator"),
        (lambda c: setattr(c.algorithm, "use_toolcall_reward", "linear"), "use_toolcall_reward"),
        (lambda c: setattr(c.env, "name", "minecraft"), "config.env.name"),
        (lambda c: setattr(c.replay, "buffer_size", 0), "config.replay.buffer_size"),
        (lambda c: setattr(c.replay, "clip_cov_lb", 70.0), "clip_cov_lb"),
        (lambda c: setattr(c.mesh, "tensor", 3), "config.mesh"),
        (lambda c: setattr(c.model, "checkpoint_format", "hf"), "config.model.checkpoint_path"),
        (lambda c: setattr(c.model, "checkpoint_path", "/nonexistent"), "config.model.checkpoint_path"),
        (lambda c: setattr(c.trainer, "length_buckets", (16,)), "config.trainer.length_buckets"),
        (lambda c: setattr(c.env, "prompt_template", "short"), "config.env.prompt_template"),
        (lambda c: setattr(c.rollout, "weight_dtype", "int8"), "config.rollout.weight_dtype"),
        (lambda c: setattr(c.sft, "source", "web"), "config.sft.source"),
        (lambda c: setattr(c.algorithm, "grpo_statistics_over", "first_row"),
         "config.algorithm.grpo_statistics_over"),
        (lambda c: setattr(c.actor, "kl_loss_type", "k4"), "config.actor.kl_loss_type"),
        (lambda c: (setattr(c.sft, "enable", True), setattr(c.sft, "source", "conversations")),
         "config.sft.data_path"),
    ],
)
def test_bad_configs_name_the_field(edit, message):
    c = _config()
    c.unlock()
    edit(c)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        run_config.validate(c, num_devices=8)


@pytest.mark.parametrize("field, value", [("algorithm.grpo_statistics_over", "trajectories_first_row"),
                                          ("algorithm.grpo_statistics_over", "trajectories"),
                                          ("actor.kl_loss_type", "kl")])
def test_reference_option_names_validate(field, value):
    c = _config()
    section, name = field.split(".")
    setattr(c[section], name, value)
    run_config.validate(c, num_devices=8)


def test_gigpo_needs_step_rows():
    c = _config("gigpo", "math_tiny")
    with pytest.raises(ConfigError, match="row_layout"):
        run_config.validate(c, num_devices=8)


def test_mesh_resolution():
    c = _config()
    assert run_config.mesh_shape(c, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    c.unlock()
    c.mesh.fsdp, c.mesh.tensor = 2, 2
    assert run_config.mesh_shape(c, 8) == {"data": 2, "fsdp": 2, "tensor": 2}


def _webshop(data_dir, **kwargs):
    c = _config("drbot")
    c.unlock()
    c.env.name = "webshop"
    c.env.kwargs = {"data_dir": str(data_dir), **kwargs}
    return c


def test_webshop_data_dir_is_checked_at_start(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.env\.kwargs: data_dir = .* is not a directory"):
        run_config.validate(_webshop(tmp_path / "nowhere"), num_devices=8)
    with pytest.raises(ConfigError, match=r"config\.env\.kwargs: data_dir = .* lacks "
                                          r"items_shuffle_1000\.json, items_ins_v2_1000\.json"):
        run_config.validate(_webshop(tmp_path), num_devices=8)
    data_dir = write_webshop_data_dir(tmp_path / "data")
    run_config.validate(_webshop(data_dir), num_devices=8)
    with pytest.raises(ConfigError, match=r"config\.env\.kwargs: data_dir = .* lacks items_human_ins"):
        run_config.validate(_webshop(data_dir, human_goals=True), num_devices=8)
    with pytest.raises(ConfigError, match=r"config\.env\.kwargs: product_set = 'full'"):
        run_config.validate(_webshop(data_dir, product_set="full"), num_devices=8)


def test_webshop_preset_takes_the_data_dir_from_the_command_line(tmp_path):
    data_dir = write_webshop_data_dir(tmp_path / "data")
    c = _config("drbot", "webshop_qwen2.5_1.5b")
    c.env.kwargs.data_dir = data_dir                   # --config.env.kwargs.data_dir=...
    assert c.env.kwargs.to_dict() == {"data_dir": data_dir, "product_set": "1000",
                                      "human_goals": False, "shop_seed": 0}
    env = make_env(c.env.name, split="train", seed=c.seed, max_steps=c.env.max_steps,
                   **c.env.kwargs.to_dict())
    assert env.shop.products["B000000000"].title == "Lumina model0 Tea Tree Body Scrub"
