"""Sandbox calls/s (cold: a worker started per call; warm: pre-started pool; each with workers
booting their own interpreter or forked from the fork server) and MathToolEnv steps/s (a
tool-call turn plus a graded final turn per episode).

    python -m bench.sandbox_throughput [--calls 40] [--pool-size 2] [--episodes 20] [--gap-s 0.5]

Prints one JSON line per measurement. Each call runs a snippet that uses the preamble's numpy,
so the interpreter boot and the preamble import are part of what a cold call pays.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from environments.math_data import ProceduralProblems  # noqa: E402
from environments.math_env import MathToolEnv  # noqa: E402
from environments.sandbox import Sandbox, SandboxConfig  # noqa: E402

SNIPPET = "print(int(np.arange(100).sum()))"


def measure_calls(sandbox: Sandbox, calls: int, gap_s: float = 0.0) -> dict:
    """Back-to-back calls (gap 0: throughput, bound by worker boots) or calls spaced by
    ``gap_s`` (latency when the pool has time to refill, as between decoding turns)."""
    latencies = []
    start = time.perf_counter()
    for _ in range(calls):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        result = sandbox.run(SNIPPET)
        latencies.append(time.perf_counter() - t0)
        assert result.stdout == "4950\n", result
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"calls": calls, "gap_s": gap_s, "calls_per_s": calls / elapsed,
            "latency_ms_p50": 1e3 * latencies[len(latencies) // 2],
            "latency_ms_p90": 1e3 * latencies[int(len(latencies) * 0.9)]}


def measure_env(sandbox: Sandbox, episodes: int) -> dict:
    problems = ProceduralProblems("basic_arithmetic", seed=0, size=episodes)
    env = MathToolEnv(problems, sandbox, grader=problems.grade)
    steps, won = 0, 0
    start = time.perf_counter()
    for i in range(episodes):
        env.reset(task_id=i)
        expression = problems[i].problem.split("Calculate")[-1].strip().rstrip(".")
        tool = env.step('<tool_call>{"name": "code_interpreter", "arguments": {"code": '
                        + json.dumps(f"print(round({expression}))") + "}}</tool_call>")
        final = env.step(f"\\boxed{{{tool.observation.text.strip()}}}")
        steps += 2
        won += final.won
    elapsed = time.perf_counter() - start
    return {"episodes": episodes, "steps_per_s": steps / elapsed, "episodes_per_s": episodes / elapsed,
            "win_rate": won / episodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--gap-s", type=float, default=0.5, help="pause between spaced calls")
    args = parser.parse_args()
    for fork_server in (False, True):
        for warm, gap_s in ((False, 0.0), (True, 0.0), (False, args.gap_s), (True, args.gap_s)):
            config = SandboxConfig(pool_size=args.pool_size, warm=warm, fork_server=fork_server)
            with Sandbox(config) as sandbox:
                time.sleep(1.0)  # let the pool (and fork server) boot before timing
                row = {"bench": "sandbox_calls", "fork_server": sandbox.uses_fork_server,
                       "warm": warm, "pool_size": args.pool_size, "isolated": sandbox.isolated,
                       "drops_privileges": sandbox.drops_privileges}
                row.update(measure_calls(sandbox, args.calls if gap_s == 0 else args.calls // 4, gap_s))
                print(json.dumps(row), flush=True)
    with Sandbox(SandboxConfig(pool_size=args.pool_size, warm=True)) as sandbox:
        time.sleep(1.0)
        row = {"bench": "math_env", "fork_server": sandbox.uses_fork_server, "warm": True,
               "pool_size": args.pool_size}
        row.update(measure_env(sandbox, args.episodes))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
