"""WebShop on its REAL data files (for users who have them).

Reads WebShop's files, turns them into ``Product`` / ``Goal`` records exactly as WebShop's
``load_products`` / ``get_goals`` do, and serves them with the same page engine, reward and env
as the offline catalogue. Search uses the pure-Python BM25 stand-in of ``search`` (same
documents and BM25 parameters as WebShop's pyserini index, simplified analyzer), not Lucene.

Expected files (WebShop's ``data/`` folder):

``items_shuffle_1000.json`` — a JSON list of scraped product records. Keys used::

    {"asin": "B07...",                      # products with asin "nan" or > 10 chars are skipped,
                                            # repeated asins keep their first record
     "name": "<title>",
     "full_description": "<text>",
     "small_description": ["<bullet>", ...] | "<bullet>",
     "pricing": "$12.99" | "$10.99$24.99" | "" | missing,  # none -> $100.0
     "customization_options": {"<Option name>": [{"value": "<v>", "image": "<url>" | null},
                                                 ...] | null, ...} | {} | null,
     "query": "<search query the product was scraped for>",
     "category": "<beauty|food|fashion|furniture|electronics>",
     "product_category": "<A › B › C>",
     ...}                                   # other keys are ignored

  Option names are lower-cased; values are stripped, lower-cased, with "/" replaced by " | ".
  A price string is split on "$"; every piece keeps its digits and dots; two or more pieces
  make a (low, high) range shown as "$low to $high".

``items_ins_v2_1000.json`` — ``{asin: {"attributes": [...], "instruction": "...",
"instruction_attributes": [...]}}`` (see ``goals.load_attribute_file``). Products without an
entry get the attribute ``DUMMY_ATTR`` and no goal.

``items_human_ins.json`` (only with ``human_goals=True``) — ``{asin: [{"instruction": "...",
"instruction_attributes": [...], "instruction_options": [...]}, ...]}``.

``reviews.json`` (optional) — ``[{"asin": "...", "average_rating": <x>, "reviews":
[{"title": "...", "score" | "stars": <n>, "body" | "review": "..."}, ...]}, ...]``. Without it,
products have no reviews and rating ``N.A.`` (as in WebShop when the file lacks the asin).
"""
from __future__ import annotations

import json
import os
import random
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping

from environments.webshop.engine import Shop
from environments.webshop.env import MAX_STEPS, WebShopEnv
from environments.webshop.goals import (draw_purchase_prices, human_goals, load_attribute_file,
                                        shuffle_goals, synthetic_goals)
from environments.webshop.products import PLACEHOLDER_ATTRIBUTE, Product, Review

REQUIRED_KEYS = ("asin", "name", "full_description", "small_description",
                 "customization_options", "query", "category", "product_category")
DEFAULT_PRICE = 100.0
_NOT_PRICE_CHARS = re.compile(r"[^\d.]")


def _read_json(path: str | os.PathLike, what: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!s}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parse_pricing(pricing: str | None) -> tuple[tuple[float, ...], str]:
    """(prices, price tag) of a WebShop price string (see module docstring)."""
    if not pricing:
        return (DEFAULT_PRICE,), f"${DEFAULT_PRICE}"
    try:
        values = [float(Decimal(_NOT_PRICE_CHARS.sub("", piece)))
                  for piece in pricing.split("$")[1:]]
    except InvalidOperation:
        raise ValueError(f"unreadable pricing {pricing!r}") from None
    if not values:
        raise ValueError(f"pricing {pricing!r} has no '$' amount")
    if len(values) == 1:
        return (values[0],), f"${values[0]}"
    return (values[0], values[1]), f"${values[0]} to ${values[1]}"


