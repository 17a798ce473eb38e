"""WebShop's page state machine and its text rendering ("text" observation mode).

A ``Shop`` holds the catalogue (products, purchase prices, goals, search index); a
``ShopSession`` is one shopper on one goal. Pages and transitions follow WebShop's simulated
server (``web_agent_site/envs/web_agent_text_env.py``):

====================  ==========================================================================
page                  clickables (in this order) -> effect
====================  ==========================================================================
search                ``search`` (a no-op when clicked; the search bar is ``search[...]``)
results (10 / page)   ``back to search``; ``< prev`` (page > 1); ``next >`` (10 * page < hits);
                      product asins (lower case) -> item page
item                  ``back to search``; ``< prev`` -> results (options cleared);
                      ``description`` / ``features`` / ``reviews`` -> sub page; ``buy now`` ->
                      done (episode ends, native reward computed); option values -> choose that
                      option (item page re-rendered)
item sub page         ``back to search``; ``< prev`` -> item page
done                  none
====================  ==========================================================================

``search[<words>]`` runs from any page (WebShop's text environment does not check for a search
bar; only the list of available actions does), returns the top 50 products and shows page 1.
``back to search`` returns to the search page. Any other action (unknown verb, empty query, a
label that is not clickable here, ``click[search]``) changes nothing and is reported as not
executed.

Observation text: the page's visible strings joined by `` [SEP] `` as WebShop's simple text mode
prints them (``WebShop [SEP] Instruction: [SEP] <goal> [SEP] Search`` on the search page;
``Instruction: [SEP] <goal> [SEP] Back to Search [SEP] ...`` on the others).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import re
from typing import Mapping, Sequence

from environments.webshop.products import Goal, Product
from environments.webshop.reward import RewardBreakdown, purchase_reward
from environments.webshop.search import SEARCH_RETURN_N, BM25Index

SEP = " [SEP] "
PRODUCTS_PER_PAGE = 10
BACK_TO_SEARCH, PREV_PAGE, NEXT_PAGE, BUY_NOW = "back to search", "< prev", "next >", "buy now"
SEARCH_BUTTON = "search"
SUB_PAGES = ("description", "features", "reviews")
_ACTION = re.compile(r"(.+)\[(.+)\]")


@dataclasses.dataclass(frozen=True)
class Shop:
    """A catalogue ready to serve: products (catalogue order), purchase prices, goals, index."""

    products: Mapping[str, Product]
    prices: Mapping[str, float]
    goals: tuple[Goal, ...]
    index: BM25Index

    @classmethod
    def build(cls, products: Sequence[Product], prices: Mapping[str, float],
              goals: Sequence[Goal]) -> "Shop":
        """Indexes ``products`` (``Product.search_document``) and checks that goals resolve."""
        by_asin = {}
        for product in products:
            if product.asin in by_asin:
                raise ValueError(f"duplicate product asin {product.asin}")
            by_asin[product.asin] = product
        missing = sorted({goal.asin for goal in goals} - by_asin.keys())
        if missing:
            raise ValueError(f"goals refer to unknown products: {missing[:5]}")
        index = BM25Index([(p.asin, p.search_document()) for p in products])
        return cls(products=by_asin, prices=dict(prices), goals=tuple(goals), index=index)

    def search(self, query: str) -> list[str]:
        """asins of the top ``SEARCH_RETURN_N`` products for ``query``."""
        return self.index.search(query, k=SEARCH_RETURN_N)


class Page(enum.Enum):
    SEARCH = "search"
    RESULTS = "results"
    ITEM = "item"
    ITEM_SUB = "item_sub"
    DONE = "done"


@dataclasses.dataclass(frozen=True)
class Clickable:
    """What a clickable label does: ``kind`` in {button, product, option}."""

    kind: str
    option_name: str | None = None


@dataclasses.dataclass(frozen=True)
class ActionOutcome:
    """Result of one action: executed or not (with the reason), and the purchase if any."""

    executed: bool
    done: bool = False
    purchase: RewardBreakdown | None = None
    error: str | None = None


def parse_action(action: str) -> tuple[str, str | None]:
    """WebShop's ``verb[argument]`` parse: (verb, argument) or (text, None) if no brackets."""
    match = _ACTION.match(action)
    if match is None:
        return action, None
    return match.group(1), match.group(2)


