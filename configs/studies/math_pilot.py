"""The pilot that chooses the arithmetic of the math study (``math_methods``): for each candidate
problem setting and warm-start length, the study's warm start (``configs/sft.py:math_tiny`` on
worked solutions that call the tool, recorded from the setting's train problems, seed 0), its
held-out success (96 ``test`` problems), and, where a setting's ``rl_steps`` is above 0, a short
Dr.BoT (GRPO) run from it.

    python -m spear_jax.study.pilot --pilot=configs/studies/math_pilot.py --workdir=studies/math_pilot

A solution prints the problem's expression and boxes the printed result, so the tool turns every
problem into two copies; what the tiny model must learn is to make them. The preset's problems
(``basic_arithmetic`` defaults: 2-6 terms of up to 4 digits, parentheses, negation) make copies
of up to 40 characters.
"""
import ml_collections

from configs._compose import build_config
from configs.studies._common import method, study
from configs.studies.math_methods import RESPONSE_BUDGET, arithmetic

SEED = 0
EVAL_EPISODES = 96


def _preset() -> tuple:
    """The math presets' own problems (their spelled-out ``generator_options``) as overrides."""
    o = build_config("drbot", "math_tiny").env.kwargs.generator_options
    return arithmetic(o.min_terms, o.max_terms, o.min_digits, o.max_digits, tuple(o.operators),
                      o.allow_parentheses, o.allow_negation)


PRESET = _preset()

# (name, label, problem overrides, warm-start steps, RL steps, RL-only overrides): the candidates.
# The last one changes the RL run alone, so it shares three_terms_320's warm start (same config).
SETTINGS = (
    ("preset", "the preset's problems, 80 warm-start steps (math_methods as first run)", PRESET, 80, 0, ()),
    ("two_terms", "2 terms of 1-2 digits (+ - *), 80 warm-start steps", arithmetic(2, 2, 1, 2), 80, 0, ()),
    ("two_terms_320", "2 terms of 1-2 digits (+ - *), 320 warm-start steps", arithmetic(2, 2, 1, 2), 320, 10, ()),
    ("three_terms_320", "2-3 terms of 2-3 digits (+ - *), 320 warm-start steps", arithmetic(2, 3, 2, 3), 320, 10,
     ()),
    ("three_terms_320_lr5e-5", "2-3 terms of 2-3 digits (+ - *), 320 warm-start steps, RL lr 5e-5",
     arithmetic(2, 3, 2, 3), 320, 10, (("actor.lr", 5e-5),)),
)


def setting_study(name: str, overrides: tuple, warm_steps: int, rl_steps: int,
                  rl_overrides: tuple = ()) -> ml_collections.ConfigDict:
    """The one-method study of one setting: ``rl_steps`` Dr.BoT (GRPO) steps (with
    ``rl_overrides``), held-out success before and after them (with 0 steps, one evaluation of
    the warm start)."""
    only_evaluate = (("trainer.eval_before_train", False),) if rl_steps == 0 else ()
    drbot = method("drbot", "Dr.BoT (GRPO)", "configs/drbot.py:math_tiny", only_evaluate + tuple(rl_overrides))
    return study(f"math_pilot/{name}", f"math pilot: {name}", (SEED,), baseline="drbot", methods=(drbot,),
                 warm_start_config="configs/sft.py:math_tiny", warm_start_data="math_tool",
                 total_steps=rl_steps, eval_every=max(rl_steps, 1), eval_episodes=EVAL_EPISODES,
                 overrides=RESPONSE_BUDGET + overrides, warm_start_overrides=(("sft.steps", warm_steps),))


def get_config():
    c = ml_collections.ConfigDict()
    c.name, c.title = "math_pilot", "Math problem-setting pilot (tiny model, seed 0)"
    c.settings = tuple(ml_collections.ConfigDict({"name": name, "label": label, "study": setting_study(name, *rest)})
                       for name, label, *rest in SETTINGS)
    return c
