"""GRPO: `--config=configs/grpo.py:PRESET` (default PRESET: twx_tiny)."""
from configs._compose import build_config


def get_config(arg: str | None = None):
    return build_config("grpo", arg)
