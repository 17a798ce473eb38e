"""Integration tests: a few iterations of each algorithm through the real trainer on the tiny
model and TextWorldExpress (step rows) or procedural math (trajectory rows)."""
import importlib
import json
import math
import os
import subprocess
import sys


import jax
import numpy as np
import pytest

from spear_jax import metrics as run_metrics
from spear_jax import run_config
from spear_jax.trainer import Trainer
from tests.admissible import admissible_turn
from tests.environments.webshop_data import write_webshop_data_dir



class RandomAdmissibleSampler:
    """Plays a uniformly random admissible action in well-formed ReAct text (read from each
    prompt), so that rewards vary across a group as they do once a policy is warm. The rows it
    produces go through the real trainer: recomputed log-probs, advantages, buffer, updates."""

    def __init__(self, chat):
        self.chat = chat

    def generate(self, prompts, sampling, key):
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        out = []
        return [admissible_turn(self.chat, prompt, rng) for prompt in prompts]


def _config(method, preset="twx_tiny", steps=2):
    c = importlib.import_module(f"configs.{method}").get_config(preset)
    c.unlock()
    c.data.train_tasks_per_step, c.data.group_size, c.data.eval_episodes = 2, 2, 2
    c.env.history_length = 0
    c.env.max_steps = 3
    c.rollout.max_response_length = 16
    c.actor.loss_agg_max_response_length = 16
    c.actor.ppo_mini_batch_size, c.actor.ppo_micro_batch_size = 16, 8
    c.trainer.total_steps, c.trainer.eval_every, c.trainer.checkpoint_every = steps, 100, 1
    c.sft.enable = False
    return c


def _coin(c):
    """The one-room coin game: a random admissible policy wins about half of its episodes, so
    groups have reward variance and the replay buffer fills."""
    c.env.kwargs = {"game": "coin", "game_params": {"numLocations": 1, "numDistractorItems": 0,
                                                    "includeDoors": 0}}
    c.env.max_steps = 3
    return c


def _timed(metric: str) -> bool:
    """Metrics of wall-clock time: timings, throughput and the measured peak FLOP/s."""
    return "time" in metric or metric.endswith(("_per_s", "_mfu", "peak_flops"))


def _train_records(workdir):
    return [r for r in run_metrics.read_metrics(workdir) if r["split"] == "train"]


def _run(config, workdir, random_admissible=False):
    trainer = Trainer(config, str(workdir))
    if random_admissible:
        trainer.engine.sampler = RandomAdmissibleSampler(trainer.engine.tokenizer)
    try:
        final = trainer.train()
    finally:
        trainer.close()
    return final


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "drbot", "gigpo"])
def test_baselines_run_and_update(method, tmp_path):
    final = _run(_coin(_config(method)), tmp_path, random_admissible=True)
    records = _train_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["actor/optimizer_steps"] >= 1
        assert record["actor/skipped"] == 0.0
        assert math.isfinite(record["actor/loss"])
        assert record["quality/frac_masked"] == 0.0  # well-formed ReAct turns
        if record["advantage/mean_abs"] > 0:
            assert record["actor/grad_norm"] > 0
        else:  # every group won or lost alike: all advantages are 0, so is the gradient
            assert record["actor/grad_norm"] == 0.0
        assert record["rollout/env_steps"] > 0
    assert 0.0 <= final["success_rate"] <= 1.0
    assert os.path.isdir(tmp_path / "checkpoints" / "2")


@pytest.mark.slow
def test_spear_replay_triggers_and_trains(tmp_path):
    c = _config("spear", "twx_tiny,grpo", steps=4)
    c.data.train_tasks_per_step = 4
    # Trigger once > 12 stored rows beat the P50 baseline; replay min(2^k, 8) rows, which must
    # be at least one per batch-parallel device (8 here) or the batch is discarded.
    c.replay.buffer_size = 8
    c.replay.max_loss_steps = 2
    _run(_coin(c), tmp_path, random_admissible=True)
    records = _train_records(tmp_path)
    replayed = [r for r in records if r.get("sil/optimizer_steps", 0) > 0]
    assert replayed, "the replay path never ran"
    for record in replayed:
        assert record["step"] >= 2  # data of step k is replayed at step k + 1 at the earliest
        assert record["sil/sil_weight"] > 0 and math.isfinite(record["sil/loss"])
    assert all(r["replay/sil_weight"] == pytest.approx(1.0 if r["step"] >= 2 else 0.5) for r in records)
    assert any(r["replay/discarded"] == 0 and r["replay/rows"] >= 8 for r in replayed)


