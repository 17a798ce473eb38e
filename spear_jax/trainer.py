"""The SPEAR trainer: the host loop of GRPO / Dr.BoT / GiGPO, with or without SPEAR.

One training step t (spec 3.0), in order (``Trainer.train_step``):

    0. schedule      kappa(t), lambda(t) and lr(t - 1), once (``curriculum.step_schedule``)
    1. rollout       tasks x group_size episodes -> rows (step rows or trajectory rows)
    2. rewards       shaped R = env outcome + tool-call bonus kappa(t)       (``prepare.shape_rewards``)
    3. filters       low-variance groups dropped (``prepare.filter_groups``); rows with an
                     enabled quality flag leave the loss, their R still counts
                     (``prepare.mask_low_quality``); the rows packed (``prepare.pack``)
    4. old logprobs  recomputed with the pre-update policy (and the entropy metric); with a KL
                     loss or KL in the reward, the frozen reference policy's log-probs too
                     (``prepare.old_logprobs``)
    5. advantages    invalid-action penalty (agent), KL in the reward (optional)
                     (``prepare.penalties``), then the configured estimator on the inputs it
                     declares (``prepare.advantages``)
    6. replay check  buffer.replay_if_ready(t) -- before this step's rows are added
    7. update        on-policy minibatches, then replay (SIL) minibatches weighted by lambda(t),
                     each one optimizer step at the step's learning rate lr(t - 1)
    8. buffer        remove_old(), then add_step(rows of step t)

Every source of randomness is a named stream of ``spear_jax.rng_streams``, derived from
``config.seed`` and the step, and the replay buffer is part of the checkpoint, so a run resumed
from a checkpoint continues exactly as the uninterrupted run (the KL reference, the policy as RL
starts, is rebuilt from the same starting weights). Construction lives in
``spear_jax.trainer_setup``, checkpoints in ``spear_jax.run_state``, the stages in
``spear_jax.prepare``, minibatch cutting in ``spear_jax.minibatches``.
"""
from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spear_jax import (curriculum, distributed, minibatches, prepare, replay_rows, resume, run_config,
                       run_state, sharding, throughput, tracking, train_step, trajectories, workdir_lock)
