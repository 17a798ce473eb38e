"""The adapter for WebShop's own data files, on hand-written fixtures in their format."""
import json
import os

import pytest

from environments.registry import make_env
from environments.webshop.adapter import (load_webshop_products, load_webshop_shop,
                                          make_webshop_env, make_webshop_env_from_files,
                                          parse_options, parse_pricing, webshop_data_files)
from environments.webshop.goals import NO_PRICE_LIMIT
from environments.webshop.policies import gold_action, react_response
from tests.environments.webshop_data import write_webshop_data_dir

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "webshop")
ITEMS = os.path.join(FIXTURES, "items_shuffle_fixture.json")
ATTRIBUTES = os.path.join(FIXTURES, "items_ins_fixture.json")
HUMAN = os.path.join(FIXTURES, "items_human_ins_fixture.json")
REVIEWS = os.path.join(FIXTURES, "reviews_fixture.json")


def act(action):
    return f"<think>t</think><action>{action}</action>"


@pytest.mark.parametrize("text, expected", [
    ("$12.99", ((12.99,), "$12.99")),
    ("$9.99$15.49", ((9.99, 15.49), "$9.99 to $15.49")),
    ("$1,005.00", ((1005.0,), "$1005.0")),
    ("", ((100.0,), "$100.0")),
    (None, ((100.0,), "$100.0")),
])
def test_parse_pricing(text, expected):
    assert parse_pricing(text) == expected


def test_parse_pricing_rejects_text_without_amount():
    with pytest.raises(ValueError, match="no '\\$' amount"):
        parse_pricing("call for price")


def test_parse_options():
    raw = {"Size": [{"value": " 8 Ounce ", "image": None}],
           "Scent": [{"value": "Lavender/Mint", "image": "u"}], "Style": None}
    assert parse_options(raw) == {"size": ("8 ounce",), "scent": ("lavender | mint",)}
    assert parse_options(None) == {}


def test_products_follow_webshop_loading_rules():
    products = load_webshop_products(ITEMS, ATTRIBUTES, reviews_path=REVIEWS)
    # 'nan', the repeated B000000001 and the 12-character asin are skipped.
    assert [p.asin for p in products] == ["B000000001", "B000000002", "B000000003", "B000000004"]
    scrub, coffee, shampoo, lipstick = products
    assert scrub.title == "Lumina Tea Tree Body Scrub with Natural Ingredients"
    assert scrub.query == "body scrub"                        # lower-cased and stripped
    assert scrub.options == {"size": ("8 ounce", "16 ounce"),
                             "scent": ("lavender | mint", "unscented")}
    assert scrub.instruction_attributes == ("tea tree", "natural ingredients")
    assert scrub.rating == "4.5" and scrub.reviews[0].score == "5"
    assert scrub.reviews[0].body == "Smells nice."
    assert coffee.bullet_points == ("Coffee grounds and coconut oil",)
    assert coffee.pricing == (9.99, 15.49) and coffee.instruction_text is None
    assert shampoo.pricing == (100.0,) and shampoo.reviews[0].body == "Does the job."
    assert lipstick.options == {"color": ("ruby red", "nude")}
    assert "sulfate free" in shampoo.search_document()
    assert len(load_webshop_products(ITEMS, ATTRIBUTES, num_products=2)) == 2


def test_synthetic_goals_from_files():
    shop = load_webshop_shop(ITEMS, ATTRIBUTES, seed=3)
    goals = sorted(shop.goals, key=lambda g: g.instruction_text)
    assert len(goals) == 4 + 1 + 2          # option combinations: 2x2, none, 2
    scrub = [g for g in goals if g.asin == "B000000001"]
    assert [g.goal_options for g in scrub] == [
        {"scent": "lavender | mint", "size": "16 ounce"},
        {"scent": "lavender | mint", "size": "8 ounce"},
        {"scent": "unscented", "size": "16 ounce"},
        {"scent": "unscented", "size": "8 ounce"}]
    limit = scrub[0].price_upper
    assert limit in (30.0, 40.0, 50.0)      # larger of two of [20, 30, 40, 50] above $12.99
    assert scrub[0].instruction_text == (
        "Find me scrubs & body treatments with tea tree, natural ingredients with scent: "
        f"lavender | mint, and size: 16 ounce, and price lower than {limit:.2f} dollars")
    assert all(g.weight == 0.25 for g in scrub)          # tea tree, natural ingredients: 4 each
    lipstick = [g for g in goals if g.asin == "B000000004"]
    assert {g.instruction_text for g in lipstick} == {
        "Find me long lasting lipstick with color: ruby red",
        "Find me long lasting lipstick with color: nude"}   # $1005: no price clause
    assert all(g.price_upper == NO_PRICE_LIMIT and g.weight == 0.5 for g in lipstick)
    shampoo = next(g for g in goals if g.asin == "B000000003")
    assert shampoo.goal_options == {} and shampoo.weight == 1.0
    assert shampoo.instruction_text.startswith("Find me sulfate free shampoo for dry hair, and")


def _play_gold(env, goal_index):
    env.reset(task_id=goal_index)
    goal = env.goal
    result = env.step(act(f"search[{goal.instruction_text}]"))
    while f"click[{goal.asin.lower()}]" not in result.observation.admissible_actions:
        result = env.step(act("click[next >]"))
    env.step(act(f"click[{goal.asin.lower()}]"))
    for value in goal.option_values():
        env.step(act(f"click[{value}]"))
    return env.step(act("click[buy now]"))


