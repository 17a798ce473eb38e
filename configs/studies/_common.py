"""Building blocks of the study configs (the format: ``spear_jax/study/spec.py``)."""
from __future__ import annotations

import ml_collections


def method(name: str, label: str, config: str, overrides: tuple = (), base: str = "") -> ml_collections.ConfigDict:
    """One row of a study: a ``spear_jax.main`` ``--config`` argument and its field changes;
    ``base``: another method it is also compared with, seed by seed (e.g. SPEAR over GiGPO)."""
    row = {"name": name, "label": label, "config": config, "overrides": tuple(overrides)}
    return ml_collections.ConfigDict({**row, "base": base} if base else row)


def study(name: str, title: str, seeds: tuple, baseline: str, methods: tuple, warm_start_config: str,
          warm_start_data: str, total_steps: int, eval_every: int, eval_episodes: int,
          overrides: tuple = (), warm_start_overrides: tuple = ()) -> ml_collections.ConfigDict:
    """A study config: ``methods`` x ``seeds``, one shared budget and one warm start per seed."""
    c = ml_collections.ConfigDict()
    c.name, c.title, c.seeds, c.baseline = name, title, tuple(seeds), baseline
    c.budget = ml_collections.ConfigDict(
        {"total_steps": total_steps, "eval_every": eval_every, "eval_episodes": eval_episodes})
    c.overrides = tuple(overrides)
    c.warm_start = ml_collections.ConfigDict(
        {"config": warm_start_config, "data": warm_start_data, "overrides": tuple(warm_start_overrides)})
    c.methods = tuple(methods)
    return c
