"""SPEAR's ablations on TextWorldExpress with the tiny model, over Dr.BoT (GRPO): the full method
and each component removed; 3 seeds, the budget of ``twx_methods``, paired differences against
the full method.

* no tool-call reward: ``algorithm.use_toolcall_reward = "none"`` (no intrinsic interaction bonus);
* no SIL: ``replay.enable = False`` (no replay buffer, no self-imitation loss);
* no advantage recalibration: ``replay.weight_decay = 1.0`` (decay mode with w = 1: replayed rows
  keep the advantage they were stored with, no P50 baseline and no re-filtering);
* no Clip-Cov: ``actor.loss_mode = "vanilla"`` (the clipped surrogate on every token).

The full-method row runs exactly the command of ``twx_methods``' ``spear_drbot_grpo`` on the same
seeds (same config, overrides, budget and warm-start recipe). To train it once for both studies,
give this study the methods study's warm starts and runs before starting it::

    mkdir -p studies/twx_ablations/runs
    ln -s ../twx_methods/warm_start ../twx_methods/warm_start_data studies/twx_ablations/
    ln -s ../../twx_methods/runs/spear_drbot_grpo studies/twx_ablations/runs/spear

(finished runs are skipped; the committed ``results/twx_ablations`` was produced that way).
"""
from configs.studies._common import method, study
from configs.studies.twx_methods import OVERRIDES  # the pilot's setting (results/twx_pilot/)

SEEDS = (0, 1, 2)
SPEAR = "configs/spear.py:twx_tiny,drbot"

METHODS = (
    method("spear", "SPEAR (Dr.BoT GRPO)", SPEAR),
    method("no_toolcall_reward", "w/o tool-call reward", SPEAR, (("algorithm.use_toolcall_reward", "none"),)),
    method("no_sil", "w/o SIL (no replay)", SPEAR, (("replay.enable", False),)),
    method("no_recalibration", "w/o advantage recalibration", SPEAR, (("replay.weight_decay", 1.0),)),
    method("no_clip_cov", "w/o Clip-Cov", SPEAR, (("actor.loss_mode", "vanilla"),)),
)


def get_config():
    return study("twx_ablations", "SPEAR ablations on TextWorldExpress (tiny model)", SEEDS, baseline="spear",
                 methods=METHODS, warm_start_config="configs/sft.py:twx_tiny", warm_start_data="gold",
                 total_steps=40, eval_every=5, eval_episodes=96, overrides=OVERRIDES)
