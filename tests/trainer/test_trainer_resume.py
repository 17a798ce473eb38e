"""Resuming a run through the real trainer (tiny model, TextWorldExpress): the resumed steps
equal the uninterrupted run's, with a reference policy too, and a changed config is refused
while a corrupted newest checkpoint falls back to the one before. (Apart from
``test_trainer.py`` so that the two test workers share these long runs.)"""
import os

import pytest

from spear_jax import metrics as run_metrics
from spear_jax import run_config
from tests.trainer.test_trainer import _coin, _config, _run, _timed, _train_records


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    def config(steps):
        c = _config("spear", "twx_tiny,grpo", steps=steps)
        c.data.train_tasks_per_step = 4
        c.replay.buffer_size = 8
        c.trainer.eval_before_train = False
        return _coin(c)

    _run(config(4), tmp_path / "full", random_admissible=True)
    _run(config(2), tmp_path / "resumed", random_admissible=True)  # "killed" after step 2
    _run(config(4), tmp_path / "resumed", random_admissible=True)  # resumes from step 2
    full = {r["step"]: r for r in _train_records(tmp_path / "full")}
    resumed = {r["step"]: r for r in _train_records(tmp_path / "resumed")}
    assert sorted(resumed) == [1, 2, 3, 4]
    assert full[2]["replay/buffer_rows"] > 0  # the resumed run must restore a non-empty buffer
    for step in (3, 4):
        a = {k: v for k, v in full[step].items() if not _timed(k)}  # wall-clock timings differ
        b = {k: v for k, v in resumed[step].items() if not _timed(k)}
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == b[key], (step, key, a[key], b[key])


@pytest.mark.slow
def test_resume_with_a_reference_policy_is_exact(tmp_path):
    """The reference (KL loss and KL in the reward) is re-derived from the starting weights on
    resume, not from the checkpoint's params: the resumed step equals the uninterrupted one."""
    def config(steps):
        c = _coin(_config("grpo", steps=steps))
        c.actor.use_kl_loss, c.actor.kl_loss_coef, c.actor.kl_loss_type = True, 0.01, "k2"
        c.algorithm.use_kl_in_reward, c.algorithm.kl_coef, c.algorithm.kl_penalty = True, 0.05, "low_var_kl"
        c.trainer.eval_before_train = False
        return c

    _run(config(2), tmp_path / "full", random_admissible=True)
    _run(config(1), tmp_path / "resumed", random_admissible=True)
    _run(config(2), tmp_path / "resumed", random_admissible=True)
    full = _train_records(tmp_path / "full")[1]
    resumed = _train_records(tmp_path / "resumed")[1]
    assert full["actor/kl_loss"] > 0 and full["actor/reward_kl_penalty"] > 0
    for key in [k for k in full if not _timed(k)]:
        assert full[key] == resumed[key], (key, full[key], resumed[key])


@pytest.mark.slow
def test_resume_refuses_changed_fields_and_writes_each_step_once(tmp_path):
    def config(steps):
        c = _config("grpo", steps=steps)
        c.trainer.max_checkpoints_to_keep = 2
        return c

    _run(config(2), tmp_path)  # eval 0, steps 1-2, final eval 2; checkpoints 1 and 2
    # bytes flipped in step 2's largest file (its params and optimizer state), size unchanged:
    # the resumed run falls back to step 1 and writes step 2 again
    step_dir = tmp_path / "checkpoints" / "2"
    data = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 2:len(raw) // 2 + 64])
    data.write_bytes(bytes(raw))
    changed = config(2)
    lr = changed.actor.lr
    changed.seed, changed.actor.lr, changed.name = 1, lr / 2, "drbot"
    recorded = (tmp_path / "config.json").read_text()
    with pytest.raises(run_config.ConfigError) as refused:
        _run(changed, tmp_path)
    assert (tmp_path / "config.json").read_text() == recorded  # the refused config is not recorded
    message = str(refused.value)
    for line in ("config.seed: 0 -> 1", f"config.actor.lr: {lr!r} -> {lr / 2!r}", "config.name: 'grpo' -> 'drbot'"):
        assert line in message, message
    assert "new --workdir" in message and f"--config.actor.lr={lr!r}" in message and "--config.seed=0" in message
    assert "trainer.total_steps" not in message.split("Fields that may change")[0]
    assert os.listdir(tmp_path / "checkpoints" / "rejected")  # step 2, moved aside
    _run(config(3), tmp_path)  # a longer schedule is an allowed change: resumes from step 1
    records = run_metrics.read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in records] == [
        (0, "eval"), (1, "train"), (2, "train"), (3, "train"), (3, "eval")]
