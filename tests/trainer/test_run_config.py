import importlib
import json
import math

import ml_collections
import pytest

from configs.algorithms import BASES
from configs.base import PRESETS, base_config
from environments.registry import make_env
from spear_jax import run_config
from spear_jax.model import PRESETS as MODEL_PRESETS, to_hf_config
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
        (lambda c: setattr(c.rollout, "max_decode_rows", -1), "config.rollout.max_decode_rows"),
        (lambda c: setattr(c.rollout, "decode_layers", "scan"), "config.rollout.decode_layers"),
        (lambda c: (setattr(c.rollout, "decode_layers", "unrolled"), setattr(c.mesh, "tensor", 2)),
         "config.rollout.decode_layers='unrolled': must be 'auto' under a mesh that shards layers"),
        (lambda c: (setattr(c.rollout, "decode_layers", "scanned"), setattr(c.mesh, "fsdp", 2)),
         "config.rollout.decode_layers='scanned': must be 'auto' under a mesh that shards layers"),
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


def test_unrolled_decode_validates_when_every_device_holds_whole_layers():
    c = _config()
    c.rollout.decode_layers = "unrolled"
    run_config.validate(c, num_devices=8)  # mesh data=-1: 8 x 1 x 1


def test_gigpo_needs_step_rows():
    c = _config("gigpo", "math_tiny")
    with pytest.raises(ConfigError, match="row_layout"):
        run_config.validate(c, num_devices=8)


def test_domain_is_declared_not_inferred():
    assert _config("grpo", "math_tiny").env.domain == "math" and _config().env.domain == "agent"
    c = _config()
    c.env.domain = "robot"
    with pytest.raises(ConfigError, match="env.domain"):
        run_config.validate(c, num_devices=8)


