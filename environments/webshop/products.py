"""WebShop's product and goal records, as its engine holds them after loading.

Field names follow WebShop's loaded products (``Title``, ``Description``, ``BulletPoints``,
``Attributes``, ``Price``, ``pricing``, ``options``, ``query``, ``product_category``) in
snake case. Both the offline catalogue (generated pages) and the adapter for the real data files
produce these records, so the page engine, the search index and the reward never know which one
they are serving.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

PLACEHOLDER_ATTRIBUTE = "DUMMY_ATTR"  # WebShop's attribute list for products without one


@dataclasses.dataclass(frozen=True)
class Review:
    """One customer review as shown on a product's Reviews page."""

    title: str
    score: str
    body: str


@dataclasses.dataclass(frozen=True)
class Product:
    """A product page.

    Attributes:
      asin: upper-case product id (shown on result pages, clicked lower-case).
      title: page title (WebShop's ``Title`` == ``name``; the type reward compares its nouns).
      query: the lower-cased search query the product belongs to (type reward: query match).
      category: top-level category word (e.g. ``beauty``).
      product_category: breadcrumb ``"A › B › C"`` (type reward: >= 2 shared levels).
      description: Description page text.
      bullet_points: Features page lines.
      reviews: Reviews page entries.
      rating: shown as ``Rating: <rating>`` (``N.A.`` when unknown).
      pricing: one price, or the (low, high) range the purchase price is drawn from.
      price_tag: the displayed price, ``$x`` or ``$lo to $hi``.
      options: option name -> values (lower-case), in page order.
      attributes: the product's attributes (``DUMMY_ATTR`` when it has none).
      instruction_text: synthetic goal instruction of the product, or None.
      instruction_attributes: the attributes that instruction asks for, or None.
      human_instructions: human-written goals (``items_human_ins.json`` entries), possibly empty.
    """

    asin: str
    title: str
    query: str
    category: str
    product_category: str
    description: str
    bullet_points: tuple[str, ...]
    reviews: tuple[Review, ...]
    rating: str
    pricing: tuple[float, ...]
    price_tag: str
    options: Mapping[str, tuple[str, ...]]
    attributes: tuple[str, ...]
    instruction_text: str | None = None
    instruction_attributes: tuple[str, ...] | None = None
    human_instructions: tuple[Mapping[str, object], ...] = ()

    def search_document(self) -> str:
        """The text WebShop indexes for search: title, description, first bullet, options."""
        option_text = ", and ".join(
            f"{name}: {', '.join(values)}" for name, values in self.options.items())
        first_bullet = self.bullet_points[0] if self.bullet_points else ""
        return " ".join([self.title, self.description, first_bullet, option_text]).lower()


@dataclasses.dataclass(frozen=True)
class Goal:
    """A shopping goal (one instruction; synthetic goals: one per option combination).

    Attributes:
      asin: the target product.
      instruction_text: what the agent is asked to buy.
      attributes: attributes the purchase should have.
      goal_options: option name -> wanted value (synthetic goals) or a list of wanted values
        (human goals).
      price_upper: the price limit (1e6 when the instruction states none).
      query, category, product_category, name: copied from the target product (type reward).
      weight: WebShop's sampling weight (mean inverse attribute frequency).
    """

    asin: str
    instruction_text: str
    attributes: tuple[str, ...]
    goal_options: Mapping[str, str] | tuple[str, ...]
    price_upper: float
    query: str
    category: str
    product_category: str
    name: str
    weight: float = 1.0

    def option_values(self) -> tuple[str, ...]:
        """The wanted option values, whatever the goal kind."""
        if isinstance(self.goal_options, Mapping):
            return tuple(self.goal_options.values())
        return tuple(self.goal_options)
