"""Method switches: what GRPO, Dr.BoT, GiGPO and SPEAR change relative to ``base_config``.

Each function edits a config in place and touches only method fields (advantages, losses,
filters, replay, reward shaping); presets (``configs.presets``) set domain and scale fields.
Values are those of the reference launch scripts (spec sections 2 and 3).
"""
from __future__ import annotations

import ml_collections


def grpo(c: ml_collections.ConfigDict) -> None:
    """Plain GRPO: std-normalised group advantage, symmetric clip 0.2, token-mean, no filters."""
    c.algorithm.adv_estimator = "grpo"
    c.algorithm.norm_adv_by_std_in_grpo = True
    c.actor.clip_ratio_low, c.actor.clip_ratio_high = 0.2, 0.2
    c.actor.loss_agg_mode = "token-mean"
    c.actor.loss_mode = "vanilla"


def gigpo(c: ml_collections.ConfigDict) -> None:
    """GiGPO: episode-level GRPO advantage plus a step-level advantage from anchor states."""
    grpo(c)
    c.algorithm.adv_estimator = "gigpo"
    c.algorithm.gigpo_gamma = 0.95
    c.algorithm.gigpo_step_advantage_w = 1.0
    c.algorithm.gigpo_mode = "mean_std_norm"


def drbot(c: ml_collections.ConfigDict) -> None:
    """Dr.BoT's bag of tricks (spec section 2, table rows 1-8) on top of GRPO or GiGPO.

    No KL; clip-higher 0.2 / 0.28; dual clip 10; no std normalisation (GRPO only: GiGPO keeps
    mean_std_norm); Dr.GRPO aggregation; low-quality responses masked; 75% of groups kept by
    reward std. The reference's agent Dr.BoT runs skip the response filters (spec 5.1); here they
    are on, as in its SPEAR and math runs.
    """
    c.algorithm.use_kl_in_reward, c.algorithm.kl_coef = False, 0.0
    c.actor.use_kl_loss, c.actor.kl_loss_coef = False, 0.0
    c.actor.clip_ratio_low, c.actor.clip_ratio_high = 0.2, 0.28
    c.actor.clip_ratio_c = 10.0
    c.algorithm.norm_adv_by_std_in_grpo = False
    c.actor.loss_agg_mode = "seq-mean-token-sum-norm"
    c.algorithm.filter_overlong_responses = True
    c.algorithm.filter_incomplete_responses = True
    c.algorithm.filter_repetitive_responses = True
    c.algorithm.filter_unreadable_responses = True
    c.algorithm.rollout_filter_ratio = 0.75
    c.algorithm.rollout_filter_type = "std"
    c.actor.loss_mode = "vanilla"


def spear(c: ml_collections.ConfigDict) -> None:
    """SPEAR: replay of successful samples with P50 recalibration, a cosine-rising SIL weight,
    Clip-Cov on both losses, and a cosine-decaying intrinsic tool-call reward (spec section 3)."""
    c.replay.enable = True
    c.replay.buffer_size = 2048
    c.replay.baseline_buffer_size = 10240
    c.replay.tolerate_steps = 5
    c.replay.weight_decay = -1.0  # P50 mode
    c.replay.loss_coef = 1.0
    c.replay.clip_cov_ratio, c.replay.clip_cov_lb, c.replay.clip_cov_ub = 0.02, 2.0, 60.0
    c.replay.kl_cov_ratio = 0.02
    c.actor.loss_mode = "clip_cov"
    c.actor.clip_cov_ratio, c.actor.clip_cov_lb, c.actor.clip_cov_ub = 0.0002, 1.0, 5.0
    c.algorithm.use_toolcall_reward = "cosine"
    c.algorithm.max_toolcall_steps = 200


BASES = {
    "grpo": (grpo,),
    "drbot": (grpo, drbot),
    "gigpo": (gigpo,),
    "drbot_gigpo": (gigpo, drbot),
}


def apply_base(c: ml_collections.ConfigDict, base: str) -> None:
    """Applies a baseline method by name (``grpo``, ``drbot``, ``gigpo``, ``drbot_gigpo``)."""
    if base not in BASES:
        raise ValueError(f"unknown base method {base!r}; choose one of {', '.join(BASES)}")
    for edit in BASES[base]:
        edit(c)
