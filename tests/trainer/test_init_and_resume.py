"""config.trainer.init_from: RL starts from another run's warm start (or an HF export of it) with
a fresh optimizer, an empty buffer and no warm start of its own. config.trainer.resume_step:
a run resumes from a chosen step of its workdir. Errors name the field."""
import importlib
import os

import jax
import numpy as np
import pytest

from spear_jax import main, run_config, sft
from spear_jax import metrics as run_metrics
from spear_jax.checkpoint import complete_steps
from spear_jax.export import export_run
from spear_jax.init_from import InitSource, resolve_init_from
from spear_jax.policy import model_config_of, restore_params
from spear_jax.trainer import Trainer


def _config(steps=1):
    c = importlib.import_module("configs.spear").get_config("twx_tiny")
    c.unlock()
    c.data.train_tasks_per_step, c.data.group_size, c.data.eval_episodes = 2, 2, 2
    c.env.history_length, c.env.max_steps = 0, 2
    c.rollout.max_response_length = c.actor.loss_agg_max_response_length = 16
    c.actor.ppo_mini_batch_size, c.actor.ppo_micro_batch_size = 16, 8
    c.trainer.total_steps, c.trainer.eval_every, c.trainer.checkpoint_every = steps, 100, 1
    c.trainer.eval_before_train = False
    c.sft.steps, c.sft.episodes, c.sft.batch_size, c.sft.lr = 3, 4, 8, 1e-2
    return c


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory):
    """The warm start of another run: ``<source>/warm_start``, and its params."""
    source = tmp_path_factory.mktemp("source")
    c = _config()
    sft.run_sft(c, str(source / "warm_start"))
    return str(source / "warm_start"), restore_params(str(source / "warm_start"), model_config_of(c), None)


def _assert_same(params, want):
    got, expected = jax.tree.leaves(params), jax.tree.leaves(want)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rl_starts_from_another_runs_warm_start_without_its_own(warm_start, tmp_path, monkeypatch):
    source, want = warm_start
    c = _config(steps=1)
    c.trainer.init_from = source
    started = {}
    original = Trainer.train

    def train(self):
        started.update(params=jax.device_get(self.policy.params), step=self.step, buffer=self.buffer.num_rows,
                       history=self.buffer.history.num_values,
                       count=[int(x) for x in jax.tree.leaves(self.opt_state) if np.ndim(x) == 0
                              and np.asarray(x).dtype.kind in "iu"])
        return original(self)

    monkeypatch.setattr(Trainer, "train", train)
    main.run(c, str(tmp_path / "run"))
    _assert_same(started["params"], want)
    assert started["step"] == 0 and started["buffer"] == 0 and started["history"] == 0
    assert started["count"] and all(v == 0 for v in started["count"])  # a fresh optimizer: every step counter at 0
    assert not os.path.exists(tmp_path / "run" / "warm_start")  # the warm start was skipped
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "1")


def test_init_from_an_hf_export_and_from_a_step_directory(warm_start, tmp_path):
    source, want = warm_start
    export_run(source, str(tmp_path / "hf"), config_path=_write_config(tmp_path))
    assert resolve_init_from(str(tmp_path / "hf")).kind == "hf"
    steps = sorted(int(n) for n in os.listdir(os.path.join(source, "checkpoints")) if n.isdigit())
    step_dir = os.path.join(source, "checkpoints", str(steps[-1]))
    assert resolve_init_from(step_dir) == InitSource("run", os.path.join(source, "checkpoints"), steps[-1])
    for init_from in (str(tmp_path / "hf"), step_dir):
        c = _config()
        c.sft.enable = False
        c.trainer.init_from = init_from
        trainer = Trainer(c, str(tmp_path / f"run{len(init_from)}"))
        try:
            _assert_same(trainer.policy.params, want)
            if init_from.endswith("hf"):  # the export's own tokenizer.model
                assert trainer.policy.tokenizer.path == str(tmp_path / "hf" / "tokenizer.model")
        finally:
            trainer.close()


def _write_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(_config().to_json_best_effort())
    return str(path)


def test_init_from_errors_name_the_field(tmp_path):
    c = _config()
    c.trainer.init_from = str(tmp_path / "missing")
    with pytest.raises(run_config.ConfigError, match=r"config.trainer.init_from=.*missing.*no such directory"):
        run_config.validate(c, num_devices=8)
    (tmp_path / "empty").mkdir()
    c.trainer.init_from = str(tmp_path / "empty")
    with pytest.raises(run_config.ConfigError, match="config.trainer.init_from=.*neither a run checkpoint"):
        run_config.validate(c, num_devices=8)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    c.trainer.init_from = str(tmp_path / "run")
    with pytest.raises(run_config.ConfigError, match=r"config.trainer.init_from=.*no complete checkpoint"):
        run_config.validate(c, num_devices=8)
    c.trainer.init_from = ""
    c.trainer.resume_step = -2
    with pytest.raises(run_config.ConfigError, match=r"config.trainer.resume_step=-2: must be >= -1"):
        run_config.validate(c, num_devices=8)


def test_resume_step_resumes_the_chosen_step_and_sets_newer_ones_aside(tmp_path, monkeypatch):
    def config(resume_step=-1):
        c = _config(steps=2)
        c.sft.enable = False
        c.trainer.max_checkpoints_to_keep = 3
        c.trainer.resume_step = resume_step
        return c

    workdir = tmp_path / "run"
    trainer = Trainer(config(), str(workdir))
    try:
        trainer.train()
    finally:
        trainer.close()
    checkpoints = workdir / "checkpoints"
    assert complete_steps(str(checkpoints)) == [1, 2]
    want = restore_params(str(workdir), model_config_of(config()), None, step=1)

    restored = {}
    original = Trainer.restore_if_any

    def restore_if_any(self):
        resumed = original(self)
        restored.update(resumed=resumed, step=self.step, params=jax.device_get(self.policy.params))
        return resumed

    monkeypatch.setattr(Trainer, "restore_if_any", restore_if_any)
    trainer = Trainer(config(resume_step=1), str(workdir))
    try:
        trainer.train()
    finally:
        trainer.close()
    assert restored["resumed"] and restored["step"] == 1
    _assert_same(restored["params"], want)
    (aside,) = os.listdir(checkpoints / "superseded")
    assert os.listdir(checkpoints / "superseded" / aside) == ["2"]
    assert complete_steps(str(checkpoints)) == [1, 2]  # step 2 written again by the resumed run
    train_steps = [r["step"] for r in run_metrics.read_metrics(str(workdir)) if r["split"] == "train"]
    assert train_steps == [1, 2]


def test_resume_step_that_does_not_exist_fails_at_start_up(tmp_path):
    c = _config()
    c.trainer.resume_step = 5
    with pytest.raises(run_config.ConfigError, match=r"config.trainer.resume_step=5: no complete "
                                                     r"checkpoint .*complete steps: \[\]"):
        main.run(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "warm_start")  # refused before the warm start
    with pytest.raises(run_config.ConfigError, match=r"config.trainer.resume_step=5"):
        Trainer(c, str(tmp_path / "run"))
