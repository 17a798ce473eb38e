"""Row rewards of a rollout batch: the reference reward manager (spec 2.5, 2.7, 3d).

Every row of an episode carries the episode's shaped reward R (placed, in the reference, on the
row's last valid token; here a scalar per row):

    agent:  R = episode_return + min(1, 0.1 * episode_length) * kappa(t)     (all episodes)
    math:   R = verifier(+-1) + recipe bonus(num_tool_calls, kappa(t))       (qwen2.5 / qwen3)

with kappa(t) the tool-call factor of ``spear_jax.curriculum``. The shaped R is what enters the
group filter, advantages, the baseline history and the replay buffer. The invalid-action penalty
(agent: -0.1 on each row whose action was malformed) is applied after the group filter, by the
trainer, through ``spear_jax.filters.apply_invalid_action_penalty``.

KL in the reward (``algorithm.use_kl_in_reward``, fixed coefficient beta = ``algorithm.kl_coef``),
applied by the trainer after that penalty and before the advantages, as the reference's
``apply_kl_penalty`` does to the token-level rewards whose sum is the row's score:

    R_i <- R_i - beta * sum_t m_{i,t} KL_t(old_i || ref_i)

with KL_t the chosen estimator of the recomputed old log-probs against the reference's.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from spear_jax import curriculum
from spear_jax.filters import QualityFlags, repetitive_flags, unreadable_flags
from spear_jax.objectives import kl_penalty
from spear_jax.rollout import Row


def shaped_scores(rows: Sequence[Row], kappa: float, *, recipe: str) -> np.ndarray:
    """R [N] float32 for the rows of one batch, with the step's tool-call factor ``kappa``."""
    returns = np.array([row.episode_return for row in rows], np.float64)
    if recipe == "agent":
        lengths = np.array([row.episode_length for row in rows], np.float64)
        scores = returns + curriculum.agent_toolcall_bonus(lengths, kappa)
    else:
        calls = np.array([row.num_tool_calls for row in rows], np.float64)
        scores = curriculum.math_toolcall_score(returns, calls, kappa, recipe)
    return np.asarray(scores, np.float32).reshape(len(rows))


def quality_flags(rows: Sequence[Row]) -> QualityFlags:
    """Dr.BoT's four flags of each row's response: overlong and incomplete as the rollout set
    them (``Row.overlong``, ``Row.incomplete``: each flag is computed once, where the row is
    made), repetitive and unreadable from the response ids and text."""
    lengths = np.array([row.response_length for row in rows], np.int64)
    width = max(int(lengths.max(initial=0)), 1)
    ids = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row.response_ids)] = row.response_ids
    return QualityFlags(
        incomplete=np.array([row.incomplete for row in rows], bool),
        overlong=np.array([row.overlong for row in rows], bool),
        repetitive=repetitive_flags(ids, lengths),
        unreadable=unreadable_flags([row.response_text for row in rows]),
    )


def kl_penalised_scores(scores: np.ndarray, old_logprobs: np.ndarray, ref_logprobs: np.ndarray,
                        loss_mask: np.ndarray, coef: float, kind: str) -> tuple[np.ndarray, dict[str, float]]:
    """Scores minus the fixed-coefficient KL penalty (module docstring).

    Args:
      scores: [N] float row scores.
      old_logprobs, ref_logprobs: [N, L] float log-probs of the trained tokens (0 off the mask).
      loss_mask: [N, L] 0/1, the tokens that count.
      coef: beta >= 0.
      kind: a ``spear_jax.objectives.kl_penalty`` estimator.

    Returns (penalised [N] float32, metrics): ``actor/reward_kl_penalty`` is the mean over rows
    of each row's token-mean KL, ``actor/reward_kl_penalty_coeff`` is beta (the reference's names).
    """
    mask = np.asarray(loss_mask, np.float32)
    kl = np.asarray(kl_penalty(jnp.asarray(old_logprobs), jnp.asarray(ref_logprobs), kind)) * mask
    penalised = np.asarray(scores, np.float32) - np.float32(coef) * kl.sum(axis=1)
    tokens = mask.sum(axis=1)
    row_kl = np.where(tokens > 0, kl.sum(axis=1) / np.maximum(tokens, 1.0), 0.0)
    metrics = {"actor/reward_kl_penalty": float(row_kl.mean()) if row_kl.size else 0.0,
               "actor/reward_kl_penalty_coeff": float(coef)}
    return penalised.astype(np.float32), metrics
