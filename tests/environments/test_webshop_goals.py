"""Goal construction pieces: price limits, split, shuffle, product types, attribute file."""
import json
import random

import pytest

from environments.webshop.catalog import category_of_index, product_type_of_instruction
from environments.webshop.env import DEFAULT_ATTRIBUTE_FILE
from environments.webshop.goals import (NO_PRICE_LIMIT, draw_price_limit, load_attribute_file,
                                        shuffle_goals, split_goal_indices)


def testdraw_price_limit_is_one_of_the_next_four_multiples_of_ten():
    for seed in range(50):
        limit, text = draw_price_limit(12.99, random.Random(seed))
        assert limit in (30.0, 40.0, 50.0)                  # max of 2 drawn from 20..50
        assert text == f", and price lower than {limit:.2f} dollars"
    assert draw_price_limit(20.0, random.Random(0))[0] in (40.0, 50.0, 60.0)   # strictly above
    assert draw_price_limit(985.0, random.Random(0)) == (NO_PRICE_LIMIT, "")   # only 990 above
    assert draw_price_limit(975.0, random.Random(0)) == (
        990.0, ", and price lower than 990.00 dollars")           # 980 and 990 above


def test_split_indices():
    assert split_goal_indices(2000, "test") == range(500)
    assert split_goal_indices(2000, "train") == range(500, 2000)
    assert split_goal_indices(2000, "all") == range(2000)
    assert split_goal_indices(7, "train") == range(7, 7)
    with pytest.raises(ValueError, match="split must be one of"):
        split_goal_indices(10, "val")


def test_shuffle_is_webshops_fixed_order():
    items = list(range(30))
    expected = list(items)
    random.Random(233).shuffle(expected)
    assert shuffle_goals(items) == expected and items == list(range(30))


@pytest.mark.parametrize("instruction, attributes, expected", [
    ("Find me scrubs & body treatments with tea tree, natural ingredients",
     ["tea tree", "natural ingredients"], "scrubs & body treatments"),
    ("Find me bpa free, easy clean tongue cleaners with storage case for bad breath",
     ["bpa free", "easy clean", "storage case", "bad breath"], "tongue cleaners"),
    ("Find me easy apply, cruelty free, long lasting makeup palettes",
     ["easy apply", "cruelty free", "long lasting"], "makeup palettes"),
    ("Find me non slip foot, hand & nail care for dry skin", ["non slip", "dry skin"],
     "foot, hand & nail care"),
])
def test_product_type_of_instruction(instruction, attributes, expected):
    assert product_type_of_instruction(instruction, attributes) == expected


def test_product_type_rejects_other_grammar():
    with pytest.raises(ValueError, match="does not start with 'Find me '"):
        product_type_of_instruction("I need a lamp", ["x"])


def test_category_blocks():
    assert [category_of_index(i) for i in (0, 235, 236, 400, 600, 999)] == [
        "beauty", "beauty", "grocery", "electronics", "fashion", "furniture"]


def test_real_attribute_file_loads():
    entries = load_attribute_file(DEFAULT_ATTRIBUTE_FILE)
    assert len(entries) == 1000
    assert sum("instruction" in e for e in entries.values()) == 415


def test_attribute_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "ins.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected an object keyed by asin"):
        load_attribute_file(path)
    path.write_text(json.dumps({"B1": {"instruction": "x"}}))
    with pytest.raises(ValueError, match="'B1' lacks an 'attributes' list"):
        load_attribute_file(path)