def test_gold_episodes_on_the_files_win():
    env = make_webshop_env_from_files(ITEMS, ATTRIBUTES, split="all")
    for goal_index in env.task_ids:
        result = _play_gold(env, goal_index)
        assert result.won and result.reward == 10.0 and result.info["task_score"] == 1.0


def test_human_goals_from_files():
    env = make_webshop_env_from_files(ITEMS, ATTRIBUTES, split="all", human_goals_path=HUMAN)
    goals = env.shop.goals
    assert len(goals) == 2                                  # the attribute-less one is skipped
    scrub = next(g for g in goals if g.asin == "B000000001")
    assert scrub.goal_options == ("16 ounce",)
    assert scrub.instruction_text.startswith("i want a tea tree body scrub in 16 ounce, and price")
    for goal_index in env.task_ids:
        result = _play_gold(env, goal_index)
        assert result.won and result.info["task_score"] == 1.0


def test_cheaper_wrong_product_scores_partially():
    env = make_webshop_env_from_files(ITEMS, ATTRIBUTES, split="all")
    goal_index = next(i for i, g in enumerate(env.shop.goals) if g.asin == "B000000003")
    env.reset(task_id=goal_index)
    env.step(act("search[coffee body scrub]"))
    env.step(act("click[b000000002]"))
    result = env.step(act("click[buy now]"))
    assert result.done and not result.won
    assert 0.0 <= result.info["task_score"] < 1.0


def test_missing_files_and_bad_records_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="product file not found: .*nope.json"):
        load_webshop_products(tmp_path / "nope.json", ATTRIBUTES)
    with pytest.raises(FileNotFoundError, match="attribute file not found"):
        load_webshop_products(ITEMS, tmp_path / "nope.json")
    bad = tmp_path / "items.json"
    bad.write_text(json.dumps([{"asin": "B1", "name": "x"}]))
    with pytest.raises(ValueError, match="'B1' lacks keys .*full_description"):
        load_webshop_products(bad, ATTRIBUTES)
    bad.write_text(json.dumps({"asin": "B1"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_webshop_products(bad, ATTRIBUTES)
    attributes = tmp_path / "ins.json"
    attributes.write_text(json.dumps({"B1": {"attributes": [], "instruction": "Find me x"}}))
    with pytest.raises(ValueError, match="'B1' has an instruction but no 'instruction_attributes'"):
        load_webshop_products(ITEMS, attributes)


# ------------------------------------------------------------- from config options (registry)
def test_registry_env_reads_the_data_dir_and_gold_wins(tmp_path):
    data_dir = write_webshop_data_dir(tmp_path / "data")
    env = make_env("webshop", split="test", seed=3, max_steps=15, data_dir=data_dir)
    assert len(env.shop.goals) == 520 and env.num_tasks == 500
    assert env.shop.products["B000000007"].title == "Lumina model7 Tea Tree Body Scrub"
    for goal_index in range(0, 500, 50):
        observation = env.reset(task_id=goal_index)
        assert "model" in observation.task
        while True:
            result = env.step(react_response(gold_action(env, observation)))
            observation = result.observation
            if result.done:
                break
        assert result.won and result.info["task_score"] == 1.0


def test_envs_of_one_run_share_one_shop():
    # The trainer builds one env per episode with seeds seed + i; a task id must name the same
    # goal in all of them (a group plays one task).
    envs = [make_env("webshop", split="train", seed=seed) for seed in range(3)]
    assert envs[0].shop is envs[1].shop is envs[2].shop
    assert len({env.reset(task_id=600).task for env in envs}) == 1
    assert make_env("webshop", shop_seed=1).shop is not envs[0].shop


def test_human_goals_from_the_data_dir(tmp_path):
    data_dir = write_webshop_data_dir(tmp_path / "data", human_goals=True)
    env = make_env("webshop", split="all", data_dir=data_dir, human_goals=True)
    assert sorted(goal.asin for goal in env.shop.goals) == ["B000000001", "B000000003"]
    assert env.shop.goals[0].instruction_text.startswith(("i want", "i need"))


def test_data_dir_files_and_errors(tmp_path):
    data_dir = write_webshop_data_dir(tmp_path / "data")
    files = webshop_data_files(data_dir)
    assert files == {"items": os.path.join(data_dir, "items_shuffle_1000.json"),
                     "attributes": os.path.join(data_dir, "items_ins_v2_1000.json"),
                     "human_goals": None, "reviews": None}
    with open(os.path.join(data_dir, "reviews.json"), "w") as f:
        json.dump([], f)
    assert webshop_data_files(data_dir)["reviews"] == os.path.join(data_dir, "reviews.json")
    with pytest.raises(FileNotFoundError, match="lacks items_shuffle.json, items_ins_v2.json"):
        webshop_data_files(data_dir, product_set="all")
    with pytest.raises(FileNotFoundError, match="lacks items_human_ins.json"):
        webshop_data_files(data_dir, human_goals=True)
    with pytest.raises(FileNotFoundError, match="is not a directory.*items_shuffle_1000.json"):
        webshop_data_files(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="product_set = '100' must be one of"):
        webshop_data_files(data_dir, product_set="100")
    with pytest.raises(ValueError, match="set data_dir"):
        make_webshop_env(human_goals=True)
