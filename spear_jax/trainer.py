"""The SPEAR trainer: the host loop of GRPO / Dr.BoT / GiGPO, with or without SPEAR.

One training step t (spec 3.0), in order:

    1. rollout       tasks x group_size episodes -> rows (step rows or trajectory rows)
    2. rewards       shaped R = env outcome + tool-call bonus kappa(t); quality flags
    3. filters       flagged rows' loss masks zeroed (their R still counts); low-variance groups
                     dropped
    4. old logprobs  recomputed with the pre-update policy (and the entropy metric); with a KL
                     loss or KL in the reward, the frozen reference policy's log-probs too
    5. advantages    invalid-action penalty (agent), KL in the reward (optional), then GRPO /
                     RLOO / GiGPO on device
    6. replay check  buffer.replay_if_ready(t) -- before this step's rows are added
    7. update        on-policy minibatches, then replay (SIL) minibatches weighted by lambda(t),
                     each one optimizer step at the step's learning rate lr(t - 1)
    8. buffer        remove_old(), then add_step(rows of step t)

Every source of randomness is derived from ``config.seed`` and the step (rollout keys, task
choice, Clip-Cov selection, replay subsampling), and the replay buffer is part of the
checkpoint, so a run resumed from a checkpoint continues exactly as the uninterrupted run (the
KL reference, the policy as RL starts, is rebuilt from the same starting weights).
"""
from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from environments.registry import make_env
from spear_jax import (curriculum, filters, resume, rewards, run_config, sharding, throughput, tracking,
                       train_step, trajectories, workdir_lock)
from spear_jax import metrics as run_metrics
from spear_jax.batching import BatchingConfig, bucket_length, pack_rows
from spear_jax.checkpoint import RunCheckpointer, RunState
from spear_jax.model import lora
from spear_jax.objectives import (
    AdvantageConfig,
    GroupedRewards,
    compute_advantages,
    step_group_ids_from_anchors,
    validate_group_sizes,
)
from spear_jax.policy import CHECKPOINT_SUBDIR, Policy, load_policy
from spear_jax.replay import ReplayBuffer
from spear_jax.rollout import RolloutConfig, RolloutEngine, RolloutResult, TemplateChatTokenizer
from spear_jax.sampling import Sampler, SamplingParams



