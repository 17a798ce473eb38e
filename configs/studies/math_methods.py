"""Math with the code interpreter, tiny model: GRPO, Dr.BoT and Dr.BoT + SPEAR on procedural
arithmetic (reasoning-gym ``basic_arithmetic``); 3 seeds, paired differences against Dr.BoT.

The warm start trains on worked solutions generated from the train problems that call the tool
(``warm_start.data = "math_tool"``: print the expression, box the printed result). A call, its
output and the boxed answer take about 90 tokens of the tiny tokenizer, so the response budget
(model and tool tokens of the episode) is raised from the preset's 32 to 128 for every run.

Not yet runnable as a study: on the preset's problems the tiny model scores 0 from the warm start
on, and RL at the preset's learning rate undoes a warm start that works
(``configs/studies/math_pilot.py``, docs/results.md "Study 2"). The problems, warm-start length
and learning rate are set here once the pilot has chosen them.
"""
from configs.studies._common import method, study

SEEDS = (0, 1, 2)
OVERRIDES = (("rollout.max_response_length", 128), ("actor.loss_agg_max_response_length", 128))

METHODS = (
    method("grpo", "GRPO", "configs/grpo.py:math_tiny"),
    method("drbot", "Dr.BoT (GRPO)", "configs/drbot.py:math_tiny"),
    method("spear_drbot", "Dr.BoT (GRPO) + SPEAR", "configs/spear.py:math_tiny,drbot"),
)


def get_config():
    return study("math_methods", "SPEAR on math with the code interpreter (tiny model)", SEEDS, baseline="drbot",
                 methods=METHODS, warm_start_config="configs/sft.py:math_tiny", warm_start_data="math_tool",
                 total_steps=40, eval_every=5, eval_episodes=96, overrides=OVERRIDES)
