"""Shared fixtures: a small random model with peaked logits, a sampler, prompts."""
import numpy as np
import pytest

from spear_jax.model import get_model_config
from spear_jax.sampling import Sampler
from tests.sampling.reference import MAX_BATCH, MAX_LEN, random_state


@pytest.fixture(scope="session")
def cfg():
    return get_model_config("tiny", vocab_size=512)


@pytest.fixture(scope="session")
def model(cfg):
    return random_state(cfg, 0)


@pytest.fixture(scope="session")
def sampler(cfg, model):
    graphdef, state = model
    return Sampler(graphdef, state, cfg, max_len=MAX_LEN, max_batch=MAX_BATCH)


@pytest.fixture(scope="session")
def prompts(cfg):
    rng = np.random.default_rng(0)
    return [list(rng.integers(0, cfg.vocab_size, size=n)) for n in (5, 11, 2, 8)]
