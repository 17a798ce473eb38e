"""One process of a short SPEAR run (tiny model) on TextWorldExpress or, with ``--task math``, on
procedural arithmetic with the code interpreter, for the multi-process tests.

    python tests/distributed/run_process.py WORKDIR --devices 2 --processes 2 --process-id 0 --port 12345

Sets its own simulated CPU device count (the tests pass it in ``XLA_FLAGS``), joins ``--processes`` processes through a local
coordinator (one process: no coordinator), and trains ``--steps`` steps. The sampler is the real
one, called in lockstep over the global mesh; its decoded tokens then pick a random admissible
action (seeded by the step's key, the prompt and the decoded tokens), so groups win and lose, the
replay buffer triggers, and any difference in the decoded tokens changes the run's metrics. Math
episodes keep the sampler's text (trajectory rows: one persistent session decoding every
process's rows in lockstep).
``--stop-at-step k`` stops process ``--stopping-process`` as step k begins: it dies abruptly
(``--stop-how die``, ``os._exit``) or hangs (``--stop-how hang``).
"""
import argparse
import hashlib
import os
import sys
import time


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--task", choices=("twx", "math"), default="twx")
    parser.add_argument("--stop-at-step", type=int, default=0)
    parser.add_argument("--stop-how", choices=("die", "hang"), default="die")
    parser.add_argument("--stopping-process", type=int, default=1)
    parser.add_argument("--gather-timeout", type=float, default=120.0)
    parser.add_argument("--heartbeat-timeout", type=int, default=100)
    parser.add_argument("--shutdown-timeout", type=int, default=300)
    return parser.parse_args(argv)


args = _parse(sys.argv[1:])
os.environ["JAX_PLATFORMS"] = "cpu"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # run by hand
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import importlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from spear_jax import distributed  # noqa: E402
from spear_jax.trainer import Trainer  # noqa: E402
from tests.admissible import admissible_turn  # noqa: E402



def config(steps: int, task: str):
    """SPEAR (GRPO base), 4 tasks x 2 episodes a step: on the one-room coin game (step rows) with
    a replay buffer small enough to trigger at step 2, or on procedural arithmetic with the code
    interpreter (trajectory rows on the sampler's multi-turn session)."""
    c = importlib.import_module("configs.spear").get_config(f"{task}_tiny,grpo")
    c.unlock()
    c.data.train_tasks_per_step, c.data.group_size, c.data.eval_episodes = 4, 2, 4
    if task == "twx":
        c.env.history_length, c.env.max_steps = 0, 3
        c.env.kwargs = {"game": "coin", "game_params": {"numLocations": 1, "numDistractorItems": 0,
                                                        "includeDoors": 0}}
    else:
        c.env.kwargs.size = 64
    c.rollout.max_response_length = c.actor.loss_agg_max_response_length = 16
    c.actor.ppo_mini_batch_size, c.actor.ppo_micro_batch_size = 16, 8
    c.replay.buffer_size = 4  # triggers at step 2 (valid rows > 1.5 x 4), replays 4 rows
    c.seed = 3  # a seed whose step 1 leaves > 6 valid rows in the buffer (seeds 3 and 4 do; 2 does not)
    c.replay.max_loss_steps = 2
    c.trainer.total_steps, c.trainer.eval_every, c.trainer.checkpoint_every = steps, 100, 1
    c.trainer.eval_before_train = False
    c.sft.enable = False
    c.distributed.gather_timeout_s = args.gather_timeout
    c.distributed.heartbeat_timeout_s = args.heartbeat_timeout
    c.distributed.shutdown_timeout_s = args.shutdown_timeout
    if args.processes > 1:
        c.distributed.coordinator_address = f"localhost:{args.port}"
        c.distributed.num_processes, c.distributed.process_id = args.processes, args.process_id
    return c


class DecodedAdmissible:
    """The real sampler's generations, then a random admissible action per row whose choice
    depends on the step's key, the row's prompt and the tokens the sampler decoded for it."""

    def __init__(self, sampler, chat):
        self.sampler, self.chat = sampler, chat

    def generate(self, prompts, sampling, key):
        decoded = self.sampler.generate(prompts, sampling, key)
        key_words = np.asarray(jax.random.key_data(key)).ravel().tolist()
        out = []
        for prompt, generation in zip(prompts, decoded):
            digest = hashlib.sha256(np.asarray(prompt, np.int64).tobytes()
                                    + np.asarray(generation.tokens, np.int64).tobytes()).digest()
            out.append(admissible_turn(self.chat, prompt, np.random.default_rng(key_words + list(digest[:8]))))
        return out


def main() -> None:
    c = config(args.steps, args.task)
    distributed.initialize(c)
    trainer = Trainer(c, args.workdir)
    if args.task == "twx":  # math rows keep the sampler's own text
        for engine in (trainer.engine, trainer.eval_engine):
            engine.sampler = DecodedAdmissible(engine.sampler, engine.tokenizer)
    if args.stop_at_step:
        step = trainer.train_step

        def train_step(number):
            if number == args.stop_at_step and jax.process_index() == args.stopping_process:
                print(f"process {args.stopping_process} stops ({args.stop_how}) at step {number}", flush=True)
                if args.stop_how == "die":
                    os._exit(17)
                time.sleep(3600)
            return step(number)

        trainer.train_step = train_step
    try:
        trainer.train()
    finally:
        trainer.close()
    print(f"process {jax.process_index()} of {jax.process_count()} finished", flush=True)


if __name__ == "__main__":
    main()
