"""Environment throughput: env steps/s and per-step latency per domain, gold and random policy.

steps/s counts resets in the elapsed time (episodes back to back); step ms excludes them.

Every registered domain (``environments.registry``) can be measured; each env is driven through
``Env.step`` with ReAct-formatted responses, so the figures include response parsing. Policies:

* ``gold``: the env's ``gold_actions()`` (skipped for envs without them);
* ``random``: a uniformly random admissible action per step (skipped without admissible lists).

``--lockstep N`` additionally steps N envs of a domain round-robin in one process (the rollout
engine's pattern) with the random policy and reports the aggregate steps/s.

Examples::

    python -m bench.env_throughput                                   # every domain, defaults
    python -m bench.env_throughput --domains textworld_express --episodes 50 --lockstep 32
    python -m bench.env_throughput --domains alfworld \\
        --env-kwargs '{"alfworld": {"split": "valid_unseen"}}' --episodes 5
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from environments.base import HasGoldActions
from environments.registry import env_names, make_env

# Variants measured per domain when --env-kwargs does not name the domain: label -> kwargs.
DEFAULT_VARIANTS: dict[str, dict[str, dict]] = {
    "textworld_express": {
        f"game={game}": {"game": game, "max_steps": 100}
        for game in ("twc", "cookingworld", "coin", "mapreader", "arithmetic", "sorting",
                     "simonsays", "peckingorder")
    },
    "alfworld": {"split=valid_unseen": {"split": "valid_unseen"}},
}


def react(action: str) -> str:
    return f"<think>I choose an action.</think><action>{action}</action>"


class Timings:
    """Wall-clock samples of resets and steps, and episode outcomes."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self.reset_seconds: list[float] = []
        self.wins: list[bool] = []

    def summary(self) -> dict[str, float]:
        steps = np.asarray(self.step_seconds)
        total = steps.sum() + sum(self.reset_seconds)
        return {
            "episodes": len(self.wins),
            "steps": int(steps.size),
            "steps_per_s": steps.size / total if total else float("nan"),
            "step_ms_mean": 1e3 * steps.mean() if steps.size else float("nan"),
            "step_ms_p50": 1e3 * np.percentile(steps, 50) if steps.size else float("nan"),
            "step_ms_p95": 1e3 * np.percentile(steps, 95) if steps.size else float("nan"),
            "reset_ms_mean": 1e3 * float(np.mean(self.reset_seconds)),
            "win_rate": float(np.mean(self.wins)),
        }


def play(env, policy: str, episodes: int, rng: np.random.Generator) -> Timings | None:
    """Plays ``episodes`` episodes (task drawn from ``rng``); None when the policy does not apply."""
    timings = Timings()
    for _ in range(episodes):
        t0 = time.perf_counter()
        obs = env.reset(seed=int(rng.integers(2**31)))
        timings.reset_seconds.append(time.perf_counter() - t0)
        if policy == "gold" and not isinstance(env, HasGoldActions):
            return None
        if policy == "random" and obs.admissible_actions is None:
            return None
        gold = iter(env.gold_actions()) if policy == "gold" else None
        result = None
        while result is None or not result.done:
            if gold is not None:
                action = next(gold, None)
                if action is None:
                    break
            else:
                action = str(rng.choice(obs.admissible_actions))
            t0 = time.perf_counter()
            result = env.step(react(action))
            timings.step_seconds.append(time.perf_counter() - t0)
            obs = result.observation
        timings.wins.append(bool(result is not None and result.won))
    return timings


def lockstep(domain: str, kwargs: dict, num_envs: int, steps: int, seed: int) -> dict[str, float]:
    """Aggregate random-policy steps/s of ``num_envs`` envs stepped round-robin."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    envs = [make_env(domain, **kwargs) for _ in range(num_envs)]
    build_seconds = time.perf_counter() - t0
    observations = [env.reset(seed=int(rng.integers(2**31))) for env in envs]
    t0 = time.perf_counter()
    for _ in range(steps):
        for i, env in enumerate(envs):
            result = env.step(react(str(rng.choice(observations[i].admissible_actions))))
            observations[i] = (
                env.reset(seed=int(rng.integers(2**31))) if result.done else result.observation
            )
    elapsed = time.perf_counter() - t0
    for env in envs:
        env.close()
    return {"num_envs": num_envs, "steps_per_s": num_envs * steps / elapsed, "build_s": build_seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", nargs="+", default=list(DEFAULT_VARIANTS), choices=env_names())
    parser.add_argument("--policies", nargs="+", default=["gold", "random"], choices=["gold", "random"])
    parser.add_argument("--episodes", type=int, default=20, help="episodes per (variant, policy)")
    parser.add_argument("--env-kwargs", type=json.loads, default={},
                        help='JSON {"domain": {...constructor kwargs...}}; replaces the default variants')
    parser.add_argument("--lockstep", type=int, default=0, help="also step N envs round-robin")
    parser.add_argument("--lockstep-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write all figures to this file")
    args = parser.parse_args(argv)

    rows = []
    header = (f"{'domain':18} {'variant':22} {'policy':7} {'eps':>4} {'steps':>6} {'steps/s':>8} "
              f"{'step ms':>8} {'p50':>7} {'p95':>7} {'reset ms':>9} {'win':>5}")
    print(header)
    for domain in args.domains:
        variants = ({"custom": args.env_kwargs[domain]} if domain in args.env_kwargs
                    else DEFAULT_VARIANTS.get(domain, {"default": {}}))
        for label, kwargs in variants.items():
            env = make_env(domain, **kwargs)
            for policy in args.policies:
                timings = play(env, policy, args.episodes, np.random.default_rng(args.seed))
                if timings is None:
                    print(f"{domain:18} {label:22} {policy:7} (not applicable)")
                    continue
                s = timings.summary()
                rows.append({"domain": domain, "variant": label, "policy": policy, **s})
                print(f"{domain:18} {label:22} {policy:7} {s['episodes']:>4} {s['steps']:>6} "
                      f"{s['steps_per_s']:>8.1f} {s['step_ms_mean']:>8.2f} {s['step_ms_p50']:>7.2f} "
                      f"{s['step_ms_p95']:>7.2f} {s['reset_ms_mean']:>9.1f} {s['win_rate']:>5.2f}")
            env.close()
            if args.lockstep:
                s = lockstep(domain, kwargs, args.lockstep, args.lockstep_steps, args.seed)
                rows.append({"domain": domain, "variant": label, "policy": "random-lockstep", **s})
                print(f"{domain:18} {label:22} lockstep x{args.lockstep}: {s['steps_per_s']:.1f} "
                      f"steps/s aggregate (built in {s['build_s']:.2f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