def test_mesh_resolution():
    c = _config()
    assert run_config.mesh_shape(c, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    c.unlock()
    c.mesh.fsdp, c.mesh.tensor = 2, 2
    assert run_config.mesh_shape(c, 8) == {"data": 2, "fsdp": 2, "tensor": 2}


# (field, bad value, text the error must hold besides "config.<field>=<value>").
BAD_VALUES = [
    ("seed", -1, "in [0, 4294967295]"),
    ("seed", 2**32, "32-bit"),
    ("model.chat_format", "alpaca", "'chatml'"),
    ("model.logprob_chunk_size", 0, ">= 1"),
    ("env.max_steps", 0, ">= 1"),
    ("env.history_length", -1, ">= 0"),
    ("data.train_tasks_per_step", 0, ">= 1"),
    ("data.group_size", 1, "singleton"),
    ("data.eval_episodes", 0, ">= 1"),
    ("data.eval_episodes", -4, ">= 1"),
    ("data.eval_split", "validation", "one of 'train', 'dev', 'test'"),
    ("mesh.fsdp", 0, ">= 1, or -1"),
    ("rollout.temperature", -0.5, "> 0"),
    ("rollout.temperature", 0.0, "eval_temperature=0"),
    ("rollout.top_p", 0.0, "in (0, 1]; use 1.0 to disable nucleus sampling"),
    ("rollout.top_p", 1.5, "in (0, 1]"),
    ("rollout.top_p", math.nan, "in (0, 1]"),
    ("rollout.top_k", -1, "use 0 to disable top-k"),
    ("rollout.top_k", 4097, "<= the vocabulary size 4096"),
    ("rollout.max_prompt_length", 0, ">= 1"),
    ("rollout.max_prompt_length", 4090, "4096 positions"),
    ("rollout.max_response_length", 0, ">= 1"),
    ("rollout.eval_temperature", -0.1, ">= 0"),
    ("rollout.eval_top_p", 0.0, "in (0, 1]"),
    ("rollout.kv_cache_dtype", "float16", "'bfloat16'"),
    ("algorithm.grpo_statistics_over", "all-rows", "'trajectories'"),
    ("algorithm.gigpo_gamma", 1.5, "in [0, 1]"),
    ("algorithm.gigpo_step_advantage_w", -1.0, ">= 0"),
    ("algorithm.gigpo_mode", "std", "'mean_norm'"),
    ("algorithm.kl_coef", -0.1, ">= 0"),
    ("algorithm.invalid_action_penalty_coef", -0.1, ">= 0"),
    ("algorithm.rollout_filter_ratio", 0.0, "in (0, 1]"),
    ("algorithm.rollout_filter_std_ddof", 2, "one of 0, 1"),
    ("algorithm.max_toolcall_steps", 0, ">= 1"),
    ("algorithm.toolcall_reward_recipe", "qwen4", "'qwen3'"),
    ("actor.lr", 0.0, "> 0"),
    ("actor.lr", math.inf, "> 0"),
    ("actor.lr_schedule", "linear", "'cosine'"),
    ("actor.lr_warmup_steps", -1, ">= 0"),
    ("actor.weight_decay", -0.01, ">= 0"),
    ("actor.grad_clip", 0.0, "> 0"),
    ("actor.ppo_epochs", 0, ">= 1"),
    ("actor.ppo_micro_batch_size", 0, ">= 1"),
    ("actor.clip_ratio_low", 1.0, "in (0, 1)"),
    ("actor.clip_ratio_high", 0.0, "> 0"),
    ("actor.clip_ratio_c", 1.0, "> 1"),
    ("actor.log_ratio_clamp", 0.0, "> 0"),
    ("actor.loss_agg_max_response_length", 0, ">= 1"),
    ("actor.loss_mode", "ppo", "'clip_cov'"),
    ("actor.clip_cov_ratio", 0.0, "in (0, 1]"),
    ("actor.clip_cov_lb", 5.0, "must be < config.actor.clip_cov_ub=5.0"),
    ("actor.clip_cov_lb", math.nan, "a finite number"),
    ("actor.clip_cov_ub", 0.5, "config.actor.clip_cov_lb=1.0: must be < config.actor.clip_cov_ub=0.5"),
    ("actor.kl_cov_ratio", 2.0, "in (0, 1]"),
    ("actor.ppo_kl_coef", -1.0, ">= 0"),
    ("actor.entropy_coeff", -0.001, ">= 0"),
    ("actor.kl_loss_coef", -0.1, ">= 0"),
    ("actor.kl_loss_type", "k4", "'low_var_kl'"),
    ("algorithm.kl_penalty", "k4", "'low_var_kl'"),
    ("replay.buffer_size", 0, ">= 1"),
    ("replay.baseline_buffer_size", 0, ">= 1"),
    ("replay.tolerate_steps", -1, ">= 0"),
    ("replay.weight_decay", math.inf, "P50"),
    ("replay.baseline_std_ddof", -1, "one of 0, 1"),
    ("replay.loss_coef", -1.0, ">= 0"),
    ("replay.max_loss_steps", 0, ">= 1"),
    ("replay.clip_cov_ratio", 0.0, "in (0, 1]"),
    ("replay.clip_cov_lb", 70.0, "must be < config.replay.clip_cov_ub=60.0"),
    ("replay.clip_cov_ub", 1.0, "config.replay.clip_cov_lb=2.0: must be < config.replay.clip_cov_ub=1.0"),
    ("replay.kl_cov_ratio", 0.0, "in (0, 1]"),
    ("sft.episodes", 0, ">= 1"),
    ("sft.steps", 0, ">= 1"),
    ("sft.lr", 0.0, "> 0"),
    ("sft.batch_size", 0, ">= 1"),
    ("trainer.total_steps", -1, ">= 0"),
    ("trainer.eval_every", 0, ">= 1"),
    ("trainer.checkpoint_every", 0, ">= 1"),
    ("trainer.max_checkpoints_to_keep", 0, ">= 1"),
    ("trainer.log_every", 0, ">= 1"),
    ("trainer.length_buckets", (256, 128, 352), "strictly increasing"),
    ("trainer.length_buckets", (0, 352), "positive token counts"),
    ("model.tokenizer_path", "/nonexistent/tokenizer.json", "tokenizer"),
    ("env.kwargs", {"game": "coin", "rooms": 3}, "its options are"),
]


def _set(c, path, value):
    *parents, leaf = path.split(".")
    node = c
    for part in parents:
        node = node[part]
    node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


@pytest.mark.parametrize("path, value, message", BAD_VALUES, ids=[f"{p}={v!r}" for p, v, _ in BAD_VALUES])
def test_each_bad_value_fails_at_validate_naming_field_value_and_fix(path, value, message):
    c = _config()
    c.unlock()
    _set(c, path, value)
    with pytest.raises(ConfigError) as error:
        run_config.validate(c, num_devices=8)
    text = str(error.value)
    assert "\n" not in text
    assert f"config.{path}" in text and message in text, text
    if path not in ("env.kwargs", "trainer.length_buckets", "rollout.max_prompt_length"):
        assert text.startswith(f"config.{path}={value!r}: must be ") or "clip_cov" in path, text


def test_trajectory_rows_hold_one_response_budget_for_all_turns():
    c = _config("spear", "math_tiny")
    c.unlock()
    c.env.max_steps = 200  # turns do not multiply the budget: 320 + 32 tokens whatever the turns
    run_config.validate(c, num_devices=8)
    assert run_config.sequence_length(c) == c.rollout.max_prompt_length + c.rollout.max_response_length
    c.rollout.max_response_length = 4096 - c.rollout.max_prompt_length + 1
    c.trainer.length_buckets = (4097,)
    with pytest.raises(ConfigError, match=r"= 4097 tokens: must be <= the model's 4096"):
        run_config.validate(c, num_devices=8)


@pytest.mark.parametrize("env_name, good, bad", [
    ("textworld_express", "dev", "valid_unseen"),
    ("alfworld", "valid_unseen", "test"),
    ("webshop", "test", "dev"),
    ("math", "test", "valid"),
])
def test_eval_split_must_be_a_split_of_the_chosen_environment(env_name, good, bad):
    c = _config()
    c.unlock()
    c.env.name, c.env.kwargs, c.sft.enable = env_name, ml_collections.ConfigDict(), False
    c.env.domain = "math" if env_name == "math" else "agent"
    c.data.eval_split = good
    run_config.validate(c, num_devices=8)
    c.data.eval_split = bad
    with pytest.raises(ConfigError, match=rf"config\.data\.eval_split='{bad}': must be a split of '{env_name}'"):
        run_config.validate(c, num_devices=8)


@pytest.mark.parametrize("preset, wrong, env_name, env_class, right", [
    ("twx_tiny", "math", "textworld_express", "TextWorldExpressEnv", "agent"),
    ("math_tiny", "agent", "math", "MathToolEnv", "math"),
])
def test_env_domain_must_be_the_environment_domain(preset, wrong, env_name, env_class, right):
    c = _config("spear", preset)
    run_config.validate(c, num_devices=8)
    c.unlock()
    c.env.domain = wrong
    with pytest.raises(ConfigError, match=rf"config\.env\.domain='{wrong}': environment '{env_name}' "
                       rf"\({env_class}\) declares domain = '{right}'; set config\.env\.domain='{right}'"):
        run_config.validate(c, num_devices=8)


def test_math_solutions_need_both_record_fields(tmp_path):
    c = _config()
    c.unlock()
    (tmp_path / "train.jsonl").write_text('{"question": "1+1", "answer": "#### 2"}\n')
    c.sft.source, c.sft.data_path, c.sft.problem_field = "math_solutions", str(tmp_path / "train.jsonl"), ""
    with pytest.raises(ConfigError, match=r"config\.sft\.problem_field='': must be a record field name"):
        run_config.validate(c, num_devices=8)
    c.sft.problem_field = "question"
    run_config.validate(c, num_devices=8)


def test_gold_warm_start_needs_an_environment_with_gold_actions():
    c = _config("sft", "math_tiny")
    with pytest.raises(ConfigError, match=r"config\.sft\.source='gold': environment 'math' has no gold"):
        run_config.validate(c, num_devices=8)


def test_top_k_and_positions_come_from_an_hf_checkpoint_config(tmp_path):
    c = _config()
    c.unlock()
    hf = to_hf_config(MODEL_PRESETS["tiny"].replace(vocab_size=1000, max_position_embeddings=512))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    c.model.checkpoint_format, c.model.checkpoint_path, c.sft.enable = "hf", str(tmp_path), False
    c.rollout.top_k = 1001
    with pytest.raises(ConfigError, match=r"vocabulary size 1000 \(.*config\.json\)"):
        run_config.validate(c, num_devices=8)
    c.rollout.top_k, c.rollout.max_prompt_length = 1000, 480
    run_config.validate(c, num_devices=8)  # 480 + 32 = 512 positions: fits exactly
    c.rollout.max_prompt_length = 481
    with pytest.raises(ConfigError, match=r"= 513 tokens: must be <= the model's 512 positions"):
        run_config.validate(c, num_devices=8)


def _runnable(c, tmp_path):
    """Points a paper preset at stand-ins for the files the user supplies (weights, problems)."""
    c.unlock()
    if c.model.checkpoint_format == "hf":
        (tmp_path / "config.json").write_text(json.dumps(to_hf_config(MODEL_PRESETS[c.model.preset])))
        c.model.checkpoint_path = str(tmp_path)
    if c.env.kwargs.get("source") == "jsonl":
        (tmp_path / "train.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
        c.env.kwargs.path = str(tmp_path / "train.jsonl")
    return c


def _expected_failure(method, preset):
    """What validate must say for the combinations that cannot run (None: it must pass)."""
    trajectory_rows = "math" in preset or "aime" in preset
    if "gigpo" in method and trajectory_rows:
        return "row_layout"
    if method == "sft" and (trajectory_rows or "webshop" in preset):
        return "has no gold actions"
    return None


_COMBOS = [(m, p) for m in ("grpo", "drbot", "gigpo", "sft") + tuple(f"spear,{b}" for b in BASES) for p in PRESETS]


@pytest.mark.parametrize("method, preset", _COMBOS)
def test_every_preset_of_every_method_validates(method, preset, tmp_path):
    module, _, base = method.partition(",")
    c = _runnable(_config(module, f"{preset},{base}" if base else preset), tmp_path)
    failure = _expected_failure(base or module, preset)
    if failure is None:
        run_config.validate(c, num_devices=8)
    else:
        with pytest.raises(ConfigError, match=failure):
            run_config.validate(c, num_devices=8)


# Fields checked outside RULES: free text (paths, names, the environment's split) and the mesh
# sizes (run_config.mesh_shape: >= 1, or -1 for the remaining devices).
_CHECKED_ELSEWHERE = {"name", "model.checkpoint_path", "model.tokenizer_path", "data.eval_split", "sft.data_path",
                      "sft.problem_field", "sft.solution_field", "mesh.data", "mesh.fsdp", "mesh.tensor",
                      "trainer.init_from", "trainer.compilation_cache_dir", "logging.project", "logging.run_name",
                      "logging.mlflow_tracking_uri", "distributed.coordinator_address"}


def _leaves(c, prefix=""):
    for key, value in c.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            if key != "kwargs":  # environment options: checked against the constructor
                yield from _leaves(value, path + ".")
        else:
            yield path, value


def test_every_numeric_and_choice_field_has_a_rule():
    ruled = {rule.path for rule in run_config.RULES}
    fields = dict(_leaves(base_config()))
    assert ruled <= set(fields), f"rules for missing fields: {ruled - set(fields)}"
    unruled = {path for path, value in fields.items()
               if not isinstance(value, (bool, tuple)) and path not in ruled and path not in _CHECKED_ELSEWHERE}
    assert not unruled, f"fields without a rule in run_config.RULES: {sorted(unruled)}"


def test_every_default_value_satisfies_its_rule():
    c = base_config()
    for rule in run_config.RULES:
        assert run_config.field_value(c, rule.path) in rule.allowed, rule.path


def _webshop(data_dir, **kwargs):
    c = _config("drbot")
    c.unlock()
    c.env.name, c.sft.enable = "webshop", False
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
