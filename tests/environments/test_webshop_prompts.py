"""The WebShop step prompt: observation formatting, 2-step history, 13,000-character fallback."""
import pytest

from environments.prompts import render_agent_prompt
from environments.webshop.env import make_offline_webshop_env
from environments.webshop.prompts import (MAX_PROMPT_CHARS, format_observation, render_prompt)

TASK = "Find me a lamp, and price lower than 40.00 dollars"
SEARCH_PAGE = f"WebShop [SEP] Instruction: [SEP] {TASK} [SEP] Search"
RESULTS_PAGE = (f"Instruction: [SEP] {TASK} [SEP] Back to Search [SEP] Page 1 (Total results: 1)"
                " [SEP] B01 [SEP] Brass Lamp [SEP] $20.0")
ACTIONS = ("search[<your query>]", "click[search]")


def test_observation_drops_the_instruction_header_and_quotes_parts():
    assert format_observation(SEARCH_PAGE, TASK) == "'Search'"
    assert format_observation(RESULTS_PAGE, TASK) == (
        "'Back to Search' [SEP] 'Page 1 (Total results: 1)' [SEP] 'B01' [SEP] "
        "'Brass Lamp' [SEP] '$20.0'")
    assert format_observation("no header here", TASK) == "no header here"


def test_first_step_prompt_has_no_history():
    prompt = render_prompt(TASK, SEARCH_PAGE, ACTIONS)
    assert f"Your task is to: {TASK}." in prompt
    assert "Your current observation is: 'Search'." in prompt
    assert "[\n'search[<your query>]',\n'click[search]',\n]." in prompt
    assert "<think> </think>" in prompt and "<action> </action>" in prompt
    assert "Prior to this step" not in prompt


def test_history_shows_the_last_two_steps():
    history = [(SEARCH_PAGE, "search[lamp]"), (RESULTS_PAGE, "click[b01]"),
               (RESULTS_PAGE, "click[< prev]")]
    prompt = render_prompt(TASK, RESULTS_PAGE, ("click[b01]",), history)
    assert "you have already taken 3 step(s)" in prompt
    assert "the most recent 2 observations" in prompt
    assert "Action 1:" not in prompt
    assert "[Observation 2: ''Back to Search' [SEP] " in prompt
    assert "Action 2: 'click[b01]']" in prompt and "Action 3: 'click[< prev]']" in prompt
    assert "You are now at step 4 and your current observation is: 'Back to Search'" in prompt
    assert render_prompt(TASK, RESULTS_PAGE, ("click[b01]",), history, history_length=0) == \
        render_prompt(TASK, RESULTS_PAGE, ("click[b01]",))


def test_long_history_falls_back_to_the_no_history_prompt():
    long_page = f"Instruction: [SEP] {TASK} [SEP] " + "x" * 7000
    history = [(long_page, "click[a]"), (long_page, "click[b]")]
    prompt = render_prompt(TASK, RESULTS_PAGE, ("click[b01]",), history)
    assert prompt == render_prompt(TASK, RESULTS_PAGE, ("click[b01]",))
    assert len(prompt) <= MAX_PROMPT_CHARS
    short = render_prompt(TASK, RESULTS_PAGE, ("click[b01]",), history, max_chars=10**6)
    assert len(short) > MAX_PROMPT_CHARS and "Prior to this step" in short


def test_rejects_negative_history_length():
    with pytest.raises(ValueError, match="history_length must be >= 0"):
        render_prompt(TASK, SEARCH_PAGE, ACTIONS, history_length=-1)


def test_prompts_of_a_real_episode_stay_small():
    env = make_offline_webshop_env(split="test")
    observation = env.reset(task_id=0)
    history, lengths = [], []
    for action in (f"search[{observation.task}]", "click[next >]", "click[< prev]"):
        lengths.append(len(render_prompt(observation.task, observation.text,
                                         observation.admissible_actions, history)))
        result = env.step(f"<think>.</think><action>{action}</action>")
        history.append((observation.text, action))
        observation = result.observation
    assert max(lengths) < MAX_PROMPT_CHARS


def test_trainer_step_prompts_use_the_webshop_layout():
    env = make_offline_webshop_env(split="test")
    first = env.reset(task_id=0)
    action = f"search[{first.task}]"
    second = env.step(f"<think>t</think><action>{action}</action>").observation
    history = [(first.text, action)]
    assert render_agent_prompt(env.prompt_style, second, history, 2) == render_prompt(
        second.task, second.text, second.admissible_actions, history)
    compact = render_agent_prompt(env.prompt_style, second, history, 2, template="compact")
    assert compact.startswith("You are an expert shopping agent working in the WebShop online "
                              f"store. Your task is to: {second.task}\nStep 2.")
