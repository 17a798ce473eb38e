"""WebShop's native reward and its string matching, on hand-computed cases."""
import random

import pytest

from environments.webshop.products import Goal, Product
from environments.webshop.reward import purchase_reward, type_reward
from environments.webshop.text_match import (normalize_color, ratio, title_nouns,
                                             token_set_ratio)


# ------------------------------------------------------------------------- token_set_ratio
@pytest.mark.parametrize("a, b, expected", [
    # tokens {8, ounce} vs {16, ounce}: common "ounce" (5 chars), "ounce 8" (7), "ounce 16" (8):
    # max(2*5/12, 2*5/13, 2*LCS("ounce 8","ounce 16")=2*6/15) = 83.3 -> 83.
    ("8 ounce", "16 ounce", 83),
    # common "of pack" (7), "of pack 3" (9): 2*7/16 = 87.5 -> 88 (a fuzzy match at > 85).
    ("pack of 3", "pack of 12", 88),
    ("sea salt", "sea salt & vinegar", 100),    # one difference empty -> 100
    ("Tea Tree", "tea tree oil", 100),          # case and subset
    ("gluten free", "gluten-free", 100),        # punctuation becomes a space
    # no common token: 2*LCS("machine","hand")/(7+4)... on "machine wash" / "hand wash":
    # common "wash" (4), "wash machine" (12), "wash hand" (9): max(8/16, 8/13, 2*7/21) = 66.7
    ("machine wash", "hand wash", 67),
    ("black", "white", 0),
    ("", "black", 0),                           # an empty side scores 0
])
def test_token_set_ratio_hand_cases(a, b, expected):
    assert token_set_ratio(a, b) == expected
    assert token_set_ratio(b, a) == expected


def test_ratio_is_indel_similarity():
    assert ratio("abc", "abc") == 100
    assert ratio("abcd", "abce") == 75            # LCS 3: 2*3/8
    assert ratio("", "") == 100


def test_normalize_color_and_nouns():
    assert normalize_color("navy blue") == "blue"  # vocabulary order: blue before navy
    assert normalize_color("dark black matte") == "black"
    assert normalize_color("unscented") == "unscented"
    assert title_nouns("Lumina Tea Tree Body Scrub, 8 oz (Pack of 2)") == [
        "lumina", "tea", "tree", "body", "scrub", "oz"]


# --------------------------------------------------------------------------------- reward
def _product(**overrides):
    fields = dict(
        asin="B000000001", title="Lumina Tea Tree Body Scrub", query="body scrub",
        category="beauty", product_category="Beauty › Skin Care › Body Scrubs",
        description="An exfoliating scrub.", bullet_points=("Gentle on skin",), reviews=(),
        rating="N.A.", pricing=(20.0,), price_tag="$20.0",
        options={"size": ("8 ounce", "16 ounce"), "scent": ("lavender", "unscented")},
        attributes=("tea tree", "natural ingredients", "paraben free"))
    fields.update(overrides)
    return Product(**fields)


def _goal(**overrides):
    fields = dict(
        asin="B000000001", instruction_text="...", attributes=("tea tree", "natural ingredients"),
        goal_options={"scent": "lavender", "size": "16 ounce"}, price_upper=30.0,
        query="body scrub", category="beauty",
        product_category="Beauty › Skin Care › Body Scrubs", name="Lumina Tea Tree Body Scrub")
    fields.update(overrides)
    return Goal(**fields)


EXACT = {"scent": "lavender", "size": "16 ounce"}


def test_exact_purchase_scores_one():
    result = purchase_reward(_product(), _goal(), price=20.0, chosen_options=EXACT)
    assert result.total == 1.0
    assert (result.r_type, result.r_att, result.r_option, result.r_price) == (1.0, 1.0, 1.0, True)


def test_wrong_option_loses_one_share():
    # 2 attributes + 2 options + price = 5 shares; the size is wrong (exact match required).
    result = purchase_reward(_product(), _goal(), 20.0, {"scent": "lavender", "size": "8 ounce"})
    assert result.num_option_matches == 1
    assert result.total == pytest.approx(4 / 5)


def test_missing_option_choice_loses_its_share():
    result = purchase_reward(_product(), _goal(), 20.0, {"size": "16 ounce"})
    assert result.total == pytest.approx(4 / 5)


def test_price_over_limit_loses_the_price_share():
    result = purchase_reward(_product(), _goal(), price=30.01, chosen_options=EXACT)
    assert result.r_price is False
    assert result.total == pytest.approx(4 / 5)
    at_limit = purchase_reward(_product(), _goal(), price=30.0, chosen_options=EXACT)
    assert at_limit.total == 1.0                    # price <= limit passes


