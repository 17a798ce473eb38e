"""Environments by name: ``make_env("alfworld", split="valid_unseen")``.

Each entry maps a domain name to ``"module:Class"``; the module is imported only when that
domain is made, so a missing optional engine (e.g. ALFWorld's) never breaks the others. Adding
a domain is one line in ``ENVIRONMENTS`` and one in ``SPLITS`` (where its split names live); the
class's constructor keyword arguments are the domain's options.
"""
from __future__ import annotations

import importlib
import inspect

from environments.base import Env

ENVIRONMENTS: dict[str, str] = {
    "textworld_express": "environments.textworld_express:TextWorldExpressEnv",
    "alfworld": "environments.alfworld:ALFWorldEnv",
    "webshop": "environments.webshop.adapter:make_webshop_env",
    "math": "environments.math_registry:make_math_env",
}
# Where each domain's split names are defined (a tuple, or a dict keyed by split name).
SPLITS: dict[str, str] = {
    "textworld_express": "environments.textworld_express:SPLITS",
    "alfworld": "environments.alfworld_data:SPLITS",
    "webshop": "environments.webshop.goals:SPLITS",
    "math": "environments.math_registry:SPLITS",
}


def env_names() -> tuple[str, ...]:
    """The registered domain names."""
    return tuple(ENVIRONMENTS)


def env_class(name: str) -> type:
    """The class registered under ``name`` (imports its module)."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; registered: {env_names()}")
    return _resolve(ENVIRONMENTS[name])


def _resolve(target: str):
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def split_names(name: str) -> tuple[str, ...]:
    """The splits environment ``name`` accepts as ``split=`` (imports only its split table)."""
    if name not in SPLITS:
        raise ValueError(f"unknown environment {name!r}; registered: {env_names()}")
    return tuple(_resolve(SPLITS[name]))


def make_env(name: str, **kwargs) -> Env:
    """Builds the environment ``name`` with its constructor options ``kwargs``."""
    cls = env_class(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        options = tuple(inspect.signature(cls).parameters)
        raise TypeError(f"bad options for environment {name!r} ({error}); its options are {options}") from None
    return cls(**kwargs)