def parse_options(customization: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    """Option name -> values of a ``customization_options`` record (see module docstring)."""
    options = {}
    for name, contents in (customization or {}).items():
        if contents is None:
            continue
        options[name.lower()] = tuple(
            str(content["value"]).strip().replace("/", " | ").lower() for content in contents)
    return options


def _reviews(path: str | os.PathLike | None) -> tuple[dict[str, tuple[Review, ...]],
                                                      dict[str, str]]:
    if path is None:
        return {}, {}
    reviews, ratings = {}, {}
    for entry in _read_json(path, "reviews file"):
        reviews[entry["asin"]] = tuple(
            Review(title=str(r.get("title", "")), score=str(r.get("score", r.get("stars", ""))),
                   body=str(r.get("body", r.get("review", ""))))
            for r in entry.get("reviews", []))
        ratings[entry["asin"]] = str(entry.get("average_rating", "N.A."))
    return reviews, ratings


def product_from_record(record: Mapping[str, Any], attribute_entry: Mapping[str, Any] | None,
                        reviews: tuple[Review, ...] = (), rating: str = "N.A.",
                        human_instructions: tuple[Mapping[str, Any], ...] = ()) -> Product:
    """One ``items_shuffle`` record (+ its attribute entry) as a ``Product``."""
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"product record {record.get('asin')!r} lacks keys {missing}")
    bullets = record["small_description"]
    bullets = tuple(bullets) if isinstance(bullets, list) else (str(bullets),)
    pricing, price_tag = parse_pricing(record.get("pricing"))
    entry = attribute_entry or {}
    instruction = entry.get("instruction")
    return Product(
        asin=record["asin"], title=record["name"], query=record["query"].lower().strip(),
        category=record["category"], product_category=record["product_category"],
        description=record["full_description"] or "", bullet_points=bullets, reviews=reviews,
        rating=rating, pricing=pricing, price_tag=price_tag,
        options=parse_options(record["customization_options"]),
        attributes=tuple(entry.get("attributes") or (PLACEHOLDER_ATTRIBUTE,)),
        instruction_text=instruction,
        instruction_attributes=(tuple(entry["instruction_attributes"])
                                if instruction is not None else None),
        human_instructions=tuple(human_instructions))


def load_webshop_products(items_path: str | os.PathLike, attributes_path: str | os.PathLike,
                          num_products: int | None = None,
                          reviews_path: str | os.PathLike | None = None,
                          human_goals_path: str | os.PathLike | None = None) -> list[Product]:
    """WebShop's product list: the first ``num_products`` records, skipping bad/repeated asins."""
    records = _read_json(items_path, "product file")
    if not isinstance(records, list):
        raise ValueError(f"product file {items_path!s}: expected a JSON list of products")
    attributes = load_attribute_file(attributes_path)
    human = _read_json(human_goals_path, "human goal file") if human_goals_path else {}
    reviews, ratings = _reviews(reviews_path)
    if num_products is not None:
        records = records[:num_products]
    products, seen = [], set()
    for record in records:
        asin = record.get("asin")
        if not isinstance(asin, str) or asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        products.append(product_from_record(
            record, attributes.get(asin), reviews.get(asin, ()), ratings.get(asin, "N.A."),
            tuple(human.get(asin, ()))))
    if not products:
        raise ValueError(f"product file {items_path!s} has no usable product")
    return products


def load_webshop_shop(items_path: str | os.PathLike, attributes_path: str | os.PathLike,
                      human_goals_path: str | os.PathLike | None = None,
                      num_products: int | None = None,
                      reviews_path: str | os.PathLike | None = None, seed: int = 0) -> Shop:
    """A ``Shop`` on WebShop's files: synthetic goals, or human goals when ``human_goals_path``
    is given; prices and price limits drawn from ``random.Random(seed)``."""
    products = load_webshop_products(items_path, attributes_path, num_products, reviews_path,
                                     human_goals_path)
    rng = random.Random(seed)
    prices = draw_purchase_prices(products, rng)
    build_goals = human_goals if human_goals_path else synthetic_goals
    goals = shuffle_goals(build_goals(products, prices, rng))
    if not goals:
        raise ValueError("the data files define no goal (no product has an instruction)")
    return Shop.build(products, prices, goals)


def make_webshop_env_from_files(items_path: str | os.PathLike,
                                attributes_path: str | os.PathLike, split: str = "train",
                                human_goals_path: str | os.PathLike | None = None,
                                num_products: int | None = None,
                                reviews_path: str | os.PathLike | None = None,
                                max_steps: int = MAX_STEPS, seed: int = 0) -> WebShopEnv:
    """WebShop env on the real data files (see ``load_webshop_shop``)."""
    shop = load_webshop_shop(items_path, attributes_path, human_goals_path, num_products,
                             reviews_path, seed)
    return WebShopEnv(shop, split=split, max_steps=max_steps, seed=seed)