class ShopSession:
    """One shopper working on one goal."""

    def __init__(self, shop: Shop, goal: Goal):
        self.shop, self.goal = shop, goal
        self.page = Page.SEARCH
        self.query: str | None = None
        self.hits: list[str] = []
        self.page_number = 1
        self.asin: str | None = None
        self.options: dict[str, str] = {}
        self.sub_page: str | None = None
        self.purchase: RewardBreakdown | None = None

    # ---------------------------------------------------------------- what the shopper sees
    def clickables(self) -> dict[str, Clickable]:
        """Clickable label -> its kind, in page order."""
        button = Clickable("button")
        if self.page is Page.SEARCH:
            return {SEARCH_BUTTON: button}
        if self.page is Page.RESULTS:
            labels = {BACK_TO_SEARCH: button}
            if self.page_number > 1:
                labels[PREV_PAGE] = button
            if self.page_number * PRODUCTS_PER_PAGE < len(self.hits):
                labels[NEXT_PAGE] = button
            labels.update({asin.lower(): Clickable("product") for asin in self._page_hits()})
            return labels
        if self.page is Page.ITEM:
            labels = {BACK_TO_SEARCH: button, PREV_PAGE: button}
            labels.update({name: button for name in SUB_PAGES})
            labels[BUY_NOW] = button
            for name, values in self._product().options.items():
                labels.update({value: Clickable("option", name) for value in values})
            return labels
        if self.page is Page.ITEM_SUB:
            return {BACK_TO_SEARCH: button, PREV_PAGE: button}
        return {}

    def has_search_bar(self) -> bool:
        return self.page is Page.SEARCH

    def observation(self) -> str:
        """The page in WebShop's simple text mode."""
        header = ["Instruction:", self.goal.instruction_text]
        if self.page is Page.SEARCH:
            parts = ["WebShop", *header, "Search"]
        elif self.page is Page.RESULTS:
            parts = [*header, "Back to Search",
                     f"Page {self.page_number} (Total results: {len(self.hits)})"]
            if self.page_number > 1:
                parts.append("< Prev")
            if self.page_number * PRODUCTS_PER_PAGE < len(self.hits):
                parts.append("Next >")
            for asin in self._page_hits():
                product = self.shop.products[asin]
                parts += [asin, product.title, product.price_tag]
        elif self.page is Page.ITEM:
            product = self._product()
            parts = [*header, "Back to Search", "< Prev"]
            for name, values in product.options.items():
                parts += [name, *values]
            parts += [product.title, f"Price: {product.price_tag}", f"Rating: {product.rating}",
                      "Description", "Features", "Reviews", "Buy Now"]
        elif self.page is Page.ITEM_SUB:
            parts = [*header, "Back to Search", "< Prev", *self._sub_page_lines()]
        else:
            parts = ["Thank you for shopping with us!", "Purchased", "asin", str(self.asin),
                     "options", json.dumps(self.options, sort_keys=True),
                     "Your score (min 0.0, max 1.0)", f"{self.purchase.total:.4f}"]
        return SEP.join(part for part in parts if part)

    # ------------------------------------------------------------------------ what it does
    def execute(self, action: str) -> ActionOutcome:
        """Performs ``search[...]`` or ``click[...]``; anything else is a no-op with a reason."""
        if self.page is Page.DONE:
            return ActionOutcome(executed=False, done=True, error="the purchase is complete")
        verb, argument = parse_action(action)
        if verb == "search":
            if argument is None or not argument.strip():
                return ActionOutcome(executed=False, error="empty search query")
            self._search(argument.lower())
            return ActionOutcome(executed=True)
        if verb == "click" and argument is not None:
            label = argument.lower()
            clickable = self.clickables().get(label)
            if clickable is None or label == SEARCH_BUTTON:
                return ActionOutcome(executed=False,
                                     error=f"{label!r} is not clickable on this page")
            return self._click(label, clickable)
        return ActionOutcome(
            executed=False, error=f"not an action of the form search[...] or click[...]: "
                                  f"{action[:80]!r}")

    def _search(self, query: str) -> None:
        self.query = query
        self.hits = self.shop.search(query)
        self._show_results(page_number=1)

    def _show_results(self, page_number: int) -> None:
        self.page, self.page_number = Page.RESULTS, page_number
        self.asin, self.options, self.sub_page = None, {}, None

    def _click(self, label: str, clickable: Clickable) -> ActionOutcome:
        if label == BUY_NOW:
            self.purchase = purchase_reward(self._product(), self.goal,
                                            self.shop.prices[self.asin], self.options)
            self.page = Page.DONE
            return ActionOutcome(executed=True, done=True, purchase=self.purchase)
        if label == BACK_TO_SEARCH:
            self.page, self.query, self.hits = Page.SEARCH, None, []
            self.asin, self.options, self.sub_page = None, {}, None
        elif label == NEXT_PAGE:
            self._show_results(self.page_number + 1)
        elif label == PREV_PAGE and self.page is Page.RESULTS:
            self._show_results(self.page_number - 1)
        elif label == PREV_PAGE and self.page is Page.ITEM:
            self._show_results(self.page_number)
        elif label == PREV_PAGE:
            self.page, self.sub_page = Page.ITEM, None
        elif label in SUB_PAGES:
            self.page, self.sub_page = Page.ITEM_SUB, label
        elif clickable.kind == "product":
            self.page, self.asin = Page.ITEM, label.upper()
        else:
            self.page = Page.ITEM
            self.options[clickable.option_name] = label
        return ActionOutcome(executed=True)

    # ----------------------------------------------------------------------------- helpers
    def _page_hits(self) -> list[str]:
        start = (self.page_number - 1) * PRODUCTS_PER_PAGE
        return self.hits[start:start + PRODUCTS_PER_PAGE]

    def _product(self) -> Product:
        return self.shop.products[self.asin]

    def _sub_page_lines(self) -> list[str]:
        product = self._product()
        if self.sub_page == "description":
            return [product.description]
        if self.sub_page == "features":
            return list(product.bullet_points)
        return [text for review in product.reviews
                for text in (review.title, review.score, review.body)]
