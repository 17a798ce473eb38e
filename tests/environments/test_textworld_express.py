"""TextWorldExpress environment: gold and random episodes, flags, folds, bad input, fuzzing."""
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("textworld_express", reason="textworld-express is not installed")
if shutil.which("java") is None:
    pytest.skip("TextWorldExpress needs a Java runtime on PATH", allow_module_level=True)

from environments import textworld_express as twx  # noqa: E402
from environments.base import Env  # noqa: E402
from environments.react import parse_react_action  # noqa: E402


def react(action: str) -> str:
    return f"<think>plan</think><action>{action}</action>"


@pytest.fixture(scope="module")
def twc():
    env = twx.TextWorldExpressEnv("twc", split="train", max_steps=50)
    yield env
    env.close()


def play_gold(env, task_id):
    """Plays the gold sequence until the episode ends (twc's ends with a move after the win)."""
    obs = env.reset(task_id)
    results = []
    for action in env.gold_actions():
        results.append(env.step(react(action)))
        if results[-1].done:
            break
    return obs, env.gold_actions(), results


@pytest.mark.parametrize("game", twx.GAMES)
def test_gold_policy_wins_every_game(game):
    env = twx.TextWorldExpressEnv(game, split="test", max_steps=200)
    assert isinstance(env, Env)
    for task_id in (0, 7):
        obs, gold, results = play_gold(env, task_id)
        assert obs.admissible_actions and obs.task and obs.text
        n = len(results)
        assert n >= len(gold) - 1
        assert [r.done for r in results] == [False] * (n - 1) + [True]
        assert [r.reward for r in results] == [0.0] * (n - 1) + [10.0]
        last = results[-1]
        assert last.won and last.action_valid and not last.info["truncated"]
        assert last.info["task_score"] == pytest.approx(1.0)
        assert last.info["steps"] == n
        assert all(not r.won for r in results[:-1])
    env.close()


def test_reward_scale_and_step_limit_defaults(twc):
    assert twc.max_steps == 50 and twc.reward_scale == 10.0
    env = twx.TextWorldExpressEnv("coin", reward_scale=1.0)
    env.reset(3)
    assert sum(r.reward for r in play_gold(env, 3)[2]) == 1.0


def test_random_policy_fails_at_step_limit():
    env = twx.TextWorldExpressEnv("cookingworld", max_steps=20)
    rng = np.random.default_rng(0)
    for task_id in range(3):
        obs = env.reset(task_id)
        for step in range(1, 21):
            result = env.step(react(str(rng.choice(obs.admissible_actions))))
            obs = result.observation
            if result.done:
                break
        assert result.done and not result.won and result.reward == 0.0
        assert step == 20 and result.info["truncated"] and not result.info["task_failed"]
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step(react("look around"))


def test_game_declared_failure_ends_episode():
    env = twx.TextWorldExpressEnv("simonsays")
    env.reset(0)
    wrong = next(a for a in env.reset(0).admissible_actions if a != env.gold_actions()[0])
    result = env.step(react(wrong))
    assert result.done and not result.won and result.info["task_failed"]
    assert result.reward == 0.0 and not result.info["truncated"]


def test_invalid_action_is_executed_and_flagged():
    flagged = twx.TextWorldExpressEnv("twc")
    clean = twx.TextWorldExpressEnv("twc")
    flagged.reset(5)
    clean.reset(5)
    action = clean.gold_actions()[1]
    bad = flagged.step(f"<action>{action}</action>")  # no <think>: malformed, still executed
    good = clean.step(react(action))
    assert not bad.action_valid and good.action_valid
    assert bad.info["error"] and good.info["error"] is None
    assert bad.observation == good.observation
    garbage = flagged.step("no tags at all")
    assert not garbage.action_valid and garbage.info["action"] == "no tags at all"[-30:]
    assert not garbage.done


def test_folds_are_disjoint_and_tasks_reproducible():
    seeds = {}
    for split in twx.SPLITS:
        env = twx.TextWorldExpressEnv("twc", split=split)
        env.reset(0)
        seeds[split] = set(env.fold_seeds)
        first = env.reset(seed=11)
        task_id = env.step(react("look around")).info["task_id"]
        again = env.reset(seed=11)
        assert first == again and env.reset(task_id) == first
        assert env.num_tasks == 1000
    assert not (seeds["train"] & seeds["dev"]) and not (seeds["dev"] & seeds["test"])
    assert not (seeds["train"] & seeds["test"])


def test_small_game_params_are_applied():
    env = twx.TextWorldExpressEnv("cookingworld", game_params=twx.SMALL_GAME_PARAMS["cookingworld"])
    env.reset(0)
    props = env.generation_properties()
    for key, value in twx.SMALL_GAME_PARAMS["cookingworld"].items():
        assert props[key] == value
    assert len(env.gold_actions()) < 20
    twc_small = twx.TextWorldExpressEnv("twc", game_params={"numLocations": 1, "numItemsToPutAway": 1})
    twc_small.reset(0)
    assert twc_small.generation_properties()["numItemsToPutAway"] == 1


