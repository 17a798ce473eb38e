"""Environments by name: ``make_env("alfworld", split="valid_unseen")``.

Each entry of ``ENVIRONMENTS`` maps an environment name to an ``Entry``: what builds it (a
class, or a factory function whose return annotation is the class it builds) and its split
names (a tuple, or a dict keyed by split name). Both may be given as ``"module:attribute"``
strings, imported only when that environment is used, so a missing optional engine (e.g.
ALFWorld's) never breaks the others and the split names can be listed without starting the
engine. Adding an environment is one file (the class, see ``environments.base`` and
docs/environments.md) and one line in ``ENVIRONMENTS``, or one ``register_env`` call; the
builder's keyword arguments are the environment's options (``config.env.kwargs``).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from typing import Any, Callable, Sequence

from environments.base import Env, declared_domain


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered environment.

    Attributes:
      builder: the class, a factory returning an instance of it (annotated ``-> TheClass``), or
        ``"module:attribute"`` naming either.
      splits: the split names ``split=`` accepts, or ``"module:attribute"`` naming them.
    """

    builder: str | Callable[..., Env]
    splits: str | Sequence[str]


ENVIRONMENTS: dict[str, Entry] = {
    "textworld_express": Entry("environments.textworld_express:TextWorldExpressEnv",
                               "environments.textworld_express:SPLITS"),
    "alfworld": Entry("environments.alfworld:ALFWorldEnv", "environments.alfworld_data:SPLITS"),
    "webshop": Entry("environments.webshop.adapter:make_webshop_env", "environments.webshop.goals:SPLITS"),
    "math": Entry("environments.math_registry:make_math_env", "environments.math_registry:SPLITS"),
}


def register_env(name: str, builder: str | Callable[..., Env], splits: str | Sequence[str]) -> None:
    """Adds environment ``name`` (see ``Entry``); a name already registered is an error."""
    if name in ENVIRONMENTS:
        raise ValueError(f"environment {name!r} is already registered (as {ENVIRONMENTS[name].builder!r})")
    ENVIRONMENTS[name] = Entry(builder, splits)


def env_names() -> tuple[str, ...]:
    """The registered environment names."""
    return tuple(ENVIRONMENTS)


def _entry(name: str) -> Entry:
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; registered: {env_names()}")
    return ENVIRONMENTS[name]


def _resolve(target: Any) -> Any:
    if not isinstance(target, str):
        return target
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def env_class(name: str) -> Callable[..., Env]:
    """What builds environment ``name``: its class or factory (imports its module)."""
    return _resolve(_entry(name).builder)


def env_type(name: str) -> type:
    """The class environment ``name`` builds (the class itself, or the factory's return
    annotation), whose class attributes (``domain``, ...) describe it before it is built."""
    built = env_class(name)
    if not isinstance(built, type):
        returned = typing.get_type_hints(built).get("return")
        if not isinstance(returned, type):
            raise TypeError(f"environment {name!r}: its factory {built.__qualname__} must annotate the class "
                            f"it returns (def {built.__name__}(...) -> TheEnvClass)")
        built = returned
    declared_domain(built)
    return built


def split_names(name: str) -> tuple[str, ...]:
    """The splits environment ``name`` accepts as ``split=`` (imports only its split table)."""
    return tuple(_resolve(_entry(name).splits))


def make_env(name: str, **kwargs) -> Env:
    """Builds the environment ``name`` with its constructor options ``kwargs``."""
    cls = env_class(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        options = tuple(inspect.signature(cls).parameters)
        raise TypeError(f"bad options for environment {name!r} ({error}); its options are {options}") from None
    return cls(**kwargs)
