"""Rollout engine throughput vs raw environment throughput (host overhead of the engine).

Three measurements on the same TextWorldExpress envs (``--game``, ``--envs`` of them in
``--envs / --group-size`` groups, every episode ``--steps`` long: the policy never wins, so
episodes end at the step limit):

* ``raw``: reset every env, then step all of them round-robin with one fixed ReAct response
  (``env.step(text)``), no tokenizer, no prompt;
* ``engine, scripted``: ``RolloutEngine`` with a sampler that returns the same response as
  precomputed token ids (zero sampling cost); the difference to ``raw`` is the engine's host
  work: rendering the history-window prompt, chat-template tokenisation, decoding, records;
* ``engine, tiny model`` (``--model tiny``): the real KV-cache ``Sampler`` on a random tiny
  model with its own tokenizer (``tiny_spm.model``) generating ``--max-new-tokens`` tokens per
  turn; reports env steps/s and generated tokens/s, with the split env / sampler / host time.

Every run repeats ``--repeats`` times (raw and scripted interleaved, after one warm-up pass of
the JVM; best of; one warm-up run for the model); figures are printed as JSON lines. Besides
wall time, the Python process's CPU time per step is reported (the JVM's work is in another
process): it is what the engine adds, and it is less sensitive to other load on the machine.
The scripted runs tokenise with SmolLM2's byte-level BPE and the ChatML template.

Examples::

    python -m bench.rollout_throughput
    python -m bench.rollout_throughput --envs 32 --steps 20 --model tiny --max-new-tokens 32
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from environments.textworld_express import TextWorldExpressEnv
from spear_jax.model.chat_template import ChatTemplate
from spear_jax.model.tokenizer import smollm2_tokenizer
from spear_jax.rollout import RolloutConfig, RolloutEngine, TemplateChatTokenizer
from spear_jax.sampling import Generation, SamplingParams

RESPONSE = "<think>I should look around first.</think><action>look around</action>"


class FixedResponseSampler:
    """Returns ``ids`` (with zero logprobs) for every prompt: a policy with no sampling cost."""

    def __init__(self, ids):
        self.ids = np.asarray(ids, dtype=np.int32)
        self.logprobs = np.zeros(self.ids.shape, dtype=np.float32)

    def generate(self, prompts, sampling, key):
        return [Generation(self.ids, self.logprobs, "stop") for _ in prompts]


def raw_steps_per_s(envs, task_ids, group_size, steps) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    for i, env in enumerate(envs):
        env.reset(task_id=task_ids[i // group_size])
    for _ in range(steps):
        for env in envs:
            env.step(RESPONSE)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = len(envs) * steps
    return {"env_steps": n, "seconds": elapsed, "env_steps_per_s": n / elapsed, "python_cpu_ms_per_step": 1e3 * cpu / n}


def engine_steps_per_s(engine, envs, task_ids, sampling, key) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    result = engine.run(envs, task_ids, sampling, key)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    m = result.metrics
    generated = int(sum(r.loss_mask.sum() for r in result.rows))
    return {
        "env_steps": int(m["rollout/env_steps"]), "seconds": elapsed,
        "env_steps_per_s": m["rollout/env_steps"] / elapsed,
        "python_cpu_ms_per_step": 1e3 * cpu / m["rollout/env_steps"],
        "env_s": m["rollout/env_time_s"], "sampler_s": m["rollout/sampler_time_s"],
        "host_s": elapsed - m["rollout/env_time_s"] - m["rollout/sampler_time_s"],
        "generated_tokens": generated, "generated_tokens_per_s": generated / m["rollout/sampler_time_s"],
        "mean_prompt_tokens": float(np.mean([r.prompt_ids.shape[0] for r in result.rows])),
        "failed_episodes": int(m["rollout/failed_episodes"]),
    }


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["env_steps_per_s"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="twc")
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=("none", "tiny"), default="none")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.envs % args.group_size:
        parser.error(f"--envs ({args.envs}) must be a multiple of --group-size ({args.group_size})")

    tok = TemplateChatTokenizer(ChatTemplate(smollm2_tokenizer(), "chatml"))
    envs = [TextWorldExpressEnv(args.game, split="train", max_steps=args.steps) for _ in range(args.envs)]
    task_ids = list(range(args.envs // args.group_size))
    config = RolloutConfig(group_size=args.group_size)
    setup = {"game": args.game, "envs": args.envs, "group_size": args.group_size, "steps": args.steps,
             "cpu_devices": jax.device_count(), "backend": jax.default_backend()}

    end = tok.assistant_end_ids
    scripted = FixedResponseSampler(tok.encode(RESPONSE) + list(end))
    sampling = SamplingParams(max_new_tokens=512, stop_sequences=(end,))
    engine = RolloutEngine(scripted, tok, config)
    raw_steps_per_s(envs, task_ids, args.group_size, args.steps)  # warms the JVM's JIT up
    raw_runs, engine_runs = [], []
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        raw_runs.append(raw_steps_per_s(envs, task_ids, args.group_size, args.steps))
        engine_runs.append(engine_steps_per_s(engine, envs, task_ids, sampling, jax.random.key(0)))
    raw, result = best(raw_runs), best(engine_runs)
    print(json.dumps({"run": "raw", **setup, **raw}))
    overhead = {
        "host_overhead_wall_ms_per_step": 1e3 * (1 / result["env_steps_per_s"] - 1 / raw["env_steps_per_s"]),
        "host_overhead_cpu_ms_per_step": result["python_cpu_ms_per_step"] - raw["python_cpu_ms_per_step"],
    }
    print(json.dumps({"run": "engine_scripted", **setup, **result, **overhead}))

    if args.model == "tiny":
        from flax import nnx

        from spear_jax.model import get_model_config, init_model
        from spear_jax.model.tokenizer import tiny_tokenizer
        from spear_jax.sampling import Sampler

        tiny_tok = TemplateChatTokenizer(ChatTemplate(tiny_tokenizer(), "chatml"))
        cfg = get_model_config("tiny")
        graphdef, state = nnx.split(init_model(cfg, seed=0))
        sampler = Sampler(graphdef, state, cfg, max_len=2048, max_batch=args.envs)
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, stop_sequences=(tiny_tok.assistant_end_ids,))
        engine = RolloutEngine(sampler, tiny_tok, config)
        engine_steps_per_s(engine, envs, task_ids, sampling, jax.random.key(0))  # compiles
        runs = [engine_steps_per_s(engine, envs, task_ids, sampling, jax.random.key(1 + i))
                for i in range(args.repeats)]
        print(json.dumps({"run": "engine_tiny_model", **setup, "max_new_tokens": args.max_new_tokens,
                          **best(runs)}))
    for env in envs:
        env.close()


if __name__ == "__main__":
    main()
