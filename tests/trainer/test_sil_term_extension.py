"""A new SIL loss term by registration and one config line: no project file changes.

The term below reads ``episode_return``, a per-row array of the packed batch that the replay
buffer did not store before: declaring it as an input is all it takes for the buffer to carry it
and for the replay minibatches to hold it.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from spear_jax.objectives.terms import LossTerm, TermValue, register_loss_term
from spear_jax.trainer import Trainer
from tests.trainer.test_trainer import RandomAdmissibleSampler, _coin, _config, _train_records


def return_weighted_imitation(config, inputs):
    """Per token ``-R_i * logp_t``: imitate a replayed response in proportion to its episode
    return R_i (``episode_return`` [B]); logs R_i aggregated like the loss and its row sum."""
    del config
    returns = inputs.batch["episode_return"].astype(jnp.float32)  # [B]
    per_token = jnp.broadcast_to(returns[:, None], inputs.logp.shape)
    real_rows = returns if inputs.row_valid is None else jnp.where(inputs.row_valid, returns, 0.0)
    return TermValue(-per_token * inputs.logp, per_token, {"toy_return_sum": jnp.sum(real_rows)})


register_loss_term(LossTerm("return_weighted_imitation", return_weighted_imitation, metric="toy_return",
                            inputs=("episode_return",)), replace=True)


@pytest.mark.slow
def test_a_registered_sil_term_trains_on_a_stored_array(tmp_path):
    c = _config("spear", "twx_tiny,grpo", steps=3)
    # Groups of 4 random players: most groups are mixed, so a step admits more than the 12 rows
    # beating the baseline that fire a replay of min(2^k, 8) rows (one per device, 8 here).
    c.data.train_tasks_per_step, c.data.group_size = 4, 4
    c.replay.buffer_size, c.replay.max_loss_steps = 8, 2
    c.actor.ppo_micro_batch_size = 16  # one micro-batch per minibatch: metrics are exact sums
    c.trainer.eval_before_train = False
    c.replay.loss_terms = ("pg", "entropy", ("return_weighted_imitation", 0.1))  # the one config line

    trainer = Trainer(c, str(tmp_path))
    trainer.engine.sampler = RandomAdmissibleSampler(trainer.engine.tokenizer)
    replays = {}
    triggered = trainer.buffer.replay_if_ready

    def record_replay(step, rng, min_rows=1):
        replay, metrics = triggered(step, rng, min_rows)
        if replay is not None:
            replays[step] = replay
        return replay, metrics

    trainer.buffer.replay_if_ready = record_replay
    try:
        trainer.train()
    finally:
        trainer.close()

    records = {r["step"]: r for r in _train_records(tmp_path)}
    assert replays, "no replay update ran"
    for step, replay in replays.items():
        assert len(replay["scores"]) <= 16  # one replay minibatch
        record = records[step]
        assert record["sil/optimizer_steps"] == 1.0
        # the stored per-row returns reached the term, in the replay minibatch
        assert record["sil/toy_return_sum"] == pytest.approx(float(np.sum(replay["episode_return"])), rel=1e-6)
        assert record["sil/toy_return_sum"] > 0  # replayed rows are the rewarded ones
        assert np.isfinite(record["sil/toy_return"]) and np.isfinite(record["sil/loss"])
    for record in records.values():  # the on-policy objective is unchanged
        assert "actor/toy_return" not in record