class Trainer:
    """Builds every component from a validated run config and runs the loop."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        run_config.validate(config)
        resume.check_resume_step(config, os.path.join(workdir, CHECKPOINT_SUBDIR))
        self.config = c = config
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.mesh = sharding.make_mesh(**run_config.mesh_shape(c, jax.device_count()))
        self.policy: Policy = load_policy(c, self.mesh)
        self.num_batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        # The KL reference is the policy as RL starts (re-derived from the same weights on resume).
        self.ref_params = (reference_params(self.policy.params, self.policy.model_config.compute_dtype)
                           if run_config.uses_reference_policy(c) else None)

        self.update_config = run_config.update_config(c)
        # Row arrays the replay buffer stores (besides its own scores / advantages / ids): what a
        # replay update reads, the replay loss terms' declared inputs included.
        self._replay_carried = tuple(k for k in train_step.batch_keys(self.update_config, replay=True)
                                     if k not in ("advantages", "row_valid"))
        self.optimizer_config = run_config.optimizer_config(c)
        self.optimizer = train_step.make_optimizer(self.optimizer_config)
        self._learning_rate = train_step.learning_rate_schedule(self.optimizer_config)
        graphdef = self.policy.graphdef
        # Adapters only for a LoRA policy (train_step differentiates w.r.t. them alone).
        trainable = lora.trainable_params(self.policy.params)
        self.opt_state = _on_mesh(jax.jit(self.optimizer.init)(trainable), self.mesh)
        self._update = train_step.make_update_fn(graphdef, self.optimizer, self.update_config,
                                                 replay=False, mesh=self.mesh)
        self._update_replay = train_step.make_update_fn(graphdef, self.optimizer, self.update_config,
                                                        replay=True, mesh=self.mesh)
        self._token_stats = train_step.make_token_stats_fn(
            graphdef, c.rollout.temperature, c.model.logprob_chunk_size)
        self._token_logprobs = train_step.make_token_stats_fn(
            graphdef, c.rollout.temperature, c.model.logprob_chunk_size, entropy=False)
        self.buffer = ReplayBuffer(run_config.replay_config(c)) if c.replay.enable else None
        self._build_rollout(c)

        env_kwargs = dict(c.env.kwargs.to_dict(), max_steps=c.env.max_steps)
        episodes = c.data.train_tasks_per_step * c.data.group_size
        self.train_envs = [make_env(c.env.name, split="train", seed=c.seed + i, **env_kwargs)
                           for i in range(episodes)]
        self.eval_envs = [make_env(c.env.name, split=c.data.eval_split, seed=c.seed + i, **env_kwargs)
                          for i in range(c.data.eval_episodes)]
        self.checkpointer = RunCheckpointer(os.path.join(workdir, CHECKPOINT_SUBDIR),
                                            max_to_keep=c.trainer.max_checkpoints_to_keep)
        self.writer = tracking.metrics_writer(c, workdir)
        self.trajectories = trajectories.TrajectoryLogger(
            workdir, self.writer, self.engine.tokenizer.decode, c.logging.trajectories_every,
            c.logging.trajectories_per_step)
        self.peak_flops = throughput.run_peak_flops(c.logging.peak_flops, jax.default_backend(), jax.device_count())
        self.step = 0
        workdir_lock.acquire(workdir)  # one run per workdir; released by close()

    def _build_rollout(self, c: ml_collections.ConfigDict) -> None:
        """The sampler and the train / eval rollout engines. Trajectory rows hold the prompt and
        at most ``max_response_length`` response tokens (model and tool tokens together)."""
        chat = TemplateChatTokenizer(self.policy.chat)
        episodes = c.data.train_tasks_per_step * c.data.group_size
        max_len = run_config.sequence_length(c)
        self.sampler = Sampler(
            self.policy.graphdef, self.policy.params, self.policy.model_config, max_len=max_len,
            max_batch=max(episodes, c.data.eval_episodes),
            cache_dtype=jnp.dtype(c.rollout.kv_cache_dtype),
            weight_dtype=None if c.rollout.weight_dtype == "param" else jnp.dtype(c.rollout.weight_dtype),
            mesh=self.mesh)
        trajectory = c.env.row_layout == "trajectory"
        rollout = dict(layout=c.env.row_layout, domain=c.env.domain, history_length=c.env.history_length,
                       prompt_template=c.env.prompt_template,
                       max_response_length=c.rollout.max_response_length,
                       max_prompt_length=None if trajectory else c.rollout.max_prompt_length,
                       max_sequence_length=max_len if trajectory else None)
        self.engine = RolloutEngine(self.sampler, chat, RolloutConfig(group_size=c.data.group_size, **rollout))
        self.eval_engine = RolloutEngine(self.sampler, chat, RolloutConfig(group_size=1, **rollout))
        self.sampling = self._sampling(c.rollout.temperature, c.rollout.top_p, chat)
        self.eval_sampling = self._sampling(c.rollout.eval_temperature, c.rollout.eval_top_p, chat)

    # -- construction helpers --------------------------------------------------------------------

    def _sampling(self, temperature: float, top_p: float, chat: TemplateChatTokenizer) -> SamplingParams:
        c = self.config
        # Temperature 0 decodes greedily; the log-probs it returns are then at temperature 1.
        return SamplingParams(temperature=temperature or 1.0, top_p=top_p, top_k=c.rollout.top_k,
                              greedy=temperature == 0.0, max_new_tokens=c.rollout.max_response_length,
                              stop_sequences=(tuple(chat.assistant_end_ids),))

    def _key(self, purpose: int, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), purpose), step)

    def _rng(self, purpose: int, step: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, purpose, step])

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self) -> None:
        host = {"replay": self.buffer.state_dict()} if self.buffer is not None else {}
        self.checkpointer.save(self.step, RunState(
            device={"params": self.policy.params, "opt_state": self.opt_state},
            host=host, meta={"step": self.step, "config": resume.config_record(self.config)}))

    def restore_if_any(self) -> bool:
        """Resumes from the newest intact checkpoint in the workdir, if there is one, or from
        ``trainer.resume_step``, after checking that the config may resume it
        (``spear_jax.resume``). Steps after a chosen ``resume_step`` are moved to
        ``checkpoints/superseded/`` (the resumed run writes its own)."""
        step = resume.resume_step(self.config, self.checkpointer)
        if step is None:
            return False
        where = self.checkpointer.step_directory(step)
        for change in resume.check_resumable(self.checkpointer.read_meta(step).get("config"), self.config, where):
            logging.warning("resuming %s with %s", where, change)
        state = self.checkpointer.restore({"params": self.policy.params, "opt_state": self.opt_state}, step=step)
        device = _on_mesh(state.device, self.mesh)
        self.policy.params, self.opt_state = device["params"], device["opt_state"]
        if self.buffer is not None:
            self.buffer = ReplayBuffer.from_state_dict(self.buffer.config, state.host["replay"])
        self.step = int(state.meta["step"])
        self.sampler.set_params(self.policy.params)
        moved = self.checkpointer.set_aside_after(step)
        if moved:
            logging.warning("resumed from config.trainer.resume_step=%d: the newer checkpoints are "
                            "moved to %s", step, moved)
        return True

    # -- the loop ----------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Runs (or resumes) to ``trainer.total_steps``; returns the final evaluation metrics."""
        c = self.config
        resumed = self.restore_if_any()  # refuses a config the checkpoint cannot resume with
        self.writer.discard_from(self.step + 1 if resumed else 0)  # records the run writes again
        run_metrics.record_config(self.workdir, c)
        bar = run_metrics.progress_bar(c.trainer.total_steps, initial=self.step, desc=c.name)

        def evaluate() -> dict[str, float]:
            result = self.evaluate(self.step)
            bar.write(f"eval at step {self.step}: success {result.get('success_rate', float('nan')):.3f} "
                      f"on {int(result['episodes'])} held-out episodes")
            return result

        if c.trainer.eval_before_train and not resumed:
            evaluate()
        while self.step < c.trainer.total_steps:
            self.step += 1
            metrics = self.train_step(self.step)
            if self.step % c.trainer.checkpoint_every == 0 or self.step == c.trainer.total_steps:
                start = time.perf_counter()
                self.save()
                metrics["time/checkpoint"] = time.perf_counter() - start
            if self.step % c.trainer.log_every == 0 or self.step == c.trainer.total_steps:
                self.writer.write(self.step, metrics)
            bar.set_postfix(run_metrics.progress_summary(metrics), refresh=False)
            bar.update()
            if self.step % c.trainer.eval_every == 0 and self.step != c.trainer.total_steps:
                evaluate()
        final = evaluate()
        bar.close()
        self.writer.close()
        return final

    def train_step(self, step: int) -> dict[str, float]:
        """One SPEAR / GRPO-family step (module docstring); returns its metrics."""
        c = self.config
        timer = time.perf_counter
        t0 = timer()
        learning_rate = float(self._learning_rate(step - 1))
        self.opt_state = train_step.set_learning_rate(self.opt_state, learning_rate)
        result = self.engine.run(self.train_envs, self._task_ids(step), self.sampling, self._key(0, step))
        t_rollout = timer()
        metrics = dict(result.metrics)
        batch, prep_metrics = self._prepare(result, step)
        metrics.update(prep_metrics)
        t_prep = timer()

        replay = None
        if self.buffer is not None:
            replay, replay_metrics = self.buffer.replay_if_ready(
                step, self._rng(1, step), min_rows=self.num_batch_devices)
            metrics.update(replay_metrics)

        metrics.update(self._optimize(batch, step, replay_rows=None))
        t_update = timer()
        if replay is not None:
            sil_weight = float(curriculum.sil_loss_weight(step, c.replay.loss_coef, c.replay.max_loss_steps))
            metrics.update(self._optimize(self._replay_batch(replay), step, replay_rows=sil_weight))
        t_replay = timer()
        if self.buffer is not None:
            self.buffer.remove_old()
            self.buffer.add_step(self._buffer_rows(batch), step)
            metrics.update(self.buffer.metrics())
        self.sampler.set_params(self.policy.params)
        metrics["replay/sil_weight"] = float(
            curriculum.sil_loss_weight(step, c.replay.loss_coef, c.replay.max_loss_steps)) if c.replay.enable else 0.0
        metrics["actor/lr"] = learning_rate
        metrics.update({
            "time/rollout": t_rollout - t0, "time/prepare": t_prep - t_rollout,
            "time/update": t_update - t_prep, "time/replay": t_replay - t_update,
            "time/step": timer() - t0,
        })
        metrics.update(throughput.step_metrics(
            self.policy.model_config, result.rows, batch["valid"], c.actor.ppo_epochs,
            result.metrics["rollout/sampler_time_s"], t_update - t_prep, self.peak_flops,
            frozen_weights=c.model.lora.rank > 0))
        return metrics

    def _task_ids(self, step: int) -> list[int]:
        """This step's training tasks: a uniform draw without replacement from the train split."""
        available = self.train_envs[0].task_ids
        count = self.config.data.train_tasks_per_step
        picks = self._rng(2, step).choice(len(available), size=count, replace=count > len(available))
        return [int(available[i]) for i in picks]

    # -- batch preparation (steps 2-5) -----------------------------------------------------------

    def _prepare(self, result: RolloutResult, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        c, a = self.config, self.config.algorithm
        rows = result.rows
        if not rows:
            raise RuntimeError(f"step {step}: the rollout produced no rows (every episode failed?)")
        scores, kappa = rewards.shaped_scores(rows, step, recipe=a.toolcall_reward_recipe,
                                              mode=a.use_toolcall_reward, max_toolcall_steps=a.max_toolcall_steps)
        flags = rewards.quality_flags(rows)
        enabled = [name for name in ("overlong", "incomplete", "repetitive", "unreadable")
                   if a[f"filter_{name}_responses"]]
        metrics = {"reward/toolcall_factor": kappa, "reward/shaped_mean": float(scores.mean())}

        kept = filters.low_variance_group_filter(
            scores, np.array([r.group_id for r in rows]), np.array([r.traj_id for r in rows]),
            ratio=a.rollout_filter_ratio, filter_type=a.rollout_filter_type, ddof=a.rollout_filter_std_ddof,
            truncation="power_of_two" if a.rollout_filter_truncate_pow2 else "none",
            rng=self._rng(3, step), grouping=a.grouping, group_size=c.data.group_size)
        metrics.update({f"filter/{k}": float(v) for k, v in kept.metrics.items()})
        index = kept.kept_rows
        rows = [rows[i] for i in index]
        scores = scores[index]
        flag_mask = {k: v[index] for k, v in flags.as_dict().items()}

        batch = self._pack(rows)
        n = len(rows)
        batch["loss_mask"][:n], quality_metrics = filters.mask_low_quality_rows(
            batch["loss_mask"][:n], filters.QualityFlags(**flag_mask), enabled)
        metrics.update(quality_metrics)
        metrics.update(self._recompute_logprobs(batch))

        penalised, step_offsets, penalty_metrics = self._penalised_scores(batch, scores)
        metrics.update(penalty_metrics)
        batch["scores"] = _pad_to(penalised.astype(np.float32), len(batch["row_valid"]))
        all_episodes_ran = all(e.error is None for e in result.episodes)
        advantages, adv_metrics = self._advantages(batch, rows, step_offsets, all_episodes_ran)
        batch["advantages"] = advantages
        metrics.update(adv_metrics)
        metrics.update(_outcome_metrics(result))
        self.trajectories.record(step, rows, scores, flag_mask, batch, self._rng(10, step))
        return batch, metrics

    def _penalised_scores(self, batch: dict[str, np.ndarray], scores: np.ndarray):
        """The row scores [n] the advantages see: minus the invalid-action penalty (agent; also
        returned as GiGPO's step-return offsets [n]) and, with ``use_kl_in_reward``, minus
        ``kl_coef * sum_t KL_t(old || ref)`` (the episode score only, not GiGPO's step returns)."""
        a, n = self.config.algorithm, scores.shape[0]
        penalised, metrics = scores, {}
        step_offsets = np.zeros(n, np.float32)
        if a.use_invalid_action_penalty:
            penalised, _ = filters.apply_invalid_action_penalty(
                scores, batch["action_valid"][:n], a.invalid_action_penalty_coef)
            step_offsets = (penalised - scores).astype(np.float32)
        if a.use_kl_in_reward:
            penalised, metrics = rewards.kl_penalised_scores(
                penalised, batch["old_logprobs"][:n], batch[train_step.REFERENCE_KEY][:n],
                batch["loss_mask"][:n], a.kl_coef, a.kl_penalty)
        return penalised, step_offsets, metrics

    def _pack(self, rows) -> dict[str, np.ndarray]:
        c = self.config
        longest = max(r.prompt_ids.shape[0] + r.response_ids.shape[0] for r in rows)
        length = bucket_length(longest, tuple(c.trainer.length_buckets))
        pad_id = self.policy.chat.stop_id
        (packed,) = pack_rows(rows, BatchingConfig(buckets=(length,), pad_id=pad_id,
                                                   row_multiple=c.actor.ppo_mini_batch_size))
        return dict(packed.arrays)

    def _recompute_logprobs(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """Adds the pre-update log-probs (``old_logprobs``) and, with a reference policy, the
        reference log-probs (``ref_logprobs``) [B, L] to ``batch``, both 0 off the loss mask;
        returns the entropy and behaviour-gap metrics."""
        batch["old_logprobs"], entropy = self._logprobs(self.policy.params, batch)
        if self.ref_params is not None:
            batch[train_step.REFERENCE_KEY], _ = self._logprobs(self.ref_params, batch, entropy=False)
        valid_tokens = batch["loss_mask"] > 0
        if not valid_tokens.any():
            return {"actor/entropy": 0.0, "actor/behaviour_logprob_gap": 0.0}
        gap = np.abs(batch["old_logprobs"] - batch["logprobs"])[valid_tokens].mean()
        return {"actor/entropy": float(entropy[valid_tokens].mean()), "actor/behaviour_logprob_gap": float(gap)}

    def _logprobs(self, params, batch: dict[str, np.ndarray],
                  entropy: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Log-probs (0 off the loss mask) and, with ``entropy``, entropies [B, L] of ``batch``
        under ``params``, one micro-batch of rows at a time (without ``entropy`` the compiled
        pass skips the entropy and returns None for it)."""
        micro = self.config.actor.ppo_micro_batch_size
        rows = batch["tokens"].shape[0]
        stats = self._token_stats if entropy else self._token_logprobs
        logps, ents = [], []
        batch_sharding = _batch_sharding(self.mesh, leading=0)
        for start in range(0, rows, micro):
            tokens = jax.device_put(batch["tokens"][start:start + micro], batch_sharding)
            valid = jax.device_put(batch["valid"][start:start + micro], batch_sharding)
            out = stats(params, tokens, valid)
            logps.append(np.asarray(out[0] if entropy else out))
            if entropy:
                ents.append(np.asarray(out[1]))
        mask = batch["loss_mask"] > 0
        logps = np.where(mask, np.concatenate(logps), 0.0).astype(np.float32)
        return logps, np.concatenate(ents) if entropy else None

    def _advantages(self, batch, rows, step_offsets, all_episodes_ran: bool) -> tuple[np.ndarray, dict[str, float]]:
        """Row advantages [B] broadcast over the loss mask -> [B, L]. Every group must hold
        ``group_size`` trajectories (checked unless episodes failed or rows were truncated)."""
        c, a = self.config, self.config.algorithm
        n, padded = len(rows), len(batch["row_valid"])
        group_ids = batch["group_id"].astype(np.int32)
        traj_ids = batch["traj_id"].astype(np.int32)
        if a.check_group_size and all_episodes_ran and not a.rollout_filter_truncate_pow2:
            validate_group_sizes(group_ids[:n], c.data.group_size, traj_ids=traj_ids[:n])
        fields = dict(scores=batch["scores"], group_ids=group_ids, row_valid=batch["row_valid"],
                      traj_ids=traj_ids)
        extra = {}
        if a.adv_estimator == "gigpo":
            step_groups, _ = step_group_ids_from_anchors(group_ids[:n], [r.anchor_obs for r in rows])
            fields.update(step_index=batch["step_index"], step_rewards=batch["reward"],
                          step_group_ids=_pad_to(step_groups.astype(np.int32), padded),
                          step_return_offsets=_pad_to(step_offsets, padded))
            extra = dict(gamma=a.gigpo_gamma, step_advantage_weight=a.gigpo_step_advantage_w,
                         num_step_groups=padded)
        normalize = a.gigpo_mode == "mean_std_norm" if a.adv_estimator == "gigpo" else a.norm_adv_by_std_in_grpo
        config = AdvantageConfig(
            estimator=a.adv_estimator, num_groups=c.data.train_tasks_per_step, normalize_by_std=normalize,
            stats_over="rows" if a.grpo_statistics_over == "all_rows" else a.grpo_statistics_over,
            num_trajectories=c.data.train_tasks_per_step * c.data.group_size,
            expected_group_size=c.data.group_size, **extra)
        inputs = GroupedRewards(**{k: jnp.asarray(v) for k, v in fields.items()})
        row_adv, adv_metrics = compute_advantages(inputs, config)
        row_adv = np.where(batch["row_valid"], np.asarray(row_adv), 0.0).astype(np.float32)
        metrics = {f"advantage/{k}": float(v) for k, v in adv_metrics.items()}
        metrics["advantage/mean_abs"] = float(np.abs(row_adv[:n]).mean())
        batch["row_advantage"] = row_adv
        return row_adv[:, None] * batch["loss_mask"], metrics

    # -- updates (step 7) ------------------------------------------------------------------------

    def _optimize(self, batch: dict[str, np.ndarray], step: int, replay_rows: float | None) -> dict[str, float]:
        """One optimizer step per minibatch; ``replay_rows`` is the SIL weight for replay batches.
        With ``actor.shuffle`` the real rows are permuted before each epoch is cut into
        minibatches (padding rows stay last), by ``default_rng([seed, 6 + replay, step])``."""
        c = self.config
        mini = c.actor.ppo_mini_batch_size
        replay = replay_rows is not None
        update = self._update_replay if replay else self._update
        prefix = "sil/" if replay else "actor/"
        keys = train_step.batch_keys(self.update_config, replay)
        shuffle_rng = self._rng(6 + replay, step)
        sums: dict[str, float] = {}
        count = 0
        for epoch in range(c.actor.ppo_epochs):
            order = _epoch_order(batch["row_valid"], shuffle_rng if c.actor.shuffle else None)
            for start in range(0, len(order), mini):
                rows = order[start:start + mini]
                if not batch["row_valid"][rows].any():
                    continue
                minibatch = self._minibatch(batch, rows, keys)
                key = jax.random.fold_in(self._key(4 + replay, step), epoch * 100_003 + start)
                self.policy.params, self.opt_state, out = update(
                    self.policy.params, self.opt_state, minibatch, key, jnp.float32(replay_rows or 0.0))
                for name, value in out.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                count += 1
        metrics = {f"{prefix}{k}": v / count for k, v in sums.items()} if count else {}
        metrics[f"{prefix}optimizer_steps"] = float(count)
        return metrics

    def _minibatch(self, batch: dict[str, np.ndarray], rows: np.ndarray, keys) -> dict[str, jax.Array]:
        """Rows ``rows`` of ``batch`` as ``[mini / micro, micro, ...]`` arrays on the mesh."""
        micro = self.config.actor.ppo_micro_batch_size
        batch_sharding = _batch_sharding(self.mesh, leading=1)
        return {key: jax.device_put(batch[key][rows].reshape((len(rows) // micro, micro) + batch[key].shape[1:]),
                                    batch_sharding)
                for key in keys}

    # -- replay plumbing -------------------------------------------------------------------------

    def _buffer_rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The real rows of this step's batch in the buffer's row layout."""
        keep = batch["row_valid"]
        rows = {name: batch[name][keep] for name in self._replay_carried}
        rows.update(scores=batch["scores"][keep], advantages=batch["row_advantage"][keep],
                    group_ids=batch["group_id"][keep], traj_ids=batch["traj_id"][keep],
                    num_tool_calls=batch["num_tool_calls"][keep])
        return rows

    def _replay_batch(self, replay: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Replay rows padded to whole minibatches, advantages broadcast over their masks."""
        mini = self.config.actor.ppo_mini_batch_size
        rows = len(replay["scores"])
        padded = -(-rows // mini) * mini
        batch = {name: _pad_to(replay[name], padded) for name in self._replay_carried}
        batch["row_valid"] = _pad_to(np.ones(rows, bool), padded)
        batch["advantages"] = _pad_to(replay["advantages"].astype(np.float32), padded)[:, None] * batch["loss_mask"]
        return batch

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        """Success rate (overall and per task type) on the held-out fold, written as ``eval``."""
        c = self.config
        task_ids = list(self.eval_envs[0].task_ids[: c.data.eval_episodes])
        envs = self.eval_envs[: len(task_ids)]
        start = time.perf_counter()
        result = self.eval_engine.run(envs, task_ids, self.eval_sampling, self._key(9, step))
        metrics = _outcome_metrics(result)
        metrics["time/eval"] = time.perf_counter() - start
        self.writer.write(step, metrics, split="eval")
        return metrics

    def close(self) -> None:
        for env in self.train_envs + self.eval_envs:
            env.close()
        self.checkpointer.close()
        workdir_lock.release(self.workdir)


def _on_mesh(tree, mesh):
    """Every leaf on ``mesh``: sharded leaves keep their layout, the rest (e.g. the optimizer's
    step count) are replicated, so each jitted update sees one device set."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(leaf):
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
            return leaf
        return jax.device_put(leaf, replicated)

    return jax.tree.map(place, tree)


def reference_params(params, compute_dtype: str):
    """A frozen copy of ``params`` for the KL reference: floating leaves in the compute dtype
    (the model casts every weight to it, so the reference's log-probs are those of ``params``),
    on their own buffers (the policy's are donated to every update) with the same sharding."""
    dtype = jnp.dtype(compute_dtype)

    def copy(leaf):
        return jnp.copy(leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf)

    shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
    return jax.jit(lambda tree: jax.tree.map(copy, tree), out_shardings=shardings)(params)


def _epoch_order(row_valid: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """Row order of one epoch [B]: the real rows (first ``row_valid.sum()``), permuted by
    ``rng`` when given, then the padding rows."""
    real = int(row_valid.sum())
    order = np.arange(row_valid.shape[0])
    if rng is not None:
        order[:real] = rng.permutation(real)
    return order


def _batch_sharding(mesh, leading: int) -> jax.sharding.NamedSharding:
    """Rows split over the batch-parallel mesh axes; ``leading`` unsharded axes come first."""
    spec = jax.sharding.PartitionSpec(*([None] * leading), ("data", "fsdp"))
    return jax.sharding.NamedSharding(mesh, spec)


def _pad_to(array: np.ndarray, rows: int) -> np.ndarray:
    """Zero-pads the leading axis of ``array`` to ``rows``."""
    pad = rows - array.shape[0]
    return np.pad(array, [(0, pad)] + [(0, 0)] * (array.ndim - 1)) if pad > 0 else array


def _outcome_metrics(result: RolloutResult) -> dict[str, float]:
    """Success rate, return, length and tool calls over episodes, and success per task type."""
    episodes = [e for e in result.episodes if e.error is None]
    if not episodes:
        return {"episodes": 0.0}
    won = np.array([e.won for e in episodes], float)
    metrics = {
        "success_rate": float(won.mean()),
        "episode_return": float(np.mean([e.episode_return for e in episodes])),
        "episode_length": float(np.mean([e.length for e in episodes])),
        "episodes": float(len(episodes)),
    }
    by_traj = {}
    for row in result.rows:
        by_traj[row.traj_id] = row
    if by_traj:
        metrics["tool_calls"] = float(np.mean([r.num_tool_calls for r in by_traj.values()]))
        types: dict[str, list[bool]] = {}
        for row in by_traj.values():
            types.setdefault(row.task_type or "all", []).append(row.won)
        for name, values in types.items():
            metrics[f"success/{name}"] = float(np.mean(values))
    return metrics