@pytest.mark.slow
def test_trajectory_rows_on_math(tmp_path):
    c = _config("spear", "math_tiny,grpo", steps=1)
    c.env.max_steps = 2
    c.rollout.max_prompt_length = 256
    # the paper presets' precision: bf16 compute, bf16 sampler weights and KV cache
    c.model.compute_dtype = c.rollout.weight_dtype = c.rollout.kv_cache_dtype = "bfloat16"
    final = _run(c, tmp_path)
    (record,) = _train_records(tmp_path)
    assert record["actor/optimizer_steps"] >= 1 and math.isfinite(record["actor/loss"])
    assert "success_rate" in final


@pytest.mark.slow
def test_kl_loss_to_the_reference_policy_trains(tmp_path):
    """GRPO with --config.actor.use_kl_loss=True --config.actor.kl_loss_coef=0.01: the reference
    is the starting policy, so the KL is exactly 0 at the first update and positive after it."""
    c = _coin(_config("grpo", steps=2))
    c.actor.use_kl_loss, c.actor.kl_loss_coef = True, 0.01
    c.trainer.eval_before_train = False
    _run(c, tmp_path, random_admissible=True)
    first, second = _train_records(tmp_path)
    assert first["actor/kl_loss"] == 0.0 and second["actor/kl_loss"] > 0.0
    for record in (first, second):
        assert record["actor/skipped"] == 0.0 and math.isfinite(record["actor/loss"])


@pytest.mark.slow
def test_cosine_schedule_spans_the_run_and_log_every(tmp_path):
    """The LR schedule advances once per RL step (every minibatch of step t, here several, uses
    lr(t - 1)), so a cosine over 3 steps is still positive at the last; metrics every 2 steps."""
    c = _coin(_config("grpo", steps=3))
    c.actor.lr_schedule, c.trainer.log_every = "cosine", 2
    c.actor.ppo_mini_batch_size = 8  # several optimizer steps per RL step
    c.trainer.eval_before_train = False
    _run(c, tmp_path, random_admissible=True)
    records = _train_records(tmp_path)
    assert [r["step"] for r in records] == [2, 3]  # every log_every steps, and the last
    for record in records:
        expected = c.actor.lr * 0.5 * (1 + math.cos(math.pi * (record["step"] - 1) / 3))
        assert record["actor/lr"] == pytest.approx(expected, rel=1e-6) and expected > 0
        assert record["actor/optimizer_steps"] > 1


@pytest.mark.slow
def test_readme_main_command_on_a_short_schedule(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "spear_jax.main", "--config=configs/spear.py:twx_tiny",
           f"--workdir={workdir}", "--config.trainer.total_steps=1", "--config.sft.steps=2",
           "--config.sft.episodes=4", "--config.data.train_tasks_per_step=2",
           "--config.data.group_size=2", "--config.data.eval_episodes=2", "--config.env.max_steps=2",
           "--config.actor.ppo_mini_batch_size=16", "--config.actor.ppo_micro_batch_size=8"]
    out = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["eval_steps"] == [0, 1]
    assert os.path.isfile(workdir / "warm_start" / "metrics.jsonl")
    assert any(p.endswith("curve_success_rate.png") for p in summary["plots"])


def test_eval_temperature_zero_decodes_greedily():
    c = _config("spear")
    c.rollout.eval_temperature, c.rollout.temperature = 0.0, 0.4
    greedy = run_config.sampling_params(c, [7], evaluation=True)
    assert greedy.greedy and greedy.temperature == 1.0 and greedy.stop_sequences == ((7,),)
    sampled = run_config.sampling_params(c, [7], evaluation=False)
    assert not sampled.greedy and sampled.temperature == 0.4


@pytest.mark.slow
def test_webshop_from_a_data_dir_trains(tmp_path):
    """One Dr.BoT step on WebShop files (real names and format) set through env.kwargs."""
    c = _config("drbot", steps=1)
    c.env.name = "webshop"
    c.env.kwargs = {"data_dir": write_webshop_data_dir(tmp_path / "data"), "product_set": "1000",
                    "human_goals": False}
    c.env.max_steps = 2
    run_config.validate(c, num_devices=jax.device_count())
    trainer = Trainer(c, str(tmp_path / "run"))
    trainer.engine.sampler = RandomAdmissibleSampler(trainer.engine.tokenizer)
    try:
        assert trainer.train_envs[0].shop is trainer.eval_envs[-1].shop
        assert len(trainer.train_envs[0].shop.goals) == 520
        final = trainer.train()
    finally:
        trainer.close()
    (record,) = _train_records(tmp_path / "run")
    assert record["actor/optimizer_steps"] >= 1 and math.isfinite(record["actor/loss"])
    assert record["rollout/env_steps"] > 0
    assert 0.0 <= final["success_rate"] <= 1.0