from spear_jax import metrics as run_metrics
from spear_jax.checkpoint import RunCheckpointer
from spear_jax.env_pool import close_envs
from spear_jax.model import lora
from spear_jax.outcomes import outcome_metrics
from spear_jax.policy import CHECKPOINT_SUBDIR, Policy, load_policy
from spear_jax.replay import ReplayBuffer
from spear_jax.rng_streams import Stream, jax_key, numpy_rng, shuffle_rng, update_key
from spear_jax.trainer_setup import (LogProbPass, batch_sharding, build_rollout, make_envs,
                                     reference_params)


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
        optimizer_config = run_config.optimizer_config(c)
        self.optimizer = train_step.make_optimizer(optimizer_config)
        self.schedule = run_config.schedule_config(c, train_step.learning_rate_schedule(optimizer_config))
        self.prep = run_config.preparation_config(c, pad_id=self.policy.chat.stop_id)
        # Adapters only for a LoRA policy (train_step differentiates w.r.t. them alone).
        self.opt_state = train_step.init_optimizer_state(self.optimizer, lora.trainable_params(self.policy.params),
                                                         self.mesh)
        self._update, self._update_replay = (
            train_step.make_update_fn(self.policy.graphdef, self.optimizer, self.update_config, replay=replay,
                                      mesh=self.mesh) for replay in (False, True))
        self.logprob_pass = LogProbPass(self.policy.graphdef, c, self.mesh)
        self.buffer = ReplayBuffer(run_config.replay_config(c)) if c.replay.enable else None
        self.carried = replay_rows.carried_arrays(train_step.batch_keys(self.update_config, replay=True))
        rollout = build_rollout(c, self.policy, self.mesh)
        self.sampler, self.engine, self.eval_engine = rollout.sampler, rollout.engine, rollout.eval_engine
        self.sampling, self.eval_sampling = rollout.sampling, rollout.eval_sampling
        self.train_envs, self.eval_envs = make_envs(c)
        self.checkpointer = RunCheckpointer(os.path.join(workdir, CHECKPOINT_SUBDIR),
                                            max_to_keep=c.trainer.max_checkpoints_to_keep)
        self.writer = tracking.metrics_writer(c, workdir)
        self.trajectories = trajectories.TrajectoryLogger(
            workdir, self.writer, self.engine.tokenizer.decode, c.logging.trajectories_every,
            c.logging.trajectories_per_step)
        self.peak_flops = throughput.run_peak_flops(c.logging.peak_flops, jax.default_backend(), jax.device_count())
        self.step = 0
        workdir_lock.acquire(workdir)  # one run per workdir; released by close()

    # -- one step ----------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, float]:
        """One SPEAR / GRPO-family step (module docstring); returns its metrics."""
        c, clock = self.config, _Clock()
        schedule = curriculum.step_schedule(step, self.schedule)
        self.opt_state = train_step.set_learning_rate(self.opt_state, schedule.learning_rate)
        # 1. rollout
        result = self.engine.run(self.train_envs, self._task_ids(step), self.sampling,
                                 jax_key(c.seed, Stream.ROLLOUT, step))
        metrics = dict(result.metrics)
        clock.lap("rollout")
        # 2-5. rewards, filters, packing, old log-probs, advantages
        prepared = _prepare_batch(result, schedule, step, c.seed, self.prep, self._logprob_fns(), clock)
        batch = prepared.batch
        metrics.update(prepared.metrics)
        self.trajectories.record(step, prepared.rows, prepared.scores, prepared.flags, batch,
                                 numpy_rng(c.seed, Stream.TRAJECTORY_SAMPLE, step))
        clock.lap("prepare/metrics")
        # 6. replay check, before this step's rows enter the buffer
        replay = None
        if self.buffer is not None:
            replay, replay_metrics = self.buffer.replay_if_ready(
                step, numpy_rng(c.seed, Stream.REPLAY_SUBSAMPLE, step), min_rows=self.num_batch_devices)
            metrics.update(replay_metrics)
        clock.lap("replay/draw")
        # 7. updates: on-policy, then replay weighted by lambda(t)
        metrics.update(self._optimize(batch, step, sil_weight=None))
        clock.lap("update")
        if replay is not None:
            replay_batch = replay_rows.replay_batch(replay, self.carried, c.actor.ppo_mini_batch_size)
            metrics.update(self._optimize(replay_batch, step, sil_weight=schedule.sil_weight))
        clock.lap("replay/update")
        # 8. buffer: staleness, then this step's rows
        if self.buffer is not None:
            self.buffer.remove_old()
            self.buffer.add_step(replay_rows.buffer_rows(batch, self.carried), step)
            metrics.update(self.buffer.metrics())
        self.sampler.set_params(self.policy.params)
        clock.lap("buffer")
        metrics.update({"replay/sil_weight": schedule.sil_weight, "actor/lr": schedule.learning_rate})
        metrics.update(clock.metrics())
        metrics.update(throughput.step_metrics(
            self.policy.model_config, result.rows, batch["valid"], c.actor.ppo_epochs,
            result.metrics["rollout/sampler_time_s"], clock.laps["update"], self.peak_flops,
            frozen_weights=c.model.lora.rank > 0))
        return metrics

    def _task_ids(self, step: int) -> list[int]:
        """This step's training tasks: a uniform draw without replacement from the train split."""
        available = self.train_envs.task_ids
        count = self.config.data.train_tasks_per_step
        picks = numpy_rng(self.config.seed, Stream.TASK_DRAW, step).choice(
            len(available), size=count, replace=count > len(available))
        return [int(available[i]) for i in picks]

    def _logprob_fns(self):
        """(policy log-probs and entropies, reference log-probs or None) of a batch's tokens."""
        lp, ref = self.logprob_pass, self.ref_params
        reference = (lambda *batch: lp.logprobs(ref, *batch)) if ref is not None else None
        return (lambda *batch: lp.with_entropy(self.policy.params, *batch)), reference

    def _optimize(self, batch, step: int, sil_weight: float | None) -> dict[str, float]:
        """One optimizer step per minibatch; ``sil_weight`` (lambda(t)) marks a replay batch."""
        c, replay = self.config, sil_weight is not None
        update = self._update_replay if replay else self._update
        keys = train_step.batch_keys(self.update_config, replay)
        rng = shuffle_rng(c.seed, replay, step) if c.actor.shuffle else None
        placement, outputs = batch_sharding(self.mesh, leading=1), []
        for epoch, start, rows in minibatches.minibatch_rows(batch["row_valid"], c.actor.ppo_epochs,
                                                             c.actor.ppo_mini_batch_size, rng):
            minibatch = distributed.global_arrays(
                minibatches.micro_split(batch, rows, keys, c.actor.ppo_micro_batch_size), placement)
            self.policy.params, self.opt_state, out = update(
                self.policy.params, self.opt_state, minibatch, update_key(c.seed, replay, step, epoch, start),
                jnp.float32(sil_weight or 0.0))
            outputs.append(out)
        return minibatches.mean_metrics(outputs, "sil/" if replay else "actor/")

    # -- the loop, evaluation and checkpoints -------------------------------------------------------

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
            last = self.step == c.trainer.total_steps
            if self.step % c.trainer.checkpoint_every == 0 or last:
                start = time.perf_counter()
                self.save()
                metrics["time/checkpoint"] = time.perf_counter() - start
            if self.step % c.trainer.log_every == 0 or last:
                self.writer.write(self.step, metrics)
            bar.set_postfix(run_metrics.progress_summary(metrics), refresh=False)
            bar.update()
            if self.step % c.trainer.eval_every == 0 and not last:
                evaluate()
        final = evaluate()
        bar.close()
        self.writer.close()
        return final

    def evaluate(self, step: int) -> dict[str, float]:
        """Success rate (overall and per task type) on the held-out fold, written as ``eval``."""
        task_ids = list(self.eval_envs.task_ids[: self.config.data.eval_episodes])
        start = time.perf_counter()
        result = self.eval_engine.run(self.eval_envs, task_ids, self.eval_sampling,
                                      jax_key(self.config.seed, Stream.EVAL, step))
        metrics = outcome_metrics(result.episodes, result.rows)
        metrics["time/eval"] = time.perf_counter() - start
        self.writer.write(step, metrics, split="eval")
        return metrics

    def save(self) -> None:
        run_state.save(self.checkpointer, self.step, self.policy.params, self.opt_state, self.buffer, self.config)

    def restore_if_any(self) -> bool:
        """Resumes from the newest intact checkpoint or ``trainer.resume_step`` (``run_state``)."""
        restored = run_state.restore(self.checkpointer, self.config, self.policy.params, self.opt_state,
                                     self.buffer.config if self.buffer is not None else None, self.mesh)
        if restored is None:
            return False
        self.step, self.policy.params, self.opt_state = restored.step, restored.params, restored.opt_state
        self.buffer = restored.buffer
        self.sampler.set_params(self.policy.params)
        return True

    def close(self) -> None:
        close_envs(self.train_envs)
        close_envs(self.eval_envs)
        self.checkpointer.close()
        workdir_lock.release(self.workdir)


