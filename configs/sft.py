"""Supervised warm start, writing the checkpoint RL starts from: `--config=configs/sft.py:PRESET`
(default PRESET: twx_tiny). Examples from environment gold paths, a jsonl of conversations or a
jsonl of worked math solutions (`config.sft.source`, see spear_jax/sft_data.py)."""
from configs._compose import build_config


def get_config(arg: str | None = None):
    return build_config("sft", arg)
