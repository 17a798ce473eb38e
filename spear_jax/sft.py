"""Supervised warm start (the paper's cold-start SFT) on gold agent trajectories.

Examples are step rows exactly as the rollout engine renders them: the prompt is the chat-wrapped
agent prompt (task, last ``history_length`` (observation, action) pairs, current observation,
admissible actions) and the response is the gold turn

    <think>{think}</think><action>{gold action}</action><end of turn>

for every step of the environment's gold action sequence (TextWorldExpress and ALFWorld expose
``gold_actions()``). The loss is the token-mean negative log-likelihood of the response tokens
(``train_step.make_sft_update_fn``); the result is saved as a run checkpoint whose ``params``
the RL run loads with ``model.checkpoint_format = "orbax"``.
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from environments.prompts import render_agent_prompt
from environments.registry import make_env
from spear_jax import run_config, sharding, train_step
from spear_jax.checkpoint import RunCheckpointer, RunState
from spear_jax.metrics import MetricsWriter
from spear_jax.policy import CHECKPOINT_SUBDIR, load_policy
from spear_jax.rollout import TemplateChatTokenizer

GOLD_THINK = "next step"


def gold_examples(env, task_ids, chat: TemplateChatTokenizer, history_length: int,
                  think: str = GOLD_THINK) -> tuple[list[tuple[list[int], list[int]]], float]:
    """(prompt ids, response ids) of every gold step of ``task_ids``, and the fraction of gold
    episodes that the environment scored as won (a check of the gold paths themselves)."""
    examples, wins = [], 0
    for task in task_ids:
        observation = env.reset(task_id=int(task))
        history: list[tuple[str, str]] = []
        for action in env.gold_actions():
            prompt_text = render_agent_prompt(env.prompt_style, observation, history, history_length)
            prompt = chat.render_prompt([("user", prompt_text)])
            response_text = f"<think>{think}</think><action>{action}</action>"
            examples.append((prompt, chat.encode(response_text) + list(chat.assistant_end_ids)))
            result = env.step(response_text)
            history.append((observation.text, action))
            observation = result.observation
            if result.done:
                wins += int(result.won)
                break
    return examples, wins / max(len(task_ids), 1)


def pack_examples(examples, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """[N, length] tokens / valid / loss_mask (response tokens only) and [N] row_valid; prompts
    longer than the room left by the response are cut from the left."""
    n = len(examples)
    tokens = np.full((n, length), pad_id, np.int32)
    valid = np.zeros((n, length), bool)
    loss_mask = np.zeros((n, length), np.float32)
    for i, (prompt, response) in enumerate(examples):
        if len(response) >= length:
            raise ValueError(f"example {i}: response of {len(response)} tokens does not fit length {length}")
        prompt = prompt[max(0, len(prompt) - (length - len(response))):]
        total = len(prompt) + len(response)
        tokens[i, :total] = prompt + response
        valid[i, :total] = True
        loss_mask[i, len(prompt):total] = 1.0
    return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask, "row_valid": np.ones(n, bool)}


def run_sft(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains the warm start of ``config`` into ``workdir``; returns the directory to load from."""
    c, s = config, config.sft
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(**run_config.mesh_shape(c, jax.device_count()))
    policy = load_policy(c, mesh)
    chat = TemplateChatTokenizer(policy.chat)
    env = make_env(c.env.name, split="train", seed=c.seed, max_steps=c.env.max_steps, **c.env.kwargs.to_dict())
    rng = np.random.default_rng([c.seed, 17])
    available = env.task_ids
    tasks = [available[i] for i in rng.choice(len(available), size=min(s.episodes, len(available)), replace=False)]
    examples, gold_win_rate = gold_examples(env, tasks, chat, c.env.history_length)
    env.close()
    longest = max(len(p) + len(r) for p, r in examples)
    length = next((b for b in c.trainer.length_buckets if b >= longest), c.trainer.length_buckets[-1])
    data = pack_examples(examples, length, pad_id=policy.chat.stop_id)

    optimizer = train_step.make_optimizer(train_step.OptimizerConfig(
        lr=s.lr, schedule="cosine", warmup_steps=min(10, s.steps // 10), total_steps=max(s.steps, 1),
        weight_decay=c.actor.weight_decay, grad_clip=c.actor.grad_clip))
    update = train_step.make_sft_update_fn(policy.graphdef, optimizer, c.model.logprob_chunk_size)
    params, opt_state = policy.params, jax.jit(optimizer.init)(policy.params)
    micro = c.actor.ppo_micro_batch_size
    batch_rows = -(-s.batch_size // micro) * micro
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    writer = MetricsWriter(workdir)
    start = time.perf_counter()
    for step in range(1, s.steps + 1):
        rows = rng.choice(len(examples), size=batch_rows, replace=len(examples) < batch_rows)
        minibatch = {k: jax.device_put(data[k][rows].reshape((batch_rows // micro, micro) + data[k].shape[1:]), spec)
                     for k in train_step.SFT_KEYS}
        with jax.set_mesh(mesh):
            params, opt_state, out = update(params, opt_state, minibatch, jax.random.key(0), np.float32(0))
        if step % 10 == 0 or step == s.steps:
            writer.write(step, {"sft/nll": float(out["nll"]), "sft/grad_norm": float(out["grad_norm"]),
                                "sft/examples": float(len(examples)), "sft/gold_win_rate": gold_win_rate,
                                "time/sft": time.perf_counter() - start}, split="sft")
    writer.close()
    checkpointer = RunCheckpointer(os.path.join(workdir, CHECKPOINT_SUBDIR), max_to_keep=1)
    checkpointer.save(s.steps, RunState(device={"params": params}, host={}, meta={"step": s.steps, "kind": "sft"}))
    checkpointer.close()
    return workdir