class _Clock:
    """Wall-clock laps of a step's phases, reported as ``time/<phase>`` and ``time/step``. A
    lap named ``<phase>/<stage>`` is a stage of a phase: reported as ``time/<phase>/<stage>``,
    and ``time/<phase>`` is the sum of its stages' laps."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase], self.last = now - self.last, now

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.laps.items()}
        for name, seconds in self.laps.items():
            if "/" in name:
                phase = f"time/{name.split('/')[0]}"
                out[phase] = out.get(phase, 0.0) + seconds
        return {**out, "time/step": time.perf_counter() - self.start}


class _Prepared(NamedTuple):
    """The kept rows [n], their shaped rewards R [n] and quality flags (name -> [n] bool), the
    packed batch with every prepared array, and the stages' metrics."""

    rows: list
    scores: np.ndarray
    flags: dict[str, np.ndarray]
    batch: dict[str, np.ndarray]
    metrics: dict[str, float]


def _prepare_batch(result, schedule, step: int, seed: int, p: prepare.PrepareConfig, logprob_fns,
                   clock: _Clock) -> _Prepared:
    """Steps 2-5 of a step (module docstring) on the rollout ``result``, each stage timed as a
    ``prepare/<stage>`` lap of ``clock``; ``logprob_fns``: ``Trainer._logprob_fns()``."""
    scores, m_reward = prepare.shape_rewards(result.rows, schedule.toolcall_factor, p.reward_recipe)
    rows, scores, m_filter = prepare.filter_groups(result.rows, scores, p.group_filter,
                                                   numpy_rng(seed, Stream.GROUP_FILTER, step))
    masked, flags, m_quality = prepare.mask_low_quality(rows, p.quality)
    clock.lap("prepare/filters")
    batch = prepare.pack(rows, masked, p.pack)
    clock.lap("prepare/pack")
    arrays, m_logp = prepare.old_logprobs(batch, *logprob_fns)
    batch.update(arrays)
    clock.lap("prepare/old_logprobs")
    arrays, m_penalty = prepare.penalties(batch, scores, p.penalties)
    batch.update(arrays)
    arrays, m_adv = prepare.advantages(batch, rows, p.advantages, all(e.error is None for e in result.episodes))
    batch.update(arrays)
    clock.lap("prepare/advantages")
    metrics = {}
    for part in (m_reward, m_filter, m_quality, m_logp, m_penalty, m_adv):
        metrics.update(part)
    metrics.update(outcome_metrics(result.episodes, result.rows))
    return _Prepared(rows, scores, flags, batch, metrics)
