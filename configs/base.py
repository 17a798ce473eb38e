"""Shared defaults for every training config.

Every switch of the SPEAR / Dr.BoT reference is a named field here, with the reference's default
(agent sub-tree unless noted). Algorithm files (``grpo.py``, ``drbot.py``, ``spear.py``,
``gigpo.py``, ``sft.py``) start from ``base_config()`` and override what their method changes;
``apply_preset`` then picks the environment x model combination named by the config argument.

Field names follow the reference's config keys where one exists, so a verl-agent user can map a
launch script onto a config line by line.
"""
from __future__ import annotations

import ml_collections

from configs.presets import PRESETS as PRESET_TABLE

# Presets: environment x model combinations selectable with ``--config=configs/X.py:PRESET``
# (their names and settings: the table ``configs.presets.PRESETS``).
PRESETS = tuple(PRESET_TABLE)
DEFAULT_PRESET = "twx_tiny"


def base_config() -> ml_collections.ConfigDict:
    """The reference defaults, before any algorithm or preset override."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.preset = DEFAULT_PRESET
    c.seed = 0

    # --- model -----------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # a name from spear_jax.model presets
    c.model.checkpoint_format = "random"  # random | hf | gguf | orbax
    c.model.checkpoint_path = ""  # HF directory, .gguf file or orbax directory
    c.model.tokenizer_path = ""  # empty: the preset's bundled tokenizer
    c.model.chat_format = "chatml"  # chatml | llama3
    c.model.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32)
    c.model.logprob_chunk_size = 512  # tokens per chunk of the chunked logprob pass
    c.model.remat = "none"  # remat policy of each block in training: none | full | dots_saveable | ...
    c.model.scan_layers = True  # one lax.scan over the stacked blocks (compile time flat in depth)
    c.model.lora = ml_collections.ConfigDict()  # low-rank adapters; the loaded weights stay frozen
    c.model.lora.rank = 0  # 0 = off (full fine-tuning)
    c.model.lora.alpha = 16.0  # the adapters' product is scaled by alpha / rank
    c.model.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # projections to adapt

    # --- device mesh (jit over a Mesh with NamedSharding) -------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # --- environment -----------------------------------------------------------------------
    c.env = ml_collections.ConfigDict()
    c.env.name = "textworld_express"
    c.env.kwargs = ml_collections.ConfigDict()  # domain-specific constructor arguments
    c.env.max_steps = 50  # env.max_steps (ALFWorld 50, WebShop 15; math: assistant turns)
    c.env.history_length = 2  # (observation, action) pairs in step-row prompts
    c.env.prompt_template = "verl_agent"  # step-row prompt: verl_agent (reference) | compact
    c.env.row_layout = "step"  # step (one row per env step) | trajectory (one row per episode)
    c.env.domain = "agent"  # agent (ReAct actions) | math (answers and code-tool calls)
    # Environment worker processes per host: 0 or 1 steps environments in the trainer's process;
    # N > 1 spreads them over N processes stepped concurrently (docs/rollout.md).
    c.env.num_workers = 0
    c.env.worker_backend = "process"  # process (local processes) | ray (Ray actors; needs ray)
    # A worker that takes longer than this per environment request of a turn is declared hung:
    # its episodes fail and it is replaced at the next rollout.
    c.env.step_timeout_s = 300.0

    # --- data: tasks x group ----------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.train_tasks_per_step = 32  # data.train_batch_size (train_data_size)
    c.data.group_size = 8  # env.rollout.n: environments per task sharing one group id
    c.data.eval_episodes = 128  # validation environments
    c.data.eval_split = "test"

    # --- rollout (sampling) ------------------------------------------------------------------
    c.rollout = ml_collections.ConfigDict()
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0  # 0: off
    c.rollout.max_prompt_length = 2048
    c.rollout.max_response_length = 512
    c.rollout.eval_temperature = 0.4
    c.rollout.eval_top_p = 1.0
    c.rollout.kv_cache_dtype = "float32"  # float32 | bfloat16
    # Weights the sampler decodes with: "param" (as stored) or a copy in float32 | bfloat16;
    # bfloat16 halves the bytes every decode step reads and is exact under bfloat16 compute.
    c.rollout.weight_dtype = "param"
    # Most rows one decode program holds (0: every rollout row at once); more rows are decoded
    # in consecutive chunks of this many, so the KV cache scales with the chunk (docs/sampling.md).
    c.rollout.max_decode_rows = 0
    # Decode of a scanned deep model: "unrolled" one decode step per layer (fastest decode, a
    # compile time growing with the depth); "scanned" the decode step's layer scan (compile time
    # independent of the depth; on CPU each step copies every layer's weights); "auto" unrolls
    # on CPU and keeps the model's scanned forward_last on accelerators. The first two need
    # whole layers on every device. Models of at most 4 layers decode unrolled.
    c.rollout.decode_layers = "auto"

    # --- algorithm: advantages, rewards, filters ----------------------------------------------
    c.algorithm = ml_collections.ConfigDict()
    c.algorithm.adv_estimator = "grpo"  # grpo | rloo | gigpo
    c.algorithm.norm_adv_by_std_in_grpo = True
    # compute_mean_std_cross_all_data: group statistics over all step rows (reference agent
    # default, step-weighted) or over one value per trajectory (the paper's equation): the mean of
    # its rows, or its first row (the reference's rule with compute_mean_std_cross_all_data=False).
    c.algorithm.grpo_statistics_over = "all_rows"  # all_rows | trajectories | trajectories_first_row
    c.algorithm.check_group_size = True  # assert every group has data.group_size members
    c.algorithm.gigpo_gamma = 0.95
    c.algorithm.gigpo_step_advantage_w = 1.0
    c.algorithm.gigpo_mode = "mean_std_norm"  # mean_std_norm | mean_norm
    # KL in the reward (fixed coefficient): R_i <- R_i - kl_coef * sum_t KL_t(old || ref)
    c.algorithm.use_kl_in_reward = False
    c.algorithm.kl_coef = 0.001  # verl's default; inert while use_kl_in_reward is False
    c.algorithm.kl_penalty = "k1"  # estimator of the reward KL: k1 (alias kl) | abs | k2 | low_var_kl
    c.algorithm.use_invalid_action_penalty = True
    c.algorithm.invalid_action_penalty_coef = 0.1
    c.algorithm.rollout_filter_ratio = 1.0  # 1.0: keep every group
    c.algorithm.rollout_filter_type = "std"  # std | std_rev
    c.algorithm.rollout_filter_std_ddof = 0  # agent: population std; math: 1
    c.algorithm.rollout_filter_truncate_pow2 = False  # reference agent: random 2^k rows kept
    # Groups for the filter and the baseline history: by group id (sound) or by position in the
    # batch (the reference math tree, which reorders rows first: spec 5.3).
    c.algorithm.grouping = "uid"  # uid | positional
    c.algorithm.filter_overlong_responses = False
    c.algorithm.filter_incomplete_responses = False
    c.algorithm.filter_repetitive_responses = False
    c.algorithm.filter_unreadable_responses = False
    c.algorithm.use_toolcall_reward = "none"  # none | constant | cosine
    c.algorithm.max_toolcall_steps = 100
    c.algorithm.toolcall_reward_recipe = "agent"  # agent | qwen2.5 | qwen3

    # --- actor: optimiser and policy loss ------------------------------------------------------
    c.actor = ml_collections.ConfigDict()
    c.actor.lr = 1e-6
    c.actor.lr_schedule = "constant"  # constant | cosine
    c.actor.lr_warmup_steps = 0
    c.actor.weight_decay = 0.01
    c.actor.grad_clip = 1.0
    c.actor.ppo_epochs = 1
    c.actor.ppo_mini_batch_size = 256  # rows per optimizer step
    c.actor.ppo_micro_batch_size = 8  # rows per forward/backward (gradient accumulation)
    c.actor.shuffle = False  # shuffle the minibatch order of each epoch (keyed by seed and step)
    c.actor.clip_ratio_low = 0.2
    c.actor.clip_ratio_high = 0.2
    c.actor.clip_ratio_c = 10.0  # dual clip
    c.actor.log_ratio_clamp = 20.0
    c.actor.loss_agg_mode = "token-mean"
    # exact: (sum, normaliser) over the whole minibatch; per_micro_batch: the reference's
    # per-micro-batch aggregation scaled by 1 / grad_accum.
    c.actor.loss_agg_scope = "exact"  # exact | per_micro_batch
    c.actor.loss_agg_max_response_length = 512  # T_max of seq-mean-token-sum-norm
    c.actor.loss_mode = "vanilla"  # vanilla | clip_cov | kl_cov
    c.actor.clip_cov_ratio = 0.0002
    c.actor.clip_cov_lb = 1.0
    c.actor.clip_cov_ub = 5.0
    # Clip-Cov / KL-Cov token pool: the whole micro-batch across the mesh, or each device's
    # shard of it (the reference: one micro-batch per GPU).
    c.actor.clip_cov_scope = "micro_batch"  # micro_batch | per_device
    c.actor.clip_cov_clamp_log_ratio = True  # reference: no clamp (NaN on stale replay data)
    c.actor.kl_cov_ratio = 0.0002
    c.actor.ppo_kl_coef = 0.1  # KL-Cov penalty coefficient
    c.actor.entropy_coeff = 0.001  # agent default; math 0
    c.actor.use_kl_loss = False
    c.actor.kl_loss_coef = 0.001  # verl's default; inert while use_kl_loss is False
    c.actor.kl_loss_type = "low_var_kl"  # k1 (alias kl) | abs | k2 (alias mse) | low_var_kl
    # The on-policy objective, summed per token in this order: registered loss term names (the
    # coefficient comes from the term's field: entropy <- entropy_coeff, kl <- kl_loss_coef when
    # use_kl_loss) or explicit (name, coefficient) pairs. Terms: docs/objectives.md.
    c.actor.loss_terms = ("pg", "entropy", "kl")

    # --- SPEAR: replay buffer, recalibration, SIL ----------------------------------------------
    c.replay = ml_collections.ConfigDict()
    c.replay.enable = False  # enable_trajectory_replay
    c.replay.buffer_size = 2048  # trajectory_buffer_size
    c.replay.baseline_buffer_size = 10240
    c.replay.tolerate_steps = 10  # effective value is min(x, 10)
    c.replay.weight_decay = 0.1  # weight_decay_trajectory_replay: <=0 or >1 selects P50 mode
    c.replay.require_tool_call = False  # math: admit only rows with >= 1 tool call
    c.replay.baseline_std_ddof = 0  # group stds of the baseline history: agent 0, math 1
    c.replay.loss_coef = 0.001  # replay_loss_coef
    c.replay.max_loss_steps = 200  # max_replay_loss_steps (cosine ascent length)
    c.replay.clip_cov_ratio = 0.0002  # clip_cov_ratio_replay
    c.replay.clip_cov_lb = 1.0
    c.replay.clip_cov_ub = 5.0
    c.replay.kl_cov_ratio = 0.0002  # kl_cov_ratio_replay
    # Math sub-tree accident: its clip-cov ignores is_replay, so replay rows use the on-policy
    # triple. Faithful reproduction of the math runs sets this True.
    c.replay.clip_cov_ignores_replay_params = False
    # The replay (SIL) objective, as actor.loss_terms; the policy-gradient terms use the replay
    # Clip-Cov / KL-Cov parameters above. E.g. ("pg_kl_cov", "entropy") for KL-Cov on replay rows.
    c.replay.loss_terms = ("pg", "entropy")

    # --- warm start (supervised) -----------------------------------------------------------------
    c.sft = ml_collections.ConfigDict()
    c.sft.enable = False
    # gold (environment gold paths) | conversations (jsonl of chat messages) | math_solutions
    # (jsonl of worked solutions, e.g. GSM8K train); see spear_jax/sft_data.py
    c.sft.source = "gold"
    c.sft.data_path = ""  # the jsonl file of the conversations / math_solutions sources
    c.sft.problem_field = "problem"  # math_solutions: record fields (GSM8K train: question, answer)
    c.sft.solution_field = "solution"
    c.sft.episodes = 256
    c.sft.steps = 200
    c.sft.lr = 1e-4
    c.sft.batch_size = 16

    # --- trainer loop --------------------------------------------------------------------------
    c.trainer = ml_collections.ConfigDict()
    c.trainer.total_steps = 200
    c.trainer.eval_every = 5
    c.trainer.eval_before_train = True
    c.trainer.checkpoint_every = 10
    c.trainer.max_checkpoints_to_keep = 2
    c.trainer.log_every = 1  # write train metrics every N steps (and at the last step)
    # Start RL from these weights instead of config.model and the warm start (which is skipped):
    # a run workdir, a run checkpoint directory or a Hugging Face directory (docs/experiments.md).
    c.trainer.init_from = ""
    c.trainer.resume_step = -1  # resume the workdir's run from this step; -1: the newest intact one
    c.trainer.length_buckets = (256, 512, 1024, 2048)
    # Persistent XLA compilation cache: a rerun or resumed run loads its compiled programs from
    # here ("" = JAX's own setting, JAX_COMPILATION_CACHE_DIR or none; spear_jax/compile_cache.py).
    c.trainer.compilation_cache_dir = ""

    # --- processes of a multi-host run (spear_jax/distributed.py, docs/scaling.md) -------------
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0; "" = the cluster's own (TPU pod, SLURM) or one process
    c.distributed.num_processes = 1  # with coordinator_address: how many processes join
    c.distributed.process_id = 0  # with coordinator_address: this process's rank
    c.distributed.initialization_timeout_s = 300  # start-up waits this long for every process
    c.distributed.heartbeat_timeout_s = 100  # a silent peer ends the run after this long
    c.distributed.gather_timeout_s = 600.0  # a host exchange waits this long for every peer
    c.distributed.shutdown_timeout_s = 300  # at exit, a process waits this long for the others

    # --- logging: metric backends, trajectory samples, throughput (docs/training.md) ------------
    c.logging = ml_collections.ConfigDict()
    # jsonl (always on: metrics.jsonl is the run's record) | tensorboard | wandb | mlflow; wandb
    # and mlflow are optional installs: pip install -e '.[tracking]'
    c.logging.backends = ("jsonl", "tensorboard")
    c.logging.project = "spear-jax"  # wandb project / mlflow experiment
    c.logging.run_name = ""  # wandb / mlflow run name; "" = the workdir's base name
    c.logging.wandb_mode = "offline"  # online | offline (sync later: wandb sync) | disabled
    c.logging.mlflow_tracking_uri = ""  # "" = file store <workdir>/mlruns; or sqlite:///..., http://...
    c.logging.trajectories_every = 10  # write sampled episodes every N steps (0 = never)
    c.logging.trajectories_per_step = 4  # episodes per sample
    c.logging.peak_flops = 0.0  # per-device peak FLOP/s for MFU (H100 bf16 dense: 989e12); 0 = measure
    return c
