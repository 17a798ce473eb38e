"""The trainer with environment workers: the same run as in-process stepping, no worker left
behind once it closes, and a clear error for a bad worker count."""
import os

import pytest

from spear_jax import run_config
from spear_jax.trainer import Trainer
from tests.trainer.test_trainer import RandomAdmissibleSampler, _coin, _config, _timed, _train_records


def _one_step(workdir, num_workers):
    c = _coin(_config("grpo", steps=1))
    c.env.num_workers = num_workers
    c.trainer.checkpoint_every = 100
    trainer = Trainer(c, str(workdir))
    trainer.engine.sampler = RandomAdmissibleSampler(trainer.engine.tokenizer)
    pools = [envs.local for envs in (trainer.train_envs, trainer.eval_envs) if hasattr(envs.local, "processes")]
    pids = [process.pid for pool in pools for process in pool.processes]
    try:
        trainer.train()
    finally:
        trainer.close()
    return _train_records(workdir), pids


@pytest.mark.slow
def test_two_env_workers_train_like_in_process_and_leave_no_process(tmp_path):
    in_process, no_pids = _one_step(tmp_path / "inline", 0)
    pooled, pids = _one_step(tmp_path / "workers", 2)
    assert no_pids == [] and len(pids) == 4  # train and eval pools, two workers each
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    strip = lambda record: {k: v for k, v in record.items() if not _timed(k)}  # noqa: E731
    assert [strip(r) for r in pooled] == [strip(r) for r in in_process]
    assert pooled[0]["rollout/env_steps"] > 0


def test_env_worker_fields_are_checked():
    c = _config("grpo")
    c.env.num_workers = -1
    with pytest.raises(run_config.ConfigError, match="env.num_workers"):
        run_config.validate(c)
    c.env.num_workers, c.env.step_timeout_s = 2, 0.0
    with pytest.raises(run_config.ConfigError, match="env.step_timeout_s"):
        run_config.validate(c)
    c.env.step_timeout_s, c.env.worker_backend = 10.0, "threads"
    with pytest.raises(run_config.ConfigError, match="env.worker_backend"):
        run_config.validate(c)
