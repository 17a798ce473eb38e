"""Presets are a table (``configs.presets.PRESETS``); each gives the settings it always gave."""
import pytest

from configs import base, presets
from configs._compose import build_config
from environments.registry import env_type

FIELDS = ("env.name", "env.domain", "env.row_layout", "env.max_steps", "model.preset", "model.checkpoint_format",
          "data.train_tasks_per_step", "data.group_size", "data.eval_split", "rollout.max_prompt_length",
          "rollout.max_response_length", "actor.lr", "trainer.total_steps", "sft.enable",
          "algorithm.toolcall_reward_recipe", "rollout.max_decode_rows")
EXPECTED = {
    "twx_tiny": ("textworld_express", "agent", "step", 8, "tiny", "random", 8, 4, "test", 320, 32, 5e-4, 20,
                 True, "agent", 0),
    "math_tiny": ("math", "math", "trajectory", 2, "tiny", "random", 8, 4, "test", 320, 32, 5e-4, 20,
                  False, "qwen2.5", 0),
    "twx_smollm2": ("textworld_express", "agent", "step", 8, "smollm2-135m", "gguf", 8, 4, "test", 1024, 96,
                    1e-5, 100, True, "agent", 0),
    "math_smollm2": ("math", "math", "trajectory", 2, "smollm2-135m", "gguf", 8, 4, "test", 1024, 96, 1e-5,
                     100, False, "qwen2.5", 0),
    "alfworld_qwen2.5_1.5b": ("alfworld", "agent", "step", 50, "qwen2.5-1.5b", "hf", 32, 8, "valid_unseen",
                              2048, 512, 1e-6, 200, False, "agent", 0),
    "webshop_qwen2.5_1.5b": ("webshop", "agent", "step", 15, "qwen2.5-1.5b", "hf", 32, 8, "test", 4096, 512,
                             1e-6, 350, False, "agent", 0),
    "aime_qwen2.5_32b": ("math", "math", "trajectory", 8, "qwen2.5-32b", "hf", 128, 16, "test", 2048, 16384,
                         1e-6, 300, False, "qwen2.5", 128),
    "aime_qwen3_32b": ("math", "math", "trajectory", 8, "qwen3-32b", "hf", 128, 16, "test", 2048, 16384, 1e-6,
                       300, False, "qwen3", 128),
}


def _value(c, path):
    for part in path.split("."):
        c = c[part]
    return c


def test_the_table_names_every_preset_once():
    assert tuple(presets.PRESETS) == base.PRESETS == tuple(EXPECTED)
    assert base.DEFAULT_PRESET in presets.PRESETS


@pytest.mark.parametrize("name", EXPECTED)
def test_each_preset_gives_its_settings(name):
    c = build_config("spear", name)
    assert c.preset == name
    assert tuple(_value(c, f) for f in FIELDS) == EXPECTED[name]
    assert c.env.domain == env_type(c.env.name).domain


def test_presets_that_share_edits_differ_only_where_their_own_edits_do():
    alfworld, webshop = build_config("grpo", "alfworld_qwen2.5_1.5b"), build_config("grpo", "webshop_qwen2.5_1.5b")
    assert webshop.env.kwargs.to_dict() == {"data_dir": "", "product_set": "1000", "human_goals": False,
                                            "shop_seed": 0}
    assert not alfworld.env.kwargs.to_dict()
    for shared in ("model", "data.group_size", "rollout.max_response_length", "rollout.eval_temperature"):
        assert _value(alfworld, shared) == _value(webshop, shared)


def test_an_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'twx_huge'; choose one of twx_tiny, math_tiny"):
        build_config("grpo", "twx_huge")
