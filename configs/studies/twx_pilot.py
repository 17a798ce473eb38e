"""The pilot that chooses the TextWorldExpress setting of the studies (``twx_methods``,
``twx_ablations``): for each candidate game setting, the study's warm start (``configs/sft.py:twx_tiny``
on the setting's recorded gold paths, seed 0), its held-out success on the study's held-out fold
(96 ``test`` episodes), and, where a setting's ``rl_steps`` is above 0, a short Dr.BoT (GRPO) run
from it to see whether RL moves success (0: the run only evaluates the warm start).

    python -m spear_jax.study.pilot --pilot=configs/studies/twx_pilot.py --workdir=studies/twx_pilot

Each setting is a one-method, one-seed study (``spear_jax/study/spec.py``) whose ``overrides`` are
the setting; ``env.max_steps`` is about twice the setting's mean gold-path length, so the gold
paths fit (the recorded data's ``gold_win_rate`` says how many did) with room to explore.
"""
import ml_collections

from configs.studies._common import method, study

SEED = 0
EVAL_EPISODES = 96


def coin(locations: int, distractors: int, doors: int, max_steps: int) -> tuple:
    """The overrides of a ``coin`` setting (the twx_tiny preset's game)."""
    params = "env.kwargs.game_params."
    return ((params + "numLocations", locations), (params + "numDistractorItems", distractors),
            (params + "includeDoors", doors), ("env.max_steps", max_steps))


# (name, label, overrides, RL steps): the candidates, from the twx_tiny preset's game to longer ones.
SETTINGS = (
    ("coin3", "coin, 3 rooms, max 8 steps (twx_tiny)", coin(3, 0, 0, 8), 0),
    ("coin5", "coin, 5 rooms, max 12 steps", coin(5, 0, 0, 12), 0),
    ("coin5_doors", "coin, 5 rooms with doors, max 16 steps", coin(5, 0, 1, 16), 0),
    ("coin7", "coin, 7 rooms, max 16 steps", coin(7, 0, 0, 16), 0),
)

# The setting the studies play (twx_methods.OVERRIDES): the one candidate whose warm start is
# neither hopeless nor saturated (results/twx_pilot/report.md; the reasons: docs/results.md).
CHOSEN = "coin3"


def setting_overrides(name: str) -> tuple:
    """The overrides of the setting ``name`` of ``SETTINGS``."""
    found = {setting: overrides for setting, _, overrides, _ in SETTINGS}
    if name not in found:
        raise ValueError(f"no pilot setting {name!r}; the settings are {sorted(found)}")
    return found[name]


def setting_study(name: str, overrides: tuple, rl_steps: int) -> ml_collections.ConfigDict:
    """The one-method study of one setting: ``rl_steps`` Dr.BoT (GRPO) steps, held-out success
    before and after them (with 0 steps, one evaluation of the warm start)."""
    only_evaluate = (("trainer.eval_before_train", False),) if rl_steps == 0 else ()
    drbot = method("drbot_grpo", "Dr.BoT (GRPO)", "configs/drbot.py:twx_tiny", only_evaluate)
    return study(f"twx_pilot/{name}", f"TextWorldExpress pilot: {name}", (SEED,), baseline="drbot_grpo",
                 methods=(drbot,), warm_start_config="configs/sft.py:twx_tiny", warm_start_data="gold",
                 total_steps=rl_steps, eval_every=max(rl_steps, 1), eval_episodes=EVAL_EPISODES,
                 overrides=overrides)


def get_config():
    c = ml_collections.ConfigDict()
    c.name, c.title = "twx_pilot", "TextWorldExpress setting pilot (tiny model, seed 0)"
    c.settings = tuple(ml_collections.ConfigDict({"name": name, "label": label, "study": setting_study(name, o, n)})
                       for name, label, o, n in SETTINGS)
    return c
