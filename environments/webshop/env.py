"""The WebShop environment behind the ``environments.base.Env`` protocol.

One episode = one goal. ``reset`` opens the search page; every ``step`` projects the model's
response with the ReAct projection (``environments.react.parse_react_action``), executes the
projected action on the page engine (even when the response was malformed: WebShop then usually
does nothing) and reports:

* ``reward``: verl-agent's redefinition, ``10`` if the episode ended with a purchase whose native
  WebShop score is exactly 1.0, else ``0``;
* ``done``: a purchase was made, or ``max_steps`` (15) steps were taken;
* ``won``: done with native score 1.0;
* ``action_valid``: the response was well-formed (``<think>`` and ``<action>`` tags, no CJK) —
  the flag of the invalid-action penalty, as in the reference;
* ``info``: ``task_score`` (native score, 0 until a purchase), ``action`` (projected),
  ``action_executed`` (False for a no-op: unknown verb, label not clickable, empty query),
  ``error`` (why, if anything went wrong), ``available_actions``, ``goal_index``, and on
  purchase ``purchased_asin``, ``purchased_options`` and ``reward_breakdown``.

Observation.text is the raw page text (GiGPO's anchor); Observation.task the instruction;
admissible actions are ``search[<your query>]`` when the page has a search bar plus
``click[<label>]`` per clickable (verl-agent's list).

Two catalogues serve it: ``make_offline_webshop_env`` (real goals and attributes of the
1000-product setting, GENERATED pages, see ``catalog``), and ``adapter.make_webshop_env_from_files``
(WebShop's own data files); ``adapter.make_webshop_env`` picks one from config options. Step
prompts: ``prompts.PROMPT_STYLE`` (verl-agent's WebShop layout). Splits follow verl-agent: ``test`` = goals 0-499 of WebShop's
shuffled goal list, ``train`` = the rest.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import random

from environments.base import Observation, StepResult
from environments.react import parse_react_action
from environments.webshop.catalog import generate_catalog
from environments.webshop.engine import Shop, ShopSession
from environments.webshop.goals import (draw_purchase_prices, load_attribute_file,
                                        shuffle_goals, split_goal_indices, synthetic_goals)
from environments.webshop.prompts import PROMPT_STYLE

MAX_STEPS = 15
SUCCESS_REWARD = 10.0
SEARCH_ACTION = "search[<your query>]"
DEFAULT_ATTRIBUTE_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "data", "webshop", "items_ins_v2_1000.json")


def available_actions(session: ShopSession) -> tuple[str, ...]:
    """verl-agent's action list: the search template (if a search bar exists) + clicks."""
    actions = [SEARCH_ACTION] if session.has_search_bar() else []
    actions += [f"click[{label}]" for label in session.clickables()]
    return tuple(actions)


class WebShopEnv:
    """WebShop on a ``Shop`` (see module docstring)."""

    name = "webshop"
    domain = "agent"
    prompt_style = PROMPT_STYLE

    def __init__(self, shop: Shop, split: str = "train", max_steps: int = MAX_STEPS,
                 seed: int = 0):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.shop = shop
        self.split = split
        self.task_ids = split_goal_indices(len(shop.goals), split)
        if not self.task_ids:
            raise ValueError(f"split {split!r} has no goals ({len(shop.goals)} goals in total)")
        self.max_steps = max_steps
        self._rng = random.Random(seed)
        self._session: ShopSession | None = None
        self._goal_index: int | None = None
        self._steps = 0
        self._done = True

    @property
    def num_tasks(self) -> int:
        """Goals in this env's split."""
        return len(self.task_ids)

    def reset(self, task_id: int | str | None = None, seed: int | None = None) -> Observation:
        """Starts an episode on goal ``task_id`` (a global goal index in this split), or on a goal
        drawn uniformly from the split with ``seed`` (or the env's own generator)."""
        if task_id is None:
            rng = self._rng if seed is None else random.Random(seed)
            goal_index = rng.choice(self.task_ids)
        else:
            try:
                goal_index = int(task_id)
            except (TypeError, ValueError):
                raise ValueError(f"task_id must be a goal index, got {task_id!r}") from None
            if goal_index not in self.task_ids:
                raise ValueError(
                    f"task_id {goal_index} is not in the {self.split!r} split "
                    f"(goal indices {self.task_ids.start}..{self.task_ids.stop - 1})")
        self._goal_index = goal_index
        self._session = ShopSession(self.shop, self.shop.goals[goal_index])
        self._steps, self._done = 0, False
        return self._observation()

    def step(self, response_text: str) -> StepResult:
        """Projects, executes and scores one model response (see module docstring)."""
        if self._session is None or self._done:
            raise RuntimeError("WebShopEnv.step called without an active episode; call reset()")
        parsed = parse_react_action(response_text)
        outcome = self._session.execute(parsed.action)
        self._steps += 1
        task_score = outcome.purchase.total if outcome.purchase is not None else 0.0
        won = outcome.purchase is not None and task_score == 1.0
        self._done = outcome.done or self._steps >= self.max_steps
        errors = [e for e in (parsed.error, outcome.error) if e]
        info = {
            "task_score": task_score,
            "won": won,
            "action": parsed.action,
            "action_executed": outcome.executed,
            "error": "; ".join(errors) if errors else None,
            "goal_index": self._goal_index,
            "step": self._steps,
        }
        observation = self._observation()
        info["available_actions"] = observation.admissible_actions
        if outcome.purchase is not None:
            info["purchased_asin"] = self._session.asin
            info["purchased_options"] = dict(self._session.options)
            info["reward_breakdown"] = dataclasses.asdict(outcome.purchase)
        return StepResult(observation=observation, reward=SUCCESS_REWARD if won else 0.0,
                          done=self._done, won=won, action_valid=parsed.valid, info=info)

    def close(self) -> None:
        self._session = None
        self._done = True

    @property
    def goal(self):
        """The current episode's goal (None before the first reset)."""
        return None if self._session is None else self._session.goal

    @property
    def chosen_options(self) -> dict[str, str]:
        """Option name -> value chosen so far on the current item page."""
        return {} if self._session is None else dict(self._session.options)

    def _observation(self) -> Observation:
        return Observation(text=self._session.observation(),
                           task=self._session.goal.instruction_text,
                           admissible_actions=available_actions(self._session))


@functools.lru_cache(maxsize=4)
def load_offline_shop(seed: int = 0, attribute_file: str = DEFAULT_ATTRIBUTE_FILE) -> Shop:
    """The offline shop: real goals/attributes, pages GENERATED from ``seed`` (cached)."""
    entries = load_attribute_file(attribute_file)
    products = generate_catalog(entries, seed)
    rng = random.Random(seed)
    prices = draw_purchase_prices(products, rng)
    goals = shuffle_goals(synthetic_goals(products, prices, rng))
    return Shop.build(products, prices, goals)


def make_offline_webshop_env(split: str = "train", seed: int = 0, max_steps: int = MAX_STEPS,
                             attribute_file: str = DEFAULT_ATTRIBUTE_FILE) -> WebShopEnv:
    """WebShop with the real 1000-product goals and generated pages (catalogue seed ``seed``)."""
    return WebShopEnv(load_offline_shop(seed, attribute_file), split=split,
                      max_steps=max_steps, seed=seed)
