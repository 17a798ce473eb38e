"""The agent table on TextWorldExpress with the tiny model: GRPO, Dr.BoT (GRPO), Dr.BoT (GRPO) +
SPEAR, GiGPO, Dr.BoT (GiGPO) + SPEAR; 5 seeds, 40 RL steps, held-out evaluation on 96 episodes
every 5 steps, paired differences against Dr.BoT (GRPO).

Every method runs the ``twx_tiny`` preset (its batch, lengths, learning rate and sampling) with
no per-method tuning; ``OVERRIDES`` (the game setting chosen by the pilot,
``configs/studies/twx_pilot.py``) apply to every run and to the warm start.
"""
from configs.studies._common import method, study
from configs.studies.twx_pilot import CHOSEN, setting_overrides

SEEDS = (0, 1, 2, 3, 4)
# The game setting the pilot chose (results/twx_pilot/report.md, docs/results.md): coin, 3
# locations, no distractors, no doors, 8 steps allowed (the twx_tiny preset's game, set explicitly).
OVERRIDES = setting_overrides(CHOSEN)

METHODS = (
    method("grpo", "GRPO", "configs/grpo.py:twx_tiny"),
    method("drbot_grpo", "Dr.BoT (GRPO)", "configs/drbot.py:twx_tiny"),
    method("spear_drbot_grpo", "Dr.BoT (GRPO) + SPEAR", "configs/spear.py:twx_tiny,drbot"),
    method("gigpo", "GiGPO", "configs/gigpo.py:twx_tiny"),
    method("spear_drbot_gigpo", "Dr.BoT (GiGPO) + SPEAR", "configs/spear.py:twx_tiny,drbot_gigpo", base="gigpo"),
)


def get_config():
    return study("twx_methods", "SPEAR and its baselines on TextWorldExpress (tiny model)", SEEDS,
                 baseline="drbot_grpo", methods=METHODS, warm_start_config="configs/sft.py:twx_tiny",
                 warm_start_data="gold", total_steps=40, eval_every=5, eval_episodes=96, overrides=OVERRIDES)
