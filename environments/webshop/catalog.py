"""GENERATED product pages for the 1000 products of WebShop's attribute file.

WebShop's real product pages (``items_shuffle_1000.json``) are not available offline; its goal and
attribute file (``items_ins_v2_1000.json``) is. This module generates, from a seed, one page per
asin of that file, so that the real goals (instruction, attributes) can be played with
WebShop's pages, actions and reward. Everything below is synthetic and labelled so: brand names,
titles, descriptions, features, reviews, option values and prices are NOT the real products'.

What is taken from the real file and what is generated:

* asin, attributes, instruction and instruction attributes: real.
* product type / query: parsed from the product's real instruction, whose grammar is
  ``Find me <attrs>, <type> with|for <attrs>`` (e.g. ``scrubs & body treatments``); a product
  without an instruction takes the type of the nearest instructed product in file order (the file
  lists WebShop's category blocks contiguously, so neighbours share a category). The query is the
  type; the breadcrumb is ``<Category> › <Type>``.
* category: WebShop's five blocks (beauty, grocery, electronics, fashion, furniture) located in
  file order by the instructions they contain (``CATEGORY_BLOCKS``).
* title, description, features, reviews: templates filled with the product's real attributes, so
  search and the attribute reward see the attributes that the goals ask for.
* options: 0-2 option groups (names and value vocabularies per category; shoe sizes for
  footwear types), 2-5 values each,
  chosen so that on one product (a) no value occurs in its title, features or description and
  (b) no two values fuzzy-match (token-set ratio > 85, raw or colour-normalised). Both keep
  WebShop's option reward honest on generated pages: a wrong option never scores as right.
* prices: a single price or a (low, high) range inside a per-category band.

Determinism: the same seed gives byte-identical pages (one ``random.Random(seed)`` consumed in
file order).
"""
from __future__ import annotations

import random
import re
from typing import Mapping, Sequence

from environments.webshop.products import PLACEHOLDER_ATTRIBUTE, Product, Review
from environments.webshop.text_match import fuzzy_match, normalize_color

INSTRUCTION_PREFIX = "Find me "
# (first file index, category) of WebShop's five category blocks in items_ins_v2_1000.json.
CATEGORY_BLOCKS = ((0, "beauty"), (236, "grocery"), (354, "electronics"), (584, "fashion"),
                   (784, "furniture"))
CATEGORY_BREADCRUMB = {
    "beauty": "Beauty & Personal Care",
    "grocery": "Grocery & Gourmet Food",
    "electronics": "Electronics",
    "fashion": "Clothing, Shoes & Jewelry",
    "furniture": "Home & Kitchen",
}
PRICE_BANDS = {"beauty": (4.0, 60.0), "grocery": (3.0, 55.0), "electronics": (9.0, 420.0),
               "fashion": (7.0, 95.0), "furniture": (35.0, 990.0)}
OPTION_VOCABULARY: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "beauty": {
        "size": ("1 fl oz", "1.7 fl oz", "3.4 ounce", "8 ounce", "16 ounce", "2 count",
                 "pack of 3", "12 pack"),
        "scent": ("lavender", "unscented", "coconut", "eucalyptus", "vanilla", "citrus",
                  "peppermint", "sandalwood"),
        "color": ("black", "pink", "beige", "brown", "clear", "purple", "gold"),
    },
    "grocery": {
        "flavor name": ("original", "sea salt", "honey", "dark chocolate", "vanilla bean",
                        "spicy chili", "strawberry", "garlic herb"),
        "size": ("4 ounce", "6.5 ounce", "12 ounce", "1 pound", "2 pound", "pack of 6",
                 "24 count"),
    },
    "electronics": {
        "color": ("black", "white", "silver", "blue", "red", "grey"),
        "size": ("3 ft", "6 ft", "10 ft", "32 inch", "55 inch", "2 pack"),
        "style": ("standard", "wireless", "with adapter", "bundle", "international version"),
    },
    "fashion": {
        "size": ("small", "medium", "large", "x-large", "xx-large"),
        "color": ("black", "white", "navy", "grey", "red", "khaki", "olive", "pink"),
        "fit type": ("regular", "big & tall", "petite"),
    },
    "furniture": {
        "color": ("walnut", "black", "white", "grey", "espresso", "oak", "teal"),
        "size": ("twin", "full", "queen", "king", "24 inch", "36 inch", "2 piece"),
        "style": ("mid-century", "farmhouse", "industrial", "contemporary", "rustic"),
    },
}
FOOTWEAR_SIZES = ("6", "7", "8", "8.5", "9.5", "10", "11", "12")
FOOTWEAR_WORDS = ("shoes", "sneakers", "boots", "sandals", "pumps", "slippers", "loafers",
                  "flats", "oxfords", "mules", "footwear")
