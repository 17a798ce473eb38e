"""Supervised warm start (the paper's cold-start SFT), writing the checkpoint RL starts from.

The examples come from ``spear_jax.sft_data`` (environment gold paths, a user's conversations,
or worked math solutions; ``config.sft.source``). The loss is the token-mean negative
log-likelihood of the masked response tokens (``train_step.make_sft_update_fn``). Each step
draws ``sft.batch_size`` examples uniformly and pads them to the smallest
``trainer.length_buckets`` entry that holds the longest (one compiled program per bucket). The
result is saved as a run checkpoint whose ``params`` the RL run loads with
``model.checkpoint_format = "orbax"``.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np

from environments.base import HasGoldActions
from environments.registry import make_env
from spear_jax import distributed, run_config, sft_data, sharding, tracking, train_step
from spear_jax.batching import bucket_length
from spear_jax.checkpoint import RunCheckpointer, RunState
from spear_jax.model import lora
from spear_jax.metrics import progress_bar, progress_summary
from spear_jax.minibatches import micro_split
from spear_jax.policy import CHECKPOINT_SUBDIR, load_policy
from spear_jax.rng_streams import Stream
from spear_jax.rollout import TemplateChatTokenizer
from spear_jax.sft_data import Example


def pack_examples(examples: Sequence[Example], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """[N, length] tokens / valid / loss_mask (the examples' response masks) and [N] row_valid;
    prompts longer than the room left by the response are cut from the left."""
    n = len(examples)
    tokens = np.full((n, length), pad_id, np.int32)
    valid = np.zeros((n, length), bool)
    loss_mask = np.zeros((n, length), np.float32)
    for i, example in enumerate(examples):
        response = example.response
        if len(response) >= length:
            raise ValueError(f"example {i}: response of {len(response)} tokens does not fit length {length}")
        prompt = example.prompt[max(0, len(example.prompt) - (length - len(response))):]
        total = len(prompt) + len(response)
        tokens[i, :total] = prompt + response
        valid[i, :total] = True
        loss_mask[i, len(prompt):total] = example.mask
    return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask, "row_valid": np.ones(n, bool)}


def build_examples(c: ml_collections.ConfigDict, chat: TemplateChatTokenizer,
                   rng: np.random.Generator) -> tuple[list[Example], dict[str, float]]:
    """The examples of ``config.sft.source`` and metrics describing them."""
    s = c.sft
    if s.source == "conversations":
        return sft_data.conversation_examples(s.data_path, chat), {}
    if s.source == "math_solutions":
        return sft_data.math_solution_examples(s.data_path, chat, s.problem_field, s.solution_field), {}
    env = make_env(c.env.name, split="train", seed=c.seed, max_steps=c.env.max_steps, **c.env.kwargs.to_dict())
    if not isinstance(env, HasGoldActions):
        env.close()
        raise ValueError(f"config.sft.source = 'gold' needs an environment with gold actions; "
                         f"{c.env.name!r} has none (use 'conversations' or 'math_solutions')")
    available = env.task_ids
    tasks = [available[i] for i in rng.choice(len(available), size=min(s.episodes, len(available)), replace=False)]
    examples, gold_win_rate = sft_data.gold_examples(env, tasks, chat, c.env.history_length, c.env.prompt_template,
                                                     c.rollout.max_prompt_length)
    env.close()
    return examples, {"sft/gold_win_rate": gold_win_rate}


def run_sft(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains the warm start of ``config`` into ``workdir``; returns the directory to load from.
    With LoRA (``config.model.lora.rank > 0``) only the adapters train and the saved params are
    merged (``lora.merge_lora``): the warm start is a plain set of weights, the frozen base of
    the RL run that loads it."""
    c, s = config, config.sft
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(**run_config.mesh_shape(c, jax.device_count()))
    policy = load_policy(c, mesh)
    chat = TemplateChatTokenizer(policy.chat)
    rng = np.random.default_rng([c.seed, int(Stream.SFT_EXAMPLES)])
    examples, data_metrics = build_examples(c, chat, rng)
    buckets = c.trainer.length_buckets
    totals = np.array([example.length for example in examples])
    data = pack_examples(examples, bucket_length(totals.max(), buckets), pad_id=policy.chat.stop_id)

    optimizer = train_step.make_optimizer(train_step.OptimizerConfig(
        lr=s.lr, schedule="cosine", warmup_steps=min(10, s.steps // 10), total_steps=max(s.steps, 1),
        weight_decay=c.actor.weight_decay, grad_clip=c.actor.grad_clip))
    update = train_step.make_sft_update_fn(policy.graphdef, optimizer, c.model.logprob_chunk_size)
    params = policy.params
    opt_state = train_step.init_optimizer_state(optimizer, lora.trainable_params(params), mesh)
    micro = c.actor.ppo_micro_batch_size
    batch_rows = -(-s.batch_size // micro) * micro
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    writer = tracking.metrics_writer(c, workdir)
    writer.discard_from(0)  # a warm start trained again replaces the records of an unfinished one
    bar = progress_bar(s.steps, desc="warm start")
    start = time.perf_counter()
    for step in range(1, s.steps + 1):
        rows = rng.choice(len(examples), size=batch_rows, replace=len(examples) < batch_rows)
        cut = micro_split(data, rows, train_step.SFT_KEYS, micro, length=bucket_length(totals[rows].max(), buckets))
        minibatch = distributed.global_arrays(cut, spec)
        with jax.set_mesh(mesh):
            params, opt_state, out = update(params, opt_state, minibatch, jax.random.key(0), np.float32(0))
        if step % 10 == 0 or step == s.steps:
            metrics = {"sft/nll": float(out["nll"]), "sft/grad_norm": float(out["grad_norm"]),
                       "sft/examples": float(len(examples)), "time/sft": time.perf_counter() - start,
                       **data_metrics}
            writer.write(step, metrics, split="sft")
            bar.set_postfix(progress_summary(metrics), refresh=False)
        bar.update()
    bar.close()
    writer.close()
    checkpointer = RunCheckpointer(os.path.join(workdir, CHECKPOINT_SUBDIR), max_to_keep=1)
    params = jax.jit(lambda p: lora.merge_lora(p, policy.model_config))(params)
    checkpointer.save(s.steps, RunState(device={"params": params}, host={}, meta={"step": s.steps, "kind": "sft"}))
    checkpointer.close()
    return workdir
