"""SPEAR on a baseline (BASE: drbot (default), grpo, gigpo, drbot_gigpo): `--config=configs/spear.py:PRESET[,BASE]` (default PRESET: twx_tiny)."""
from configs._compose import build_config


def get_config(arg: str | None = None):
    return build_config("spear", arg)
