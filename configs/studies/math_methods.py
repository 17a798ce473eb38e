"""Math with the code interpreter, tiny model: GRPO, Dr.BoT and Dr.BoT + SPEAR on procedural
arithmetic (reasoning-gym ``basic_arithmetic``); 3 seeds, paired differences against Dr.BoT.

    python -m spear_jax.study --study=configs/studies/math_methods.py --workdir=studies/math_methods

The warm start trains on worked solutions generated from the train problems that call the tool
(``warm_start.data = "math_tool"``: print the expression, box the printed result). A call, its
output and the boxed answer take about 90 tokens of the tiny tokenizer, so the response budget
(model and tool tokens of the episode) is raised from the preset's 32 to 128 for every run.

The problems, warm-start length and learning rate are the math pilot's choice
(``configs/studies/math_pilot.py``, docs/results.md "Study 2"), made on Dr.BoT runs alone and
applied to every method: 2-3 terms of 2-3 digits (+ - *), where a 320-step warm start scores
0.27 held out (the preset's problems score 0); RL at lr 5e-5, because the presets' 5e-4 undoes
the warm start within 10 steps. The agent table's budget: 40 RL steps, an evaluation every 5.

The replay buffer is sized to math's one row per episode (``REPLAY_BUFFER``, every method; only
SPEAR reads it). Replay fires when more than 1.5 x ``replay.buffer_size`` stored rows beat the P50
baseline within the staleness window (``replay.tolerate_steps`` = 5 steps). The tiny preset's 32
asks for 48 of the window's 5 x 32 = 160 rows (30%), which no seed's buffer reached (36 at most), so
SIL never ran. 8 asks for 13 of 160 (8%): the share of the window that the agent study's trigger
takes (48 of about 950 step rows, 5%) and the paper's math script's (49 of 5 x 2048, 0.5%) are of
that order or below. The value follows from that rule, not from a run.
"""
from configs.studies._common import method, study

SEEDS = (0, 1, 2)
RESPONSE_BUDGET = (("rollout.max_response_length", 128), ("actor.loss_agg_max_response_length", 128))
WARM_START_STEPS = 320
RL_LR = 5e-5
REPLAY_BUFFER = (("replay.buffer_size", 8),)


def arithmetic(min_terms: int, max_terms: int, min_digits: int, max_digits: int, operators: tuple = ("+", "-", "*"),
               parentheses: bool = False, negation: bool = False) -> tuple:
    """The overrides of a ``basic_arithmetic`` problem setting."""
    options = "env.kwargs.generator_options."
    return ((options + "min_terms", min_terms), (options + "max_terms", max_terms),
            (options + "min_digits", min_digits), (options + "max_digits", max_digits),
            (options + "operators", operators), (options + "allow_parentheses", parentheses),
            (options + "allow_negation", negation))


PROBLEMS = arithmetic(2, 3, 2, 3)

# The learning rate is the RL runs' own (a method override): the warm start keeps the presets' lr.
RL = (("actor.lr", RL_LR),)
METHODS = (
    method("grpo", "GRPO", "configs/grpo.py:math_tiny", RL),
    method("drbot", "Dr.BoT (GRPO)", "configs/drbot.py:math_tiny", RL),
    method("spear_drbot", "Dr.BoT (GRPO) + SPEAR", "configs/spear.py:math_tiny,drbot", RL),
)


def get_config():
    return study("math_methods", "SPEAR on math with the code interpreter (tiny model)", SEEDS, baseline="drbot",
                 methods=METHODS, warm_start_config="configs/sft.py:math_tiny", warm_start_data="math_tool",
                 total_steps=40, eval_every=5, eval_episodes=96,
                 overrides=RESPONSE_BUDGET + PROBLEMS + REPLAY_BUFFER,
                 warm_start_overrides=(("sft.steps", WARM_START_STEPS),))
