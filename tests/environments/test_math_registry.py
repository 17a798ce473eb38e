"""``make_math_env``'s ``generator_options``: the reasoning-gym generator's fields shape both
splits' problems; the math preset spells out the generator's defaults without changing a problem."""
import re

import pytest

from configs._compose import build_config
from environments.math_registry import make_math_env

EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ("+", "-", "*"),
        "allow_parentheses": False, "allow_negation": False}
TWO_TERMS = re.compile(r"Calculate (\d{1,2}) ([-+*]) (\d{1,2})\.")


def _problems(env, count=40):
    return [env.problems[i].problem for i in range(count)]


def test_options_shape_the_problems_of_both_splits():
    train, test = (make_math_env(split, size=200, generator_options=EASY) for split in ("train", "test"))
    for env in (train, test):
        assert all(TWO_TERMS.match(problem.split("\n")[0]) for problem in _problems(env)), _problems(env)[:3]
    assert _problems(train) != _problems(test)  # the held-out problems come from another seed
    assert not all(TWO_TERMS.match(p.split("\n")[0]) for p in _problems(make_math_env(size=200)))


def test_the_presets_spelled_out_defaults_change_no_problem():
    options = build_config("drbot", "math_tiny").env.kwargs.generator_options.to_dict()
    assert _problems(make_math_env(size=200, generator_options=options)) == _problems(make_math_env(size=200))


def test_bad_options_name_the_option_and_the_source():
    with pytest.raises(ValueError, match="max_term"):
        make_math_env(generator_options={"max_term": 2})
    with pytest.raises(ValueError, match="apply to reasoning_gym:<generator> sources only, not 'aime2024'"):
        make_math_env(source="aime2024", generator_options={"max_terms": 2})
