"""The offline WebShop env: full episodes (gold and random policies), bad input, protocol."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from environments.base import Env, Observation
from environments.webshop.catalog import generate_catalog
from environments.webshop.env import (DEFAULT_ATTRIBUTE_FILE, MAX_STEPS, WebShopEnv,
                                      load_offline_shop, make_offline_webshop_env)
from environments.webshop.goals import load_attribute_file
from environments.webshop.policies import measure_throughput, random_action, react_response


def act(action: str) -> str:
    return f"<think>plan</think><action>{action}</action>"


def play_gold(env: WebShopEnv, goal_index: int):
    """Search with the instruction, page to the target, click it, choose the goal options, buy."""
    env.reset(task_id=goal_index)
    goal = env.goal
    result = env.step(act(f"search[{goal.instruction_text}]"))
    target = f"click[{goal.asin.lower()}]"
    while target not in result.observation.admissible_actions:
        assert "click[next >]" in result.observation.admissible_actions, "target not in top 50"
        result = env.step(act("click[next >]"))
    result = env.step(act(target))
    for value in goal.option_values():
        result = env.step(act(f"click[{value}]"))
    steps_before_buy = result.info["step"]
    return env.step(act("click[buy now]")), steps_before_buy


@pytest.fixture(scope="module")
def test_env():
    return make_offline_webshop_env(split="test")


def test_env_satisfies_protocol(test_env):
    assert isinstance(test_env, Env)
    assert test_env.max_steps == MAX_STEPS == 15


def test_gold_policy_wins_every_test_goal(test_env):
    for goal_index in test_env.task_ids:
        result, _ = play_gold(test_env, goal_index)
        assert result.done and result.won, (goal_index, result.info)
        assert result.reward == 10.0
        assert result.info["task_score"] == 1.0
        assert result.action_valid


def test_gold_policy_wins_train_goals():
    env = make_offline_webshop_env(split="train")
    for goal_index in list(env.task_ids)[::10]:
        result, _ = play_gold(env, goal_index)
        assert result.won and result.reward == 10.0 and result.info["task_score"] == 1.0


def test_splits_follow_verl_agent(test_env):
    shop = load_offline_shop()
    train = make_offline_webshop_env(split="train")
    assert test_env.task_ids == range(500)
    assert train.task_ids == range(500, len(shop.goals))
    with pytest.raises(ValueError, match="task_id 500 is not in the 'test' split"):
        test_env.reset(task_id=500)
    with pytest.raises(ValueError, match="split must be one of"):
        make_offline_webshop_env(split="dev")


def test_random_policy_fails():
    env = make_offline_webshop_env(split="test")
    rng = random.Random(0)
    wins, scores = 0, []
    for episode in range(150):
        observation = env.reset(seed=episode)
        while True:
            result = env.step(react_response(random_action(observation, rng)))
            observation = result.observation
            if result.done:
                break
        wins += result.won
        scores.append(result.info["task_score"])
    assert wins == 0
    assert sum(scores) / len(scores) < 0.3


def test_scripted_policies_and_throughput_measurement():
    gold = measure_throughput(num_episodes=20, policy="gold")
    assert gold["success_rate"] == 1.0 and gold["mean_task_score"] == 1.0
    assert gold["steps"] <= 20 * MAX_STEPS and gold["steps_per_second"] > 0
    random_run = measure_throughput(num_episodes=20, policy="random")
    assert random_run["success_rate"] == 0.0
    with pytest.raises(ValueError, match="policy must be 'random' or 'gold'"):
        measure_throughput(policy="expert")


def test_wrong_option_purchase_is_partial_and_not_a_win(test_env):
    goal_index = next(i for i in test_env.task_ids
                      if len(load_offline_shop().goals[i].option_values()) >= 1)
    env = test_env
    env.reset(task_id=goal_index)
    goal = env.goal
    product = load_offline_shop().products[goal.asin]
    name, wanted = next(iter(goal.goal_options.items()))
    wrong = next(v for v in product.options[name] if v != wanted)
    result = env.step(act(f"search[{goal.instruction_text}]"))
    while f"click[{goal.asin.lower()}]" not in result.observation.admissible_actions:
        result = env.step(act("click[next >]"))
    env.step(act(f"click[{goal.asin.lower()}]"))
    for option_name, value in goal.goal_options.items():
        env.step(act(f"click[{wrong if option_name == name else value}]"))
    result = env.step(act("click[buy now]"))
    n = len(goal.attributes) + len(goal.goal_options) + 1
    assert result.done and not result.won and result.reward == 0.0
    assert result.info["task_score"] == pytest.approx((n - 1) / n)


def test_step_limit_ends_the_episode(test_env):
    observation = test_env.reset(task_id=0)
    for step in range(1, MAX_STEPS + 1):
        result = test_env.step(act("click[search]"))       # a no-op every time
        assert result.done == (step == MAX_STEPS)
        assert not result.won and result.reward == 0.0
        assert result.observation.text == observation.text  # page unchanged
    with pytest.raises(RuntimeError, match="call reset"):
        test_env.step(act("click[search]"))


@pytest.mark.parametrize("response, valid, executed", [
    (act("click[b0000nosuch]"), True, False),                # unknown product
    (act("click[buy now]"), True, False),                    # not clickable on the search page
    (act("click[search]"), True, False),                     # WebShop ignores click[search]
    (act("search[]"), True, False),                          # malformed: empty query
    (act("jump[now]"), True, False),                         # unknown verb
    ("<action>search[lamp]</action>", False, True),          # no <think>: invalid, still executed
    ("I think I should look for lamps", False, False),       # no tags: last 30 chars, no verb
    ("<think>我</think><action>search[lamp]</action>", False, True),   # CJK: invalid
])
def test_bad_input_is_flagged_or_a_no_op(test_env, response, valid, executed):
    first = test_env.reset(task_id=1)
    result = test_env.step(response)
    assert result.action_valid is valid
    assert result.info["action_executed"] is executed
    assert not result.done and result.reward == 0.0
    if not executed:
        assert result.observation == first
        assert result.info["error"]


def test_observations_and_actions_follow_webshop_text_mode(test_env):
    observation = test_env.reset(task_id=2)
    goal = test_env.goal
    assert observation.text == (
        f"WebShop [SEP] Instruction: [SEP] {goal.instruction_text} [SEP] Search")
    assert observation.task == goal.instruction_text
    assert observation.admissible_actions == ("search[<your query>]", "click[search]")
    results = test_env.step(act(f"search[{goal.instruction_text}]")).observation
    parts = results.text.split(" [SEP] ")
    assert parts[:5] == ["Instruction:", goal.instruction_text, "Back to Search",
                         "Page 1 (Total results: 50)", "Next >"]
    assert results.admissible_actions[:2] == ("click[back to search]", "click[next >]")
    assert len(results.admissible_actions) == 12             # 2 buttons + 10 products
    page2 = test_env.step(act("click[next >]")).observation
    assert "Page 2 (Total results: 50)" in page2.text
    assert "click[< prev]" in page2.admissible_actions
    first_product = page2.admissible_actions[3]
    item = test_env.step(act(first_product)).observation
    assert item.admissible_actions[:6] == (
        "click[back to search]", "click[< prev]", "click[description]", "click[features]",
        "click[reviews]", "click[buy now]")
    assert item.text.endswith("Description [SEP] Features [SEP] Reviews [SEP] Buy Now")
    sub = test_env.step(act("click[features]")).observation
    assert sub.admissible_actions == ("click[back to search]", "click[< prev]")
    assert test_env.step(act("click[< prev]")).observation.text == item.text
    back = test_env.step(act("click[< prev]")).observation
    assert back.text == page2.text                            # item -> its results page
    assert test_env.step(act("click[back to search]")).observation == observation


def test_search_works_from_any_page_as_in_webshop(test_env):
    test_env.reset(task_id=3)
    results = test_env.step(act("search[lamp]")).observation
    test_env.step(act(results.admissible_actions[2]))
    again = test_env.step(act("search[lamp]"))
    assert again.info["action_executed"] and again.observation.text == results.text


def test_reset_draws_are_seeded(test_env):
    drawn = [test_env.reset(seed=s).task for s in range(5)]
    assert drawn == [test_env.reset(seed=s).task for s in range(5)]
    assert test_env.reset(task_id="7").task == load_offline_shop().goals[7].instruction_text


def test_generated_pages_are_deterministic_per_seed():
    entries = load_attribute_file(DEFAULT_ATTRIBUTE_FILE)
    first, again, other = (generate_catalog(entries, 0), generate_catalog(entries, 0),
                           generate_catalog(entries, 1))
    assert first == again
    assert first != other
    assert [p.asin for p in first] == list(entries)          # one page per real asin
    assert [p.attributes for p in first] == [tuple(e["attributes"]) or ("DUMMY_ATTR",)
                                             for e in entries.values()]


def test_generated_options_are_distinguishable():
    from environments.webshop.text_match import fuzzy_match
    for product in load_offline_shop().products.values():
        values = [v for values in product.options.values() for v in values]
        page = " ".join((product.title, product.description) + product.bullet_points).lower()
        for i, value in enumerate(values):
            assert value not in page
            assert not any(fuzzy_match(value, other) for other in values[i + 1:])


def test_real_goals_are_used():
    entries = load_attribute_file(DEFAULT_ATTRIBUTE_FILE)
    goals = load_offline_shop().goals
    instructed = {asin for asin, e in entries.items() if "instruction" in e}
    assert {g.asin for g in goals} == instructed and len(instructed) == 415
    for goal in goals[:50]:
        entry = entries[goal.asin]
        assert goal.instruction_text.startswith(entry["instruction"])
        assert goal.attributes == tuple(entry["instruction_attributes"])


_RESPONSES = st.one_of(
    st.text(max_size=200),
    st.builds(lambda a: act(a), st.text(max_size=60)),
    st.builds(lambda verb, arg: act(f"{verb}[{arg}]"),
              st.sampled_from(["click", "search", "Click", "buy", ""]),
              st.text(max_size=40)),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(responses=st.lists(_RESPONSES, min_size=1, max_size=20))
def test_fuzzed_steps_never_raise(test_env, responses):
    observation = test_env.reset(task_id=4)
    for response in responses:
        result = test_env.step(response)
        assert isinstance(result.observation, Observation)
        assert result.reward in (0.0, 10.0)
        assert 0.0 <= result.info["task_score"]
        if result.done:
            break
        if not result.info["action_executed"]:
            assert result.observation == observation
        observation = result.observation
