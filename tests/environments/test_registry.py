"""The registry and the environment contract: every registered environment declares its domain,
and what it offers (gold actions) through the protocols of ``environments.base``."""
import pytest

from environments import registry
from environments.base import DOMAINS, HasGoldActions, declared_domain
from environments.registry import env_names, env_type, register_env, split_names

DECLARED = {"textworld_express": ("agent", True), "alfworld": ("agent", True),
            "webshop": ("agent", False), "math": ("math", False)}


@pytest.mark.parametrize("name", env_names())
def test_every_registered_environment_declares_its_domain(name):
    environment = env_type(name)
    assert environment.domain in DOMAINS
    assert (environment.domain, issubclass(environment, HasGoldActions)) == DECLARED[name]
    assert split_names(name)


class _NoDomain:
    name = "no_domain"


def _unannotated_factory(split="train"):
    return None


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry, "ENVIRONMENTS", dict(registry.ENVIRONMENTS))


def test_an_environment_class_must_declare_its_domain(scratch_registry):
    register_env("no_domain", _NoDomain, ("train",))
    with pytest.raises(TypeError, match=r"_NoDomain must declare its domain as a class attribute"):
        env_type("no_domain")
    _NoDomain.domain = "chess"
    try:
        with pytest.raises(TypeError, match=r"got 'chess'"):
            declared_domain(_NoDomain)
    finally:
        del _NoDomain.domain


def test_a_factory_must_annotate_the_class_it_builds(scratch_registry):
    register_env("bare", _unannotated_factory, ("train",))
    with pytest.raises(TypeError, match=r"'bare': its factory _unannotated_factory must annotate the class"):
        env_type("bare")


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown environment 'minecraft'"):
        env_type("minecraft")
    with pytest.raises(ValueError, match="unknown environment 'minecraft'"):
        split_names("minecraft")
