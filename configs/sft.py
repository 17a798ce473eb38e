"""Supervised warm start on gold trajectories, writing the checkpoint RL starts from: `--config=configs/sft.py:PRESET` (default PRESET: twx_tiny)."""
from configs._compose import build_config


def get_config(arg: str | None = None):
    return build_config("sft", arg)
