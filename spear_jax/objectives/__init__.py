"""Pure, jit-able RL objectives: advantages, policy losses, loss terms, aggregation, token statistics.

See ``docs/objectives.md`` for how the train step composes them.
"""
from spear_jax.objectives.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    GroupedRewards,
    broadcast_to_tokens,
    compute_advantages,
    discounted_step_returns,
    get_advantage_estimator,
    step_group_ids_from_anchors,
    validate_group_sizes,
)
from spear_jax.objectives.aggregation import AggregationConfig, aggregate, finalize
from spear_jax.objectives.objective import (
    ObjectiveConfig,
    SILConfig,
    policy_objective,
    replay_policy_config,
    sil_objective,
)
from spear_jax.objectives.policy_losses import POLICY_LOSSES, PolicyLossConfig, get_policy_loss
from spear_jax.objectives.regularizers import entropy_bonus, kl_penalty
from spear_jax.objectives.terms import (
    LOSS_TERMS,
    LossTerm,
    TermInputs,
    TermValue,
    get_loss_term,
    register_loss_term,
)
from spear_jax.objectives.token_stats import token_entropy, token_logprobs, token_logprobs_and_entropy
