"""WebShop on its REAL data files (for users who have them).

Reads WebShop's files, turns them into ``Product`` / ``Goal`` records exactly as WebShop's
``load_products`` / ``get_goals`` do, and serves them with the same page engine, reward and env
as the offline catalogue. Search is ``search.BM25Index`` (bm25s with Lucene's BM25 and an
English-analyzer chain; pyserini's Lucene index is not used).

``make_webshop_env`` is the registry's ``webshop`` entry: without ``data_dir`` it serves the
generated offline catalogue, with ``data_dir`` the files of WebShop's ``data/`` folder
(``webshop_data_files`` names them: ``product_set="1000"`` reads ``items_shuffle_1000.json`` and
``items_ins_v2_1000.json``, ``"all"`` reads ``items_shuffle.json`` and ``items_ins_v2.json``;
``human_goals=True`` adds ``items_human_ins.json``; ``reviews.json`` is read when present).

Expected files:

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

import functools
import json
import os
import random
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping

from environments.webshop.engine import Shop
from environments.webshop.env import MAX_STEPS, WebShopEnv, load_offline_shop
from environments.webshop.goals import (draw_purchase_prices, human_goals, load_attribute_file,
                                        shuffle_goals, synthetic_goals)
from environments.webshop.products import PLACEHOLDER_ATTRIBUTE, Product, Review

REQUIRED_KEYS = ("asin", "name", "full_description", "small_description",
                 "customization_options", "query", "category", "product_category")
DEFAULT_PRICE = 100.0
# WebShop's product sets: (product file, attribute file) in its data/ folder.
PRODUCT_SET_FILES = {"1000": ("items_shuffle_1000.json", "items_ins_v2_1000.json"),
                     "all": ("items_shuffle.json", "items_ins_v2.json")}
HUMAN_GOALS_FILE = "items_human_ins.json"
REVIEWS_FILE = "reviews.json"
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


def webshop_data_files(data_dir: str, product_set: str = "1000",
                       human_goals: bool = False) -> dict[str, str | None]:
    """Paths of WebShop's files in ``data_dir``: keys ``items``, ``attributes``, ``human_goals``
    and ``reviews`` (None when not used / absent). Raises ``ValueError`` naming the argument for
    an unknown ``product_set`` and ``FileNotFoundError`` listing every required file missing."""
    if product_set not in PRODUCT_SET_FILES:
        raise ValueError(f"product_set = {product_set!r} must be one of "
                         f"{sorted(PRODUCT_SET_FILES)} (WebShop's 1000-product or full set)")
    required = list(PRODUCT_SET_FILES[product_set]) + ([HUMAN_GOALS_FILE] if human_goals else [])
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir = {data_dir!r} is not a directory; point it at "
                                f"WebShop's data/ folder holding {', '.join(required)}")
    missing = [name for name in required if not os.path.isfile(os.path.join(data_dir, name))]
    if missing:
        raise FileNotFoundError(
            f"data_dir = {data_dir!r} lacks {', '.join(missing)} (product_set = {product_set!r}"
            f"{', human_goals = True' if human_goals else ''} needs {', '.join(required)})")
    reviews = os.path.join(data_dir, REVIEWS_FILE)
    items, attributes = (os.path.join(data_dir, name) for name in PRODUCT_SET_FILES[product_set])
    return {"items": items, "attributes": attributes,
            "human_goals": os.path.join(data_dir, HUMAN_GOALS_FILE) if human_goals else None,
            "reviews": reviews if os.path.isfile(reviews) else None}


@functools.lru_cache(maxsize=4)
def load_webshop_data_dir(data_dir: str, product_set: str = "1000", human_goals: bool = False,
                          seed: int = 0) -> Shop:
    """The ``Shop`` of WebShop's files in ``data_dir`` (cached per process: every env of a run
    shares one catalogue and goal list)."""
    files = webshop_data_files(data_dir, product_set, human_goals)
    return load_webshop_shop(files["items"], files["attributes"], files["human_goals"],
                             reviews_path=files["reviews"], seed=seed)


def make_webshop_env(split: str = "train", seed: int = 0, max_steps: int = MAX_STEPS,
                     data_dir: str = "", product_set: str = "1000", human_goals: bool = False,
                     shop_seed: int = 0) -> WebShopEnv:
    """WebShop from config options: the generated offline catalogue (``data_dir`` empty) or
    WebShop's files in ``data_dir`` (see ``webshop_data_files``).

    ``shop_seed`` builds the shop (generated pages; purchase prices and price limits of the
    goals) and is the same for every env of a run, so a task id names the same goal in all of
    them; ``seed`` only drives the env's own draws (``reset()`` without a task id).
    """
    if not data_dir:
        if human_goals or product_set != "1000":
            raise ValueError("human_goals and product_set select WebShop's own files: set "
                             "data_dir to WebShop's data/ folder")
        shop = load_offline_shop(shop_seed)
    else:
        shop = load_webshop_data_dir(os.fspath(data_dir), product_set, human_goals, shop_seed)
    return WebShopEnv(shop, split=split, max_steps=max_steps, seed=seed)
