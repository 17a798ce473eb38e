"""A short trainer run with every logging feature on: wandb (offline) and mlflow (file store)
records, sampled trajectories, the inspect command and the throughput metrics."""
import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from spear_jax import metrics as run_metrics
from spear_jax import tracking, trajectories
from test_logging_units import read_wandb_history
from test_trainer import _coin, _config, _run

TURN_FIELDS = {"step_index", "prompt", "observation", "segments", "env_reward", "shaped_reward", "advantage",
               "action_valid", "finish_reason", "flags", "trained_tokens", "masked"}


@pytest.mark.slow
def test_run_logs_to_every_backend_with_trajectories_and_throughput(tmp_path):
    c = _coin(_config("grpo", steps=2))
    c.trainer.eval_before_train = False
    c.logging.backends = ("jsonl", "tensorboard", "wandb", "mlflow")
    c.logging.trajectories_every, c.logging.trajectories_per_step = 2, 3
    c.logging.peak_flops = 1e12
    _run(c, tmp_path, random_admissible=True)
    records = run_metrics.read_metrics(str(tmp_path))
    train = [r for r in records if r["split"] == "train"]

    for r in train:  # throughput: positive and tokens / seconds
        assert r["perf/decode_tokens"] > 0 and r["perf/update_tokens"] > 0
        assert r["perf/decode_tokens_per_s"] == pytest.approx(r["perf/decode_tokens"] / r["rollout/sampler_time_s"])
        assert r["perf/update_tokens_per_s"] == pytest.approx(r["perf/update_tokens"] / r["time/update"])
        assert 0 < r["perf/update_mfu"] < 1 and 0 < r["perf/decode_mfu"] < 1 and r["perf/peak_flops"] == 8e12

    assert trajectories.saved_steps(str(tmp_path)) == [2]
    episodes = trajectories.read_trajectories(str(tmp_path), 2)
    assert len(episodes) == 3 and len({e["traj_id"] for e in episodes}) == 3
    for episode in episodes:
        assert episode["step"] == 2 and episode["turns"]
        for turn in episode["turns"]:
            assert set(turn) == TURN_FIELDS and "<action>" in turn["segments"][0]["text"]
            assert set(turn["flags"]) == {"incomplete", "overlong", "repetitive", "unreadable", "invalid_action"}

    client = MlflowClient(tracking.default_mlflow_uri(str(tmp_path)))
    run_id = (tmp_path / "mlflow_run_id").read_text()
    wandb_rows = read_wandb_history(str(tmp_path))
    wandb_logged = {(h["_step"], k): v for h in wandb_rows for k, v in h.items()}
    for key in ("actor/loss", "perf/update_tokens_per_s", "success_rate"):
        for split in ("train", "eval"):
            steps, values = run_metrics.curves(records, key, split)
            history = client.get_metric_history(run_id, f"{split}/{key.replace('/', '.')}")  # file store
            assert ([m.step for m in history], [m.value for m in history]) == (steps, pytest.approx(values))
            assert [wandb_logged[(s, f"{split}/{key}")] for s in steps] == pytest.approx(values)
    assert client.list_artifacts(run_id, "trajectories")

    shown = subprocess.run([sys.executable, "-m", "spear_jax.inspect", f"--workdir={tmp_path}", "--step=2"],
                           capture_output=True, text=True, check=True, cwd=os.getcwd()).stdout
    assert shown.count("=== step 2 trajectory") == 3 and "[assistant] <think>" in shown and "\033[" not in shown
