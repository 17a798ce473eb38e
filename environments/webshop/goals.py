"""WebShop goals: the attribute file, purchase prices, goal construction and the train/test split.

The goal list is built as WebShop's ``get_synthetic_goals`` builds it (the SPEAR / verl-agent
setting: ``human_goals=False``):

* every product with an ``instruction`` in the attribute file yields one goal per combination of
  its option values (option names sorted, values in page order, ``itertools.product``);
* instruction text = ``instruction + " with " + "name: value, and name: value"`` (omitted when
  the product has no options) ``+ ", and price lower than X.00 dollars"``;
* the price limit X: from the multiples of 10 (10..990) above the product's purchase price, take
  the first four and keep the larger of two drawn from them; with fewer than two such
  multiples the limit is 1e6 and the price clause is omitted (one draw per product, shared by
  its option combinations);
* weight = mean over the goal's attributes of 1 / (number of goals having that attribute);
* the list is shuffled with ``random.Random(233)`` and split as verl-agent does: test goals are
  the first 500 indices, train goals the rest.

Purchase prices: a fixed price, or a uniform draw inside a price range.

Reference accident (documented, not reproduced): WebShop draws prices and price limits from the
process-global ``random`` module before seeding it, so its goal texts differ between processes.
Here every draw comes from one ``random.Random(seed)``, consumed in product order (prices, then
goals), so a seed fixes the goals.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import random
from typing import Mapping, Sequence

from environments.webshop.products import Goal, Product

PRICE_LIMITS = tuple(10.0 * i for i in range(1, 100))
NO_PRICE_LIMIT = 1_000_000.0
GOAL_SHUFFLE_SEED = 233
NUM_TEST_GOALS = 500
SPLITS = ("train", "test", "all")


def load_attribute_file(path: str | os.PathLike) -> dict[str, dict]:
    """Loads and validates WebShop's ``items_ins_v2_*.json``.

    Format: ``{asin: {"attributes": [str, ...], "instruction": str (optional),
    "instruction_attributes": [str, ...] (with "instruction")}}``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"attribute file not found: {path!s}")
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, dict):
        raise ValueError(f"attribute file {path!s}: expected an object keyed by asin")
    for asin, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("attributes"), list):
            raise ValueError(f"attribute file {path!s}: entry {asin!r} lacks an 'attributes' list")
        if "instruction" in entry and not entry.get("instruction_attributes"):
            raise ValueError(
                f"attribute file {path!s}: entry {asin!r} has an instruction but no "
                "'instruction_attributes'")
    return entries


def draw_purchase_prices(products: Sequence[Product], rng: random.Random) -> dict[str, float]:
    """asin -> purchase price: the single price, or uniform in the (low, high) range."""
    prices = {}
    for product in products:
        if not product.pricing:
            prices[product.asin] = 100.0
        elif len(product.pricing) == 1:
            prices[product.asin] = product.pricing[0]
        else:
            prices[product.asin] = rng.uniform(product.pricing[0], product.pricing[1])
    return prices


def draw_price_limit(price: float, rng: random.Random) -> tuple[float, str]:
    """(limit, instruction clause) for a product bought at ``price`` (see module docstring)."""
    candidates = [limit for limit in PRICE_LIMITS if limit > price][:4]
    if len(candidates) < 2:
        return NO_PRICE_LIMIT, ""
    _, upper = sorted(rng.sample(candidates, 2))
    return upper, f", and price lower than {upper:.2f} dollars"


def _with_weights(goals: list[dict]) -> list[Goal]:
    attribute_counts = collections.Counter(a for goal in goals for a in goal["attributes"])
    return [
        Goal(**goal, weight=sum(1.0 / attribute_counts[a] for a in goal["attributes"])
             / len(goal["attributes"]))
        for goal in goals
    ]


def _target_fields(product: Product) -> dict:
    return dict(asin=product.asin, query=product.query, category=product.category,
                product_category=product.product_category, name=product.title)


def synthetic_goals(products: Sequence[Product], prices: Mapping[str, float],
                    rng: random.Random) -> list[Goal]:
    """One goal per (instructed product, option combination), in product order."""
    goals = []
    for product in products:
        if product.instruction_text is None:
            continue
        if not product.instruction_attributes:
            raise ValueError(f"product {product.asin}: instruction without instruction_attributes")
        price_upper, price_text = draw_price_limit(prices[product.asin], rng)
        names = sorted(product.options)
        for combination in itertools.product(*(product.options[name] for name in names)):
            wanted = dict(zip(names, combination))
            option_text = ", and ".join(f"{name}: {value}" for name, value in wanted.items())
            option_text = f" with {option_text}" if option_text else ""
            goals.append(dict(
                instruction_text=f"{product.instruction_text}{option_text}{price_text}",
                attributes=tuple(product.instruction_attributes), goal_options=wanted,
                price_upper=price_upper, **_target_fields(product)))
    return _with_weights(goals)


def human_goals(products: Sequence[Product], prices: Mapping[str, float],
                rng: random.Random) -> list[Goal]:
    """WebShop's human-goal variant: one goal per human instruction with attributes (weight 1)."""
    goals = []
    for product in products:
        for entry in product.human_instructions:
            attributes = tuple(entry["instruction_attributes"])
            if not attributes:
                continue
            price_upper, price_text = draw_price_limit(prices[product.asin], rng)
            goals.append(Goal(
                instruction_text=str(entry["instruction"]).strip(".") + price_text,
                attributes=attributes, goal_options=tuple(entry["instruction_options"]),
                price_upper=price_upper, weight=1.0, **_target_fields(product)))
    return goals


def shuffle_goals(goals: Sequence[Goal], seed: int = GOAL_SHUFFLE_SEED) -> list[Goal]:
    """WebShop's fixed goal order: a shuffle with ``random.Random(233)``."""
    shuffled = list(goals)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def split_goal_indices(num_goals: int, split: str) -> range:
    """verl-agent's split: ``test`` = goals [0, 500), ``train`` = [500, n), ``all`` = [0, n)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test":
        return range(min(NUM_TEST_GOALS, num_goals))
    if split == "train":
        return range(min(NUM_TEST_GOALS, num_goals), num_goals)
    return range(num_goals)
