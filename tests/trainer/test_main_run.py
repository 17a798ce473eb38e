"""main.run around the warm start, with the warm start and the trainer replaced by small fakes
(the real ones are covered in test_trainer.py)."""
import importlib
import os

import jax.numpy as jnp
import pytest

from spear_jax import checkpoint, main, metrics
from spear_jax.policy import CHECKPOINT_SUBDIR


class _FakeTrainer:
    def __init__(self, config, workdir):
        self.config, self.workdir = config, workdir

    def train(self):
        writer = metrics.MetricsWriter(self.workdir, tensorboard=False)
        writer.write(0, {"success_rate": 0.5}, split="eval")
        writer.close()
        return {"success_rate": 0.5}

    def close(self):
        pass


@pytest.fixture
def warm_starts(monkeypatch):
    """Replaces the warm start with one that saves a small complete checkpoint; returns the
    list of directories it trained into."""
    trained = []

    def fake_run_sft(config, workdir):
        trained.append(workdir)
        ckpt = checkpoint.RunCheckpointer(os.path.join(workdir, CHECKPOINT_SUBDIR), max_to_keep=1)
        ckpt.save(config.sft.steps, checkpoint.RunState(device={"params": {"w": jnp.ones(256)}}, host={},
                                                        meta={"step": config.sft.steps, "kind": "sft"}))
        ckpt.close()
        return workdir

    monkeypatch.setattr("spear_jax.sft.run_sft", fake_run_sft)
    monkeypatch.setattr("spear_jax.trainer.Trainer", _FakeTrainer)
    return trained


def _config():
    c = importlib.import_module("configs.spear").get_config("twx_tiny")
    assert c.sft.enable
    return c


def test_a_warm_start_killed_while_saving_is_trained_again(tmp_path, warm_starts):
    warm = tmp_path / main.WARM_START_DIR
    # killed during the save: orbax's temporary directory, and a finished step without manifest
    os.makedirs(warm / CHECKPOINT_SUBDIR / f"{_config().sft.steps}.orbax-checkpoint-tmp-7" / "device")
    main.run(_config(), str(tmp_path))
    assert warm_starts == [str(warm)]
    main.run(_config(), str(tmp_path))  # complete now: not trained again
    assert warm_starts == [str(warm)]
    step_dir = warm / CHECKPOINT_SUBDIR / str(_config().sft.steps)
    os.remove(step_dir / checkpoint.MANIFEST_FILE)  # finished by orbax, killed before the manifest
    main.run(_config(), str(tmp_path))
    assert warm_starts == [str(warm)] * 2


def test_a_damaged_warm_start_is_trained_again(tmp_path, warm_starts, caplog):
    main.run(_config(), str(tmp_path))
    step_dir = tmp_path / main.WARM_START_DIR / CHECKPOINT_SUBDIR / str(_config().sft.steps)
    data = max((os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names
                if name != checkpoint.MANIFEST_FILE), key=os.path.getsize)
    with open(data, "r+b") as handle:
        handle.write(b"\xff" * 8)
    with caplog.at_level("WARNING"):
        main.run(_config(), str(tmp_path))
    assert len(warm_starts) == 2 and "warm start" in caplog.text and "sha256 mismatch" in caplog.text