GENERIC_DESCRIPTORS = ("classic", "everyday", "signature", "essential", "deluxe", "original")
# Clickable labels an option value must not shadow.
RESERVED_LABELS = frozenset({"search", "back to search", "< prev", "next >", "description",
                             "features", "reviews", "attributes", "buy now"})

_BRAND_ONSETS = ("Vel", "Kor", "Lum", "Ar", "Bri", "Zen", "Mar", "Tal", "Or", "Sy", "Quin",
                 "Dal", "Fen", "Ny", "Rho", "Cas", "Em", "Gal", "Ix", "Pol")
_BRAND_CODAS = ("ora", "ix", "ena", "o", "ara", "eon", "ette", "ova", "is", "umi", "ak", "elle")
_FEATURE_TEMPLATES = (
    "{Attr}: designed with {attr} in mind for everyday use",
    "{Attr} - a key feature customers ask for",
    "Made to be {attr}, checked before shipping",
    "{Attr} design that keeps its shape and finish",
)
_REVIEW_TITLES = ("Works as described", "Good value", "Would buy again", "Not bad",
                  "Exactly what I needed", "Decent quality")
_REVIEW_BODIES = ("I like that it is {attr}.", "The {attr} part matters to me and it delivers.",
                  "Arrived quickly; {attr} as promised.", "Nice {type}, {attr}.")


def category_of_index(index: int) -> str:
    """WebShop category block of the product at position ``index`` of the attribute file."""
    category = CATEGORY_BLOCKS[0][1]
    for start, name in CATEGORY_BLOCKS:
        if index >= start:
            category = name
    return category


def product_type_of_instruction(instruction: str, attributes: Sequence[str]) -> str:
    """The product type named by a synthetic instruction (``Find me <attrs> <type> with ...``)."""
    if not instruction.startswith(INSTRUCTION_PREFIX):
        raise ValueError(f"instruction does not start with {INSTRUCTION_PREFIX!r}: {instruction!r}")
    text = instruction[len(INSTRUCTION_PREFIX):]
    by_length = sorted(attributes, key=len, reverse=True)
    stripped = True
    while stripped:
        stripped = False
        for attribute in by_length:
            for separator in (", ", " "):
                if text.startswith(attribute + separator):
                    text = text[len(attribute + separator):]
                    stripped = True
    for marker in re.finditer(r" (?:with|for) ", text):
        tail = re.split(r", | (?:with|for) ", text[marker.end():])
        if all(part in attributes for part in tail):
            return text[:marker.start()]
    return text


def _nearest_instructed_types(entries: Sequence[tuple[str, dict]]) -> list[str]:
    typed = [(i, product_type_of_instruction(e["instruction"], e["instruction_attributes"]))
             for i, (_, e) in enumerate(entries) if "instruction" in e]
    if not typed:
        raise ValueError("the attribute file has no instructed product to take types from")
    return [min(typed, key=lambda it: (abs(it[0] - i), it[0]))[1] for i in range(len(entries))]


def _title_case(text: str) -> str:
    return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))


def _brand(rng: random.Random) -> str:
    return rng.choice(_BRAND_ONSETS) + rng.choice(_BRAND_CODAS)


