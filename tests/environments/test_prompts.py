"""Agent prompt templates: exact renderings of hand-built cases."""
import pytest

from environments.base import Observation
from environments.prompts import (
    COMPACT_INSTRUCTIONS, INSTRUCTIONS, AgentPromptStyle, format_admissible_actions, format_history, render_agent_prompt,
)

ALF = AgentPromptStyle("You are an expert agent operating in the ALFRED Embodied Environment.", True)
GAME = AgentPromptStyle("You are an expert agent playing a game.", False)
OBS = Observation(text="You see a desk 1.", task="put a mug on the desk.",
                  admissible_actions=("go to desk 1", "help", "look"))


def test_first_step_task_in_observation():
    expected = (
        "You are an expert agent operating in the ALFRED Embodied Environment.\n"
        "Your current observation is: You see a desk 1.\n"
        "Your admissible actions of the current situation are: ['go to desk 1', 'look'].\n"
        "\n" + INSTRUCTIONS
    )
    assert render_agent_prompt(ALF, OBS) == expected


def test_first_step_task_line_when_observation_lacks_it():
    prompt = render_agent_prompt(GAME, OBS)
    assert prompt.startswith(
        "You are an expert agent playing a game.\nYour task is to: put a mug on the desk.\n"
        "Your current observation is: You see a desk 1.\n"
    )


def test_later_step_shows_last_two_pairs_numbered_globally():
    history = [("o1", "a1"), ("o2", "a2"), ("o3", "a3")]
    expected = (
        "You are an expert agent operating in the ALFRED Embodied Environment. "
        "Your task is to: put a mug on the desk.\n"
        "Prior to this step, you have already taken 3 step(s). Below are the most recent 2 "
        "observations and the corresponding actions you took: "
        "[Observation 2: 'o2', Action 2: 'a2']\n[Observation 3: 'o3', Action 3: 'a3']\n"
        "You are now at step 4 and your current observation is: You see a desk 1.\n"
        "Your admissible actions of the current situation are: ['go to desk 1', 'look'].\n"
        "\n" + INSTRUCTIONS
    )
    assert render_agent_prompt(ALF, OBS, history) == expected


def test_history_shorter_than_window():
    prompt = render_agent_prompt(GAME, OBS, [("o1", "a1")], history_length=2)
    assert "already taken 1 step(s). Below are the most recent 1 observations" in prompt
    assert "[Observation 1: 'o1', Action 1: 'a1']\nYou are now at step 2" in prompt


def test_format_helpers():
    assert format_admissible_actions(["help"]) == "[]"
    assert format_admissible_actions(["a b", "c"]) == "['a b', 'c']"
    assert format_history([("x", "1"), ("y", "2")], 1) == "[Observation 2: 'y', Action 2: '2']"
    assert format_history([("x", "1")], 0) == ""


def test_no_admissible_list_omits_the_line():
    obs = Observation(text="t", task="g", admissible_actions=None)
    assert "admissible actions of the current situation" not in render_agent_prompt(GAME, obs)
    assert "admissible actions of the current situation" not in render_agent_prompt(GAME, obs, [("o", "a")])


def test_compact_first_step():
    assert render_agent_prompt(ALF, OBS, template="compact") == (
        "You are an expert agent operating in the ALFRED Embodied Environment. "
        "Your task is to: put a mug on the desk.\n"
        "Observation: You see a desk 1.\n"
        "Admissible actions: ['go to desk 1', 'look'].\n" + COMPACT_INSTRUCTIONS
    )


def test_compact_later_step_shows_last_k_actions_only():
    history = [("o1", "a1"), ("o2", "a2"), ("o3", "a3")]
    assert render_agent_prompt(GAME, OBS, history, history_length=2, template="compact") == (
        "You are an expert agent playing a game. Your task is to: put a mug on the desk.\n"
        "Step 4. Your last 2 action(s): 'a2', 'a3'.\n"
        "Observation: You see a desk 1.\n"
        "Admissible actions: ['go to desk 1', 'look'].\n" + COMPACT_INSTRUCTIONS
    )
    no_history = render_agent_prompt(GAME, OBS, history, history_length=0, template="compact")
    assert "Step" not in no_history and "o3" not in no_history
    obs = Observation(text="t", task="g", admissible_actions=None)
    assert "Admissible" not in render_agent_prompt(GAME, obs, history, template="compact")


def test_bad_arguments():
    with pytest.raises(ValueError, match="template must be one of"):
        render_agent_prompt(GAME, OBS, template="short")
    with pytest.raises(ValueError, match="history_length"):
        render_agent_prompt(GAME, OBS, [], history_length=-1)
    with pytest.raises(ValueError, match=r"history\[1\]"):
        render_agent_prompt(GAME, OBS, [("o", "a"), ("only",)])
    with pytest.raises(ValueError, match="intro"):
        AgentPromptStyle("  ")
