"""Builds a locked config from a method name and the ``--config=configs/X.py:ARG`` argument.

ARG is ``PRESET`` or, for SPEAR, ``PRESET,BASE`` with BASE the method SPEAR is added to
(e.g. SPEAR over Dr.BoT-GiGPO: ``configs/spear.py:alfworld_qwen2.5_1.5b,drbot_gigpo``).
"""
from __future__ import annotations

import ml_collections

from configs import algorithms, presets
from configs.base import DEFAULT_PRESET, base_config

SPEAR_DEFAULT_BASE = "drbot"


def _parse_arg(method: str, arg: str | None) -> tuple[str, str]:
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    if len(parts) > 2 or (len(parts) == 2 and method != "spear"):
        form = "PRESET,BASE" if method == "spear" else "PRESET"
        raise ValueError(f"config argument {arg!r} for {method} must be {form}")
    preset = parts[0] if parts else DEFAULT_PRESET
    base = parts[1] if len(parts) == 2 else (SPEAR_DEFAULT_BASE if method == "spear" else method)
    return preset, base


def build_config(method: str, arg: str | None) -> ml_collections.ConfigDict:
    """``method`` in grpo | drbot | gigpo | drbot_gigpo | spear | sft."""
    preset, base = _parse_arg(method, arg)
    c = base_config()
    if method == "sft":
        c.name = "sft"
    else:
        algorithms.apply_base(c, base)
        c.name = base
        if method == "spear":
            algorithms.spear(c)
            c.name = f"spear_{base}"
    presets.apply_preset(c, preset)
    if method == "sft":
        c.sft.enable = True
        c.trainer.total_steps = 0
    c.lock()
    return c
