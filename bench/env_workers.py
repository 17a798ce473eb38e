"""Environment workers: steps/s of N environments stepped in lockstep by 1, 2, ... worker processes.

Each domain's ``--envs`` environments (environment ``i`` built with seed ``i``) are reset on tasks
``task_ids[i]`` and then stepped ``--turns`` times in lockstep, as the rollout engine does: one
``EnvPool.step_batch`` per turn holding every live environment's response (a ReAct response
naming an admissible action drawn from a fixed-seed generator); an environment whose episode
ends drops out. steps/s counts steps over the stepping time (resets are timed apart). The
"in-process" row steps the same environments one after another in this process, for the
pool's overhead. The ``cpu_reference`` domain (``CpuBoundEnv``: a fixed 20 ms of CPU per step, no
I/O) shows what the machine's free cores allow: its speedup is the ceiling for CPU-bound
environments such as ALFWorld on this machine at this moment. The last line is
``speedup=<ALFWorld steps/s with 2 workers / 1 worker>``.

    python -m bench.env_workers
    python -m bench.env_workers --domains textworld_express --envs 64 --workers 1 2 4
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from environments.base import Observation, StepResult
from environments.registry import ENVIRONMENTS, make_env, register_env
from spear_jax.env_pool import EnvFailure, EnvPool, EnvSpec, SequentialEnvs

# Constructor options per domain (ALFWorld: the unseen validation games shipped with the repo).
DOMAINS: dict[str, dict] = {
    "alfworld": {"split": "valid_unseen", "max_steps": 50},
    "webshop": {"split": "train", "max_steps": 15},
    "textworld_express": {"game": "cookingworld", "split": "train", "max_steps": 50},
    "cpu_reference": {"split": "train", "max_steps": 50},
}


class CpuBoundEnv:
    """A reference environment: every step spins ``step_cpu_s`` of this thread's CPU time."""

    name, domain, task_ids = "cpu_reference", "agent", range(1000)

    def __init__(self, split: str = "train", seed: int = 0, max_steps: int = 50, step_cpu_s: float = 0.02):
        self.max_steps, self.step_cpu_s = max_steps, step_cpu_s
        self.observation = Observation(text="spin", task="spin", admissible_actions=("spin",))

    def reset(self, task_id=None, seed=None) -> Observation:
        return self.observation

    def step(self, response_text: str) -> StepResult:
        start = time.thread_time()
        while time.thread_time() - start < self.step_cpu_s:
            pass
        return StepResult(observation=self.observation, reward=0.0, done=False, won=False, action_valid=True)

    def close(self) -> None:
        pass


def react(action: str) -> str:
    return f"<think>I choose an action.</think><action>{action}</action>"


def play(envs, turns: int, seed: int) -> dict[str, float]:
    """Resets every environment of the batch ``envs``, then steps the live ones ``turns`` times."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    observations = envs.reset_batch([(i, envs[i].task_ids[i]) for i in range(len(envs))])
    reset_s = time.perf_counter() - start
    failures = [o.error for o in observations if isinstance(o, EnvFailure)]
    live = {i: o for i, o in enumerate(observations) if not isinstance(o, EnvFailure)}
    steps, step_s = 0, 0.0
    for _ in range(turns):
        if not live:
            break
        requests = [(i, react(str(rng.choice(o.admissible_actions)))) for i, o in live.items()]
        start = time.perf_counter()
        results = envs.step_batch(requests)
        step_s += time.perf_counter() - start
        failures += [r.error for r in results if isinstance(r, EnvFailure)]
        steps += sum(not isinstance(r, EnvFailure) for r in results)
        live = {i: r.observation for (i, _), r in zip(requests, results)
                if not isinstance(r, EnvFailure) and not r.done}
    if failures:
        raise RuntimeError(f"{len(failures)} environment calls failed, first: {failures[0]}")
    return {"steps": steps, "steps_per_s": steps / step_s, "reset_s": reset_s}


def measure(domain: str, num_envs: int, workers: int, turns: int, seed: int) -> dict[str, float]:
    """One row: ``workers`` = 0 steps in this process, else an ``EnvPool`` of that many."""
    specs = [EnvSpec(domain, dict(DOMAINS[domain], seed=i)) for i in range(num_envs)]
    start = time.perf_counter()
    if workers == 0:
        envs = SequentialEnvs([make_env(s.name, **s.kwargs) for s in specs])
    else:
        envs = EnvPool(specs, workers, step_timeout_s=120.0)
    build_s = time.perf_counter() - start
    try:
        return dict(play(envs, turns, seed), build_s=build_s)
    finally:
        if workers == 0:
            for env in envs.envs:
                env.close()
        else:
            envs.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--envs", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="worker counts to measure (0 = in-process, no pool)")
    parser.add_argument("--turns", type=int, default=10, help="lockstep turns after the reset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if "cpu_reference" not in ENVIRONMENTS:
        register_env("cpu_reference", "bench.env_workers:CpuBoundEnv", ("train",))

    print(f"{args.envs} environments, {args.turns} lockstep turns; {os.cpu_count()} CPUs, load average "
          f"before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'domain':18} {'workers':>10} {'steps':>6} {'steps/s':>9} {'reset s':>8} {'build s':>8}")
    figures: dict[tuple[str, int], float] = {}
    for domain in args.domains:
        for workers in args.workers:
            label = "in-process" if workers == 0 else str(workers)
            try:
                row = measure(domain, args.envs, workers, args.turns, args.seed)
            except Exception as error:  # a domain that cannot run here is reported, the rest go on
                print(f"{domain:18} {label:>10} not measured: {type(error).__name__}: {error}")
                continue
            figures[domain, workers] = row["steps_per_s"]
            print(f"{domain:18} {label:>10} {row['steps']:>6} {row['steps_per_s']:>9.1f} "
                  f"{row['reset_s']:>8.2f} {row['build_s']:>8.2f}", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    one, two = figures.get(("alfworld", 1)), figures.get(("alfworld", 2))
    print(f"speedup={two / one if one and two else float('nan'):.2f}")


if __name__ == "__main__":
    main()