def _price(category: str, rng: random.Random) -> tuple[tuple[float, ...], str]:
    low, high = PRICE_BANDS[category]
    base = round(rng.uniform(low, high), 2)
    if rng.random() < 0.7:
        return (base,), f"${base}"
    top = round(base * rng.uniform(1.1, 1.8), 2)
    return (base, top), f"${base} to ${top}"


def _compatible(value: str, chosen: Sequence[str], page_text: str) -> bool:
    if value in RESERVED_LABELS or value in page_text:
        return False
    return not any(fuzzy_match(value, other)
                   or fuzzy_match(normalize_color(value), normalize_color(other))
                   for other in chosen)


def _options(category: str, product_type: str, page_text: str,
             rng: random.Random) -> dict[str, tuple[str, ...]]:
    vocabulary = dict(OPTION_VOCABULARY[category])
    if any(word in product_type for word in FOOTWEAR_WORDS):
        vocabulary["size"] = FOOTWEAR_SIZES
    num_groups = rng.choices((0, 1, 2), weights=(0.25, 0.45, 0.30))[0]
    names = rng.sample(sorted(vocabulary), k=min(num_groups, len(vocabulary)))
    options, chosen = {}, []
    for name in names:
        values, wanted = [], rng.randint(2, 5)
        for value in rng.sample(vocabulary[name], k=len(vocabulary[name])):
            if len(values) == wanted:
                break
            if _compatible(value, chosen, page_text):
                values.append(value)
                chosen.append(value)
        if len(values) >= 2:
            options[name] = tuple(values)
    return options


def _product(asin: str, entry: dict, product_type: str, category: str,
             rng: random.Random) -> Product:
    attributes = list(entry["attributes"])
    shown = attributes if attributes else [rng.choice(GENERIC_DESCRIPTORS)]
    brand = _brand(rng)
    title_attributes = rng.sample(shown, k=min(len(shown), rng.randint(1, 3)))
    title = f"{brand} {_title_case(' '.join(title_attributes))} {_title_case(product_type)}"
    features = tuple(
        rng.choice(_FEATURE_TEMPLATES).format(Attr=_title_case(a), attr=a)
        for a in rng.sample(shown, k=len(shown)))
    required = entry.get("instruction_attributes") or []
    description = (f"{brand} {product_type} made for people who want "
                   f"{', '.join(dict.fromkeys(required + shown))}. Generated product page.")
    reviews = tuple(
        Review(title=rng.choice(_REVIEW_TITLES), score=str(rng.randint(3, 5)),
               body=rng.choice(_REVIEW_BODIES).format(attr=rng.choice(shown), type=product_type))
        for _ in range(rng.randint(0, 3)))
    rating = "N.A." if rng.random() < 0.5 else f"{rng.uniform(3.0, 5.0):.1f}"
    pricing, price_tag = _price(category, rng)
    page_text = " ".join((title, description) + features).lower()
    options = _options(category, product_type, page_text, rng)
    breadcrumb = f"{CATEGORY_BREADCRUMB[category]} › {_title_case(product_type)}"
    return Product(
        asin=asin, title=title, query=product_type.lower(), category=category,
        product_category=breadcrumb, description=description, bullet_points=features,
        reviews=reviews, rating=rating, pricing=pricing, price_tag=price_tag, options=options,
        attributes=tuple(attributes) if attributes else (PLACEHOLDER_ATTRIBUTE,),
        instruction_text=entry.get("instruction"),
        instruction_attributes=tuple(required) if "instruction" in entry else None)


def generate_catalog(attribute_entries: Mapping[str, dict], seed: int) -> list[Product]:
    """One GENERATED product page per asin of the attribute file, in file order (see module
    docstring)."""
    entries = list(attribute_entries.items())
    types = _nearest_instructed_types(entries)
    rng = random.Random(seed)
    return [_product(asin, entry, types[i], category_of_index(i), rng)
            for i, (asin, entry) in enumerate(entries)]
