"""Print a run's sampled trajectories (``spear_jax.trajectories``) readably in the terminal.

    python -m spear_jax.inspect --workdir=/path/to/run                # list the saved steps
    python -m spear_jax.inspect --workdir=/path/to/run --step=10      # print step 10's episodes
    python -m spear_jax.inspect --workdir=RUN --step=10 --traj=3 --color=always | less -R

Each episode starts with a header (trajectory, group, task, won, return), then every turn: the
prompt (role ``user``), the response, and a line of env reward, shaped reward, advantage, raised
flags and trained tokens. In the response, tokens the policy generated and is trained on print
as they are; observation / tool tokens (no loss) sit inside ``[[obs]]...[[/obs]]`` and generated
tokens whose loss was masked (a flagged row) inside ``[[masked]]...[[/masked]]``. With colour
(``--color=auto`` when stdout is a terminal, or ``always``) the roles are coloured as well:
prompt cyan, trained response green, observation yellow, masked tokens dim.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from spear_jax.trajectories import marked_text, read_trajectories, saved_steps, segment_style

_RESET = "\033[0m"
STYLES = {"header": "\033[1m", "prompt": "\033[36m", "assistant": "\033[32m",
          "observation": "\033[33m", "masked": "\033[2m", "stats": "\033[35m"}


def paint(text: str, style: str, color: bool) -> str:
    """``text`` in the ANSI ``STYLES[style]`` when ``color``, else unchanged."""
    return f"{STYLES[style]}{text}{_RESET}" if color and text else text


def format_segment(segment: Mapping, color: bool) -> str:
    """One response segment with its ``[[obs]]`` / ``[[masked]]`` markers (and colour)."""
    return paint(marked_text(segment), segment_style(segment), color)


def format_turn(turn: Mapping, color: bool) -> str:
    raised = [name for name, on in turn["flags"].items() if on]
    stats = (f"env_reward={turn['env_reward']:.3g} shaped={turn['shaped_reward']:.3g} "
             f"advantage={turn['advantage']:+.3g} flags={','.join(raised) or '-'} "
             f"trained_tokens={turn['trained_tokens']}{' MASKED' if turn['masked'] else ''} "
             f"finish={turn['finish_reason']}")
    return "\n".join([
        paint(f"--- turn {turn['step_index']} ---", "header", color),
        paint("[user] ", "prompt", color) + paint(turn["prompt"], "prompt", color),
        paint("[assistant] ", "assistant", color) + "".join(format_segment(s, color) for s in turn["segments"]),
        paint(stats, "stats", color),
    ])


def format_episode(record: Mapping, color: bool) -> str:
    header = (f"=== step {record['step']} trajectory {record['traj_id']} (group {record['group_id']}) "
              f"task {record['task_id']} [{record['task_type']}] won={record['won']} "
              f"return={record['episode_return']:.3g} length={record['episode_length']} ===")
    return "\n".join([paint(header, "header", color)] + [format_turn(t, color) for t in record["turns"]])


def use_color(choice: str, stream) -> bool:
    if choice == "auto":
        return bool(getattr(stream, "isatty", lambda: False)())
    return choice == "always"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a run's sampled trajectories.")
    parser.add_argument("--workdir", required=True, help="the run directory")
    parser.add_argument("--step", type=int, default=None, help="the step to print (default: list the steps)")
    parser.add_argument("--traj", type=int, default=None, help="only this trajectory id")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    args = parser.parse_args(argv)
    steps = saved_steps(args.workdir)
    if args.step is None:
        print("saved trajectory steps: " + (" ".join(map(str, steps)) if steps else
              f"none in {args.workdir}/trajectories (see config.logging.trajectories_every)"))
        return 0
    if args.step not in steps:
        print(f"no trajectories saved at step {args.step} in {args.workdir}; saved steps: "
              f"{' '.join(map(str, steps)) or 'none'}", file=sys.stderr)
        return 2
    color = use_color(args.color, sys.stdout)
    records = [r for r in read_trajectories(args.workdir, args.step) if args.traj in (None, r["traj_id"])]
    try:
        print("\n\n".join(format_episode(r, color) for r in records))
    except BrokenPipeError:  # the reader (head, less) closed the pipe: drop the rest quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