def test_simulators_in_one_jvm_are_independent():
    """Interleaving two envs gives the same episodes as running them one after the other.

    (TWX's gold path for a seed varies between calls, so both runs replay one fixed sequence.)
    """
    def solo(game, task_id):
        env = twx.TextWorldExpressEnv(game)
        obs, _, results = play_gold(env, task_id)
        return [r.info["action"] for r in results], [obs] + [r.observation for r in results]

    actions_a, solo_a = solo("twc", 2)
    actions_b, solo_b = solo("coin", 4)
    env_a, env_b = twx.TextWorldExpressEnv("twc"), twx.TextWorldExpressEnv("coin")
    inter_a, inter_b = [env_a.reset(2)], [env_b.reset(4)]
    for i in range(max(len(actions_a), len(actions_b))):
        if i < len(actions_a):
            inter_a.append(env_a.step(react(actions_a[i])).observation)
        if i < len(actions_b):
            inter_b.append(env_b.step(react(actions_b[i])).observation)
    assert inter_a == solo_a and inter_b == solo_b


def test_bad_input_gives_clear_errors(twc):
    with pytest.raises(ValueError, match="unknown TextWorldExpress game 'zork'"):
        twx.TextWorldExpressEnv("zork")
    with pytest.raises(ValueError, match="unknown TextWorldExpress split 'valid'"):
        twx.TextWorldExpressEnv("twc", split="valid")
    with pytest.raises(ValueError, match="max_steps"):
        twx.TextWorldExpressEnv("twc", max_steps=0)
    with pytest.raises(ValueError, match=r"game_params .*numIngredients"):
        twx.TextWorldExpressEnv("twc", game_params={"numIngredients": 2})
    with pytest.raises(ValueError, match=r"game_params\['numLocations'\] must be an int"):
        twx.TextWorldExpressEnv("twc", game_params={"numLocations": "abc"})
    with pytest.raises(TypeError, match="game_params must be a mapping"):
        twx.TextWorldExpressEnv("twc", game_params="numLocations=2")
    with pytest.raises(ValueError, match="game_params.*less than"):
        twx.TextWorldExpressEnv("twc", game_params={"numLocations": 100})
    with pytest.raises(IndexError, match=r"task_id 1000 out of range .*0\.\.999"):
        twc.reset(1000)
    with pytest.raises(IndexError, match="task_id -1"):
        twc.reset(-1)
    with pytest.raises(TypeError, match="task_id"):
        twc.reset("3")
    with pytest.raises(ValueError, match="either task_id or seed"):
        twc.reset(1, seed=2)
    fresh = twx.TextWorldExpressEnv("coin")
    with pytest.raises(RuntimeError, match="before reset"):
        fresh.step(react("look around"))
    with pytest.raises(RuntimeError, match="reset"):
        fresh.gold_actions()
    fresh.close()
    with pytest.raises(RuntimeError, match="closed"):
        fresh.reset(0)


def test_gold_actions_need_generation():
    env = twx.TextWorldExpressEnv("coin", generate_gold=False)
    env.reset(0)
    with pytest.raises(RuntimeError, match="generate_gold=True"):
        env.gold_actions()


def test_actions_match_admissible_spelling_up_to_case():
    env = twx.TextWorldExpressEnv("twc", split="train")
    for task_id in range(200):
        obs = env.reset(task_id)
        mixed = [a for a in obs.admissible_actions if a != a.lower()]
        if mixed:
            break
    else:
        pytest.fail("no twc task with a mixed-case action in the first 200")
    result = env.step(react(mixed[0]))  # projected to lower case
    assert result.info["action"] == mixed[0]
    assert "Unknown action" not in result.observation.text


def test_sanitize_action():
    assert twx.sanitize_action("take \ud800") == "take ?"
    assert len(twx.sanitize_action("x" * 10_000)) == twx.MAX_ACTION_CHARS


_pieces = st.sampled_from(["<think>", "</think>", "<action>", "</action>", "look around", "\ud800", "\x00", "\n", "思"])
_responses = st.one_of(
    st.lists(st.one_of(st.text(max_size=30), _pieces), max_size=10).map("".join),
    st.integers(0, 50_000).map(lambda n: "<think>a</think><action>" + "é" * n + "</action>"),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(response=_responses)
def test_step_never_raises_on_arbitrary_text(twc, response):
    twc.reset(0)
    result = twc.step(response)
    assert result.action_valid == parse_react_action(response).valid
    assert isinstance(result.observation.text, str) and result.reward in (0.0, 10.0)


def test_registry_builds_and_rejects():
    from environments.registry import env_names, make_env

    assert {"textworld_express", "alfworld"} <= set(env_names())
    env = make_env("textworld_express", game="coin", split="dev", max_steps=7)
    assert isinstance(env, twx.TextWorldExpressEnv) and env.max_steps == 7 and env.split == "dev"
    env.close()
    with pytest.raises(ValueError, match="unknown environment 'nethack'.*textworld_express"):
        make_env("nethack")
    with pytest.raises(TypeError, match="bad options for environment 'textworld_express'.*game_params"):
        make_env("textworld_express", num_locations=2)


def test_closing_envs_after_their_jvm_died_is_silent(capfd, caplog):
    """Ctrl-C in a terminal stops the JVM too; closing the envs then (or at exit) must neither
    raise nor log a connection-error traceback per env."""
    jvm = twx.TextWorldExpressJVM()
    envs = [twx.TextWorldExpressEnv("coin", split="train", max_steps=5, jvm=jvm) for _ in range(3)]
    envs[0].reset(0)
    process = jvm._gateway.java_process
    process.kill()
    process.wait(timeout=10)
    assert not jvm.running()
    for env in envs:
        env.close()
    jvm.close()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage() for r in caplog.records]
