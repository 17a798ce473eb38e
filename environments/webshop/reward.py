"""WebShop's native purchase reward (``web_agent_site/engine/goal.py: get_reward``).

For a purchased product p with chosen options O (name -> value) at purchase price c, and a goal g
with attributes A, wanted option values V and price limit u:

    total = (n_att + n_opt + [c <= u]) / (|A| + |V| + 1) * r_type

* n_att: goal attributes a matched by the product: some product attribute x with
  token_set_ratio(x, a) > 85, else ``a`` is a substring of the lower-cased title, features
  (joined by spaces) or description.
* n_opt: chosen options that match: after colour normalisation of chosen and wanted values, an
  option named ``size`` must equal a wanted value exactly, any other option must fuzzy-match
  (> 85) one; an unmatched chosen value still counts if it is a substring of the lower-cased
  title, features or description. (n_opt counts chosen options, so an off-target product with
  more option groups than the goal can push ``total`` above 1: WebShop behaves so.)
* r_type (type match): q = (p.query == g.query); k = (p and g breadcrumbs share >= 2 levels);
  s = |nouns(p.title) & nouns(g.name)| / |nouns(g.name)| (0.2 if the goal name has no noun).
  r_type = 1, then 0.5 unless (q or k or s > 0.2), then 0.1 if s < 0.1, then 0 if s == 0.
  Nouns come from ``text_match.title_nouns`` (a stand-in for spaCy, see there).

The episode's success criterion (verl-agent) is ``total == 1.0``: right product type, every
attribute, every option, within the price limit.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from environments.webshop.products import Goal, Product
from environments.webshop.text_match import fuzzy_match, normalize_color, title_nouns

EXACT_MATCH_OPTION_NAMES = ("size",)


@dataclasses.dataclass(frozen=True)
class RewardBreakdown:
    """The native score and its parts (WebShop's verbose reward info)."""

    total: float
    r_type: float
    r_att: float
    r_option: float | None
    r_price: bool
    num_attr_matches: int
    num_option_matches: int
    query_match: bool
    category_match: bool
    title_score: float


def _page_text(product: Product) -> tuple[str, str, str]:
    return (product.title.lower(), " ".join(product.bullet_points).lower(),
            product.description.lower())


def _mentioned_on_page(text: str, product: Product) -> bool:
    return any(text in part for part in _page_text(product))


def type_reward(product: Product, goal: Goal) -> tuple[float, bool, bool, float]:
    """(r_type, query_match, category_match, title_score) — see module docstring."""
    query_match = product.query == goal.query
    levels = {level.strip() for level in product.product_category.split("›")}
    goal_levels = {level.strip() for level in goal.product_category.split("›")}
    category_match = len(levels & goal_levels) >= 2
    wanted_nouns = title_nouns(goal.name)
    if wanted_nouns:
        title_score = len(set(title_nouns(product.title)) & set(wanted_nouns)) / len(wanted_nouns)
    else:
        title_score = 0.2
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type, query_match, category_match, title_score


def attribute_matches(product: Product, goal: Goal) -> int:
    """Number of goal attributes the product has (fuzzy attribute match or page mention)."""
    matches = 0
    for wanted in goal.attributes:
        if any(fuzzy_match(have, wanted) for have in product.attributes):
            matches += 1
        elif _mentioned_on_page(wanted, product):
            matches += 1
    return matches


def option_matches(product: Product, goal: Goal, chosen: Mapping[str, str]) -> int:
    """Number of chosen options that match a wanted option value (see module docstring)."""
    wanted = [normalize_color(value) for value in goal.option_values()]
    matches = 0
    for name, value in chosen.items():
        value = normalize_color(value)
        if name.lower() in EXACT_MATCH_OPTION_NAMES:
            matched = value in wanted
        else:
            matched = any(fuzzy_match(target, value) for target in wanted)
        if matched or _mentioned_on_page(value, product):
            matches += 1
    return matches


def purchase_reward(product: Product, goal: Goal, price: float,
                    chosen_options: Mapping[str, str]) -> RewardBreakdown:
    """WebShop's native reward of buying ``product`` at ``price`` with ``chosen_options``."""
    r_type, query_match, category_match, title_score = type_reward(product, goal)
    num_attr = attribute_matches(product, goal)
    num_opt = option_matches(product, goal, chosen_options)
    r_price = price <= goal.price_upper
    num_wanted_options = len(goal.option_values())
    denominator = len(goal.attributes) + num_wanted_options + 1
    total = (num_attr + num_opt + int(r_price)) / denominator * r_type
    return RewardBreakdown(
        total=total, r_type=r_type, r_att=num_attr / len(goal.attributes),
        r_option=num_opt / num_wanted_options if num_wanted_options else None,
        r_price=r_price, num_attr_matches=num_attr, num_option_matches=num_opt,
        query_match=query_match, category_match=category_match, title_score=title_score)
