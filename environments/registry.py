"""Environments by name: ``make_env("alfworld", split="valid_unseen")``.

Each entry maps a domain name to ``"module:Class"``; the module is imported only when that
domain is made, so a missing optional engine (e.g. ALFWorld's) never breaks the others. Adding
a domain is one line in ``ENVIRONMENTS``; the class's constructor keyword arguments are the
domain's options.
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


def env_names() -> tuple[str, ...]:
    """The registered domain names."""
    return tuple(ENVIRONMENTS)


def env_class(name: str) -> type:
    """The class registered under ``name`` (imports its module)."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; registered: {env_names()}")
    module_name, class_name = ENVIRONMENTS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_env(name: str, **kwargs) -> Env:
    """Builds the environment ``name`` with its constructor options ``kwargs``."""
    cls = env_class(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        options = tuple(inspect.signature(cls).parameters)
        raise TypeError(f"bad options for environment {name!r} ({error}); its options are {options}") from None
    return cls(**kwargs)
