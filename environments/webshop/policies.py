"""Scripted WebShop policies (gold and random) and an environment-throughput measurement.

* gold: search with the goal instruction, ``next >`` until the target product is listed, click
  it, click each wanted option value, ``buy now``. It wins every goal whose product is in the top
  50 results for its own instruction.
* random: a uniformly drawn admissible action each step; ``search[<your query>]`` becomes a
  search for three words drawn from a fixed vocabulary.

Both emit well-formed ``<think>/<action>`` responses, so they exercise the full ``step`` path.
"""
from __future__ import annotations

import random
import time

from environments.base import Observation
from environments.webshop.env import SEARCH_ACTION, WebShopEnv, make_offline_webshop_env

RANDOM_QUERY_WORDS = ("cream", "black", "shirt", "lamp", "organic", "scrub", "wireless",
                      "table", "small", "gluten", "free", "women's", "men's", "hair")


def react_response(action: str) -> str:
    """A well-formed model response carrying ``action``."""
    return f"<think>scripted</think><action>{action}</action>"


def gold_action(env: WebShopEnv, observation: Observation) -> str:
    """The gold policy's next action for the env's current goal."""
    goal = env.goal
    target = f"click[{goal.asin.lower()}]"
    actions = observation.admissible_actions
    if SEARCH_ACTION in actions:
        return f"search[{goal.instruction_text}]"
    if "click[buy now]" in actions:
        chosen = env.chosen_options
        missing = [value for value in goal.option_values() if value not in chosen.values()]
        return f"click[{missing[0]}]" if missing else "click[buy now]"
    if target in actions:
        return target
    if "click[next >]" in actions:
        return "click[next >]"
    return "click[back to search]"


def random_action(observation: Observation, rng: random.Random) -> str:
    """A uniformly drawn admissible action (searches use random vocabulary words)."""
    action = rng.choice(observation.admissible_actions)
    if action == SEARCH_ACTION:
        action = f"search[{' '.join(rng.sample(RANDOM_QUERY_WORDS, 3))}]"
    return action


def measure_throughput(num_episodes: int = 100, policy: str = "random", split: str = "test",
                       seed: int = 0) -> dict[str, float]:
    """Plays ``num_episodes`` offline episodes and times the env (reset + step) alone.

    Returns episodes, steps, seconds (env time only), steps_per_second, success_rate and
    mean_task_score. The catalogue is built (and cached) before timing starts.
    """
    if policy not in ("random", "gold"):
        raise ValueError(f"policy must be 'random' or 'gold', got {policy!r}")
    env = make_offline_webshop_env(split=split, seed=0)
    rng = random.Random(seed)
    steps, env_seconds, wins, score = 0, 0.0, 0, 0.0
    for episode in range(num_episodes):
        start = time.perf_counter()
        observation = env.reset(seed=seed * 1_000_003 + episode)
        env_seconds += time.perf_counter() - start
        while True:
            action = (gold_action(env, observation) if policy == "gold"
                      else random_action(observation, rng))
            start = time.perf_counter()
            result = env.step(react_response(action))
            env_seconds += time.perf_counter() - start
            steps += 1
            observation = result.observation
            if result.done:
                break
        wins += result.won
        score += result.info["task_score"]
    return {"episodes": num_episodes, "steps": steps, "seconds": env_seconds,
            "steps_per_second": steps / env_seconds, "success_rate": wins / num_episodes,
            "mean_task_score": score / num_episodes}