def test_partially_matching_attributes():
    # Goal asks 4 attributes; the product has 2 of them (one via fuzzy match "tea tree oil").
    goal = _goal(attributes=("tea tree", "natural ingredients", "cruelty free", "vegan"),
                 goal_options={})
    product = _product(attributes=("tea tree oil", "natural ingredients"))
    result = purchase_reward(product, goal, price=20.0, chosen_options={})
    assert result.num_attr_matches == 2
    assert result.total == pytest.approx((2 + 0 + 1) / (4 + 0 + 1))


def test_attribute_found_in_page_text_counts():
    goal = _goal(attributes=("gentle on skin",), goal_options={})
    result = purchase_reward(_product(), goal, price=20.0, chosen_options={})
    assert result.num_attr_matches == 1 and result.total == 1.0


def test_non_size_options_match_fuzzily_and_size_exactly():
    goal = _goal(goal_options={"flavor name": "sea salt"}, attributes=("tea tree",))
    product = _product(options={"flavor name": ("sea salt & vinegar", "honey")})
    fuzzy = purchase_reward(product, goal, 20.0, {"flavor name": "sea salt & vinegar"})
    assert fuzzy.num_option_matches == 1            # token-set ratio 100
    goal = _goal(goal_options={"size": "large"}, attributes=("tea tree",))
    product = _product(options={"size": ("x-large", "large")})
    exact = purchase_reward(product, goal, 20.0, {"size": "x-large"})
    assert exact.num_option_matches == 0            # fuzzy 100, but size needs equality


def test_option_mentioned_in_title_counts_even_if_not_wanted():
    product = _product(title="Lumina Tea Tree Body Scrub 8 Ounce")
    result = purchase_reward(product, _goal(), 20.0, {"scent": "lavender", "size": "8 ounce"})
    assert result.num_option_matches == 2 and result.total == 1.0   # WebShop behaves so


def test_colour_normalisation_in_options():
    goal = _goal(goal_options={"color": "navy blue"}, attributes=("tea tree",))
    product = _product(options={"color": ("blue", "red")})
    result = purchase_reward(product, goal, 20.0, {"color": "blue"})
    assert result.num_option_matches == 1


def test_type_reward_levels():
    goal = _goal()
    # same query -> 1.0
    assert type_reward(_product(), goal)[0] == 1.0
    # different query and category, title shares 1 of 5 goal nouns (0.2, not > 0.2) -> 0.5
    other = _product(query="shampoo", product_category="Beauty › Hair › Shampoo",
                     title="Aqua Body Wash Gel")
    r_type, query_match, category_match, title_score = type_reward(other, goal)
    assert (query_match, category_match, title_score, r_type) == (False, False, 0.2, 0.5)
    # category shares 2 levels ("Beauty", "Skin Care") -> match even with a weak title
    sibling = _product(query="lotion", product_category="Beauty › Skin Care › Lotions",
                       title="Aqua Body Lotion")
    assert type_reward(sibling, goal)[0] == 1.0
    # no shared noun -> 0
    unrelated = _product(query="lamp", product_category="Home › Lighting", title="Brass Lamp")
    assert type_reward(unrelated, goal)[0] == 0.0
    # 1 of 11 nouns shared: title score < 0.1 -> 0.1 even with the same query
    long_goal = _goal(name="Lumina Tea Tree Body Scrub Jar Lid Spoon Box Bag Gift")
    assert type_reward(_product(title="Gift"), long_goal)[0] == 0.1


def test_type_mismatch_scales_the_total():
    unrelated = _product(query="lamp", product_category="Home › Lighting", title="Brass Lamp")
    assert purchase_reward(unrelated, _goal(), 20.0, EXACT).total == 0.0


def test_token_set_ratio_matches_rapidfuzz_when_available():
    fuzz = pytest.importorskip("rapidfuzz.fuzz")
    utils = pytest.importorskip("rapidfuzz.utils")
    words = ["sea", "salt", "pack", "of", "3", "12", "black", "rose", "gold", "8", "ounce",
             "fl", "oz", "easy", "clean", "x-large", "large", "navy", "blue", "a"]
    rng = random.Random(0)
    for _ in range(2000):
        a = " ".join(rng.choices(words, k=rng.randint(0, 4)))
        b = " ".join(rng.choices(words, k=rng.randint(0, 4)))
        expected = int(round(fuzz.token_set_ratio(a, b, processor=utils.default_process)))
        assert token_set_ratio(a, b) == expected, (a, b)
