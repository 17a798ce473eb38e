"""Tracking backends (offline), trajectory records, the inspect printer and throughput figures."""
import glob
import json
import re
import struct

import ml_collections
import numpy as np
import pytest

from configs.base import base_config
from spear_jax import inspect as run_inspect
from spear_jax import metrics, throughput, tracking, trajectories
from spear_jax.model import get_model_config
from spear_jax.rollout import Row


def _logging(**overrides) -> ml_collections.ConfigDict:
    logging = base_config().logging
    logging.update(overrides)
    return logging


def read_wandb_history(run_dir: str) -> list[dict]:
    """History records of an offline wandb run: its ``.wandb`` file is a LevelDB-style log
    (7-byte file header, then 32 KiB blocks of records with a 7-byte header: crc32, length,
    type 1 full / 2 first / 3 middle / 4 last) of ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pieces, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                records.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    return records


def test_check_backends_errors(monkeypatch):
    with pytest.raises(tracking.TrackingError, match="unknown"):
        tracking.check_backends(("jsonl", "neptune"))
    with pytest.raises(tracking.TrackingError, match="must include 'jsonl'"):
        tracking.check_backends(("tensorboard",))
    real_import = tracking.importlib.import_module

    def no_mlflow(name):
        if name == "mlflow":
            raise ImportError("No module named 'mlflow'")
        return real_import(name)

    monkeypatch.setattr(tracking.importlib, "import_module", no_mlflow)
    with pytest.raises(tracking.TrackingError, match=r"config.logging.backends.*pip install mlflow-skinny"):
        tracking.check_backends(("jsonl", "mlflow"))
    tracking.check_backends(base_config().logging.backends)  # the default needs neither package


@pytest.mark.parametrize("field, value, message", [
    ("backends", ("jsonl", "comet"), "config.logging.backends has unknown"),
    ("wandb_mode", "cloud", "config.logging.wandb_mode='cloud'"),
    ("trajectories_every", -1, "config.logging.trajectories_every=-1"),
    ("peak_flops", -1.0, "config.logging.peak_flops=-1.0"),
])
def test_run_config_names_the_logging_field(field, value, message):
    from spear_jax import run_config

    c = base_config()
    c.logging[field] = value
    with pytest.raises(run_config.ConfigError, match=re.escape(message)):
        run_config.validate(c)


def _write_run(tmp_path, backends):
    logging = _logging(backends=("jsonl",) + backends, run_name="unit", trajectories_every=1)
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False,
                                   backends=tracking.make_backends(logging, str(tmp_path), {"seed": 3}))
    writer.write(1, {"reward": 0.5, "loss": float("nan")})
    writer.write(2, {"reward": 1.25, "loss": 0.75, "rate": 0.5, "rate/coin": 1.0})
    writer.write(2, {"success_rate": 0.5}, split="eval")
    writer.write_table(2, "trajectories", ["traj_id", "response"], [[0, "go | east"]])
    writer.close()
    return metrics.read_metrics(str(tmp_path))


def test_wandb_offline_run_holds_the_jsonl_scalars(tmp_path):
    records = _write_run(tmp_path, ("wandb",))
    history = read_wandb_history(str(tmp_path))
    logged = {(h["_step"], k): v for h in history for k, v in h.items() if not k.startswith("_")}
    for record in records:
        for name, value in record.items():
            if name not in ("step", "split", "time") and value is not None:
                assert logged[(record["step"], f"{record['split']}/{name}")] == pytest.approx(value)
    assert ("train/loss" not in {k for (s, k) in logged if s == 1})  # NaN stays out, as in TensorBoard
    assert glob.glob(f"{tmp_path}/wandb/offline-run-*/files/media/table/trajectories_2_*.table.json")
    assert (tmp_path / "wandb_run_id").read_text()


def test_mlflow_file_store_holds_the_jsonl_scalars(tmp_path):
    from mlflow.tracking import MlflowClient

    records = _write_run(tmp_path, ("mlflow",))
    client = MlflowClient(tracking.default_mlflow_uri(str(tmp_path)))
    run_id = (tmp_path / "mlflow_run_id").read_text()
    for split, name in (("train", "reward"), ("train", "loss"), ("eval", "success_rate"), ("train", "rate"),
                        ("train", "rate/coin")):
        expected = metrics.curves(records, name, split)
        # a file store holds each metric as a file: "rate" and "rate/coin" cannot both be paths
        history = client.get_metric_history(run_id, f"{split}/{name.replace('/', '.')}")
        assert ([m.step for m in history], [m.value for m in history]) == expected
    table = json.loads(open(client.download_artifacts(run_id, "trajectories/step_000002.json")).read())
    assert table == {"columns": ["traj_id", "response"], "data": [[0, "go | east"]]}
    assert client.get_run(run_id).info.status == "FINISHED"


def _row(step_index, response, rollout_mask, reward, traj_id=1):
    response = np.asarray(response, np.int32)
    return Row(prompt_ids=np.asarray([1, 2], np.int32), response_ids=response,
               loss_mask=np.asarray(rollout_mask, np.int8), logprobs=np.zeros(len(response), np.float32),
               group_id=0, traj_id=traj_id, step_index=step_index, reward=reward, action_valid=step_index == 0,
               num_tool_calls=1, anchor_obs=f"obs{step_index}", response_text="", finish_reason="stop",
               overlong=False, incomplete=False, task_id=7, task_type="coin", episode_length=2,
               episode_return=1.0, won=step_index == 1)


def _decode(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def test_episode_records_segments_flags_and_masks():
    rows = [_row(1, [3, 4, 5, 6], [1, 0, 0, 1], 1.0), _row(0, [7, 8], [1, 1], 0.0)]
    # packed rows: prompt of 2 then the response; row 0's last model token lost its loss
    loss_mask = np.array([[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32)
    batch = {"prompt_length": np.array([2, 2]), "loss_mask": loss_mask, "row_advantage": np.array([0.5, -0.5])}
    flags = {"incomplete": np.array([False, True]), "overlong": np.array([False, False]),
             "repetitive": np.array([False, False]), "unreadable": np.array([False, False])}
    (record,) = trajectories.episode_records(3, rows, np.array([1.1, 0.1]), flags, batch, [1], _decode)
    assert record["won"] and record["task_id"] == 7
    first, second = record["turns"]
    assert [t["step_index"] for t in record["turns"]] == [0, 1]
    assert first["masked"] and first["flags"]["incomplete"] and not first["flags"]["invalid_action"]
    assert first["advantage"] == -0.5 and first["shaped_reward"] == pytest.approx(0.1)
    assert first["segments"] == [{"role": "assistant", "text": "hi", "trained": False}]
    assert second["segments"] == [{"role": "assistant", "text": "d", "trained": True},
                                  {"role": "observation", "text": "ef", "trained": False},
                                  {"role": "assistant", "text": "g", "trained": False}]
    assert second["trained_tokens"] == 1 and not second["masked"] and second["flags"]["invalid_action"]
    assert trajectories.plain_response(second["segments"]) == "d[[obs]]ef[[/obs]][[masked]]g[[/masked]]"


def test_inspect_prints_a_saved_step_with_and_without_colour(tmp_path, capsys):
    rows = [_row(0, [3, 4, 5], [1, 0, 1], 1.0)]
    batch = {"prompt_length": np.array([2]), "loss_mask": np.array([[0, 0, 1, 0, 1]], np.float32),
             "row_advantage": np.array([0.25])}
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=True)
    logger = trajectories.TrajectoryLogger(str(tmp_path), writer, _decode, every=5, per_step=2)
    assert logger.record(4, rows, np.array([1.0]), {}, batch, np.random.default_rng(0)) == []
    assert len(logger.record(5, rows, np.array([1.0]), {}, batch, np.random.default_rng(0))) == 1
    writer.close()
    (events,) = glob.glob(f"{tmp_path}/tensorboard/events.out.tfevents.*")
    assert b"d[[obs]]e[[/obs]]f" in open(events, "rb").read()  # the TensorBoard text table
    assert run_inspect.main(["--workdir", str(tmp_path), "--step", "5", "--color", "never"]) == 0
    plain = capsys.readouterr().out
    assert "\033[" not in plain
    assert "[user] bc" in plain and "[assistant] d[[obs]]e[[/obs]]f" in plain and "advantage=+0.25" in plain
    assert run_inspect.main(["--workdir", str(tmp_path), "--step", "5", "--color", "always"]) == 0
    coloured = capsys.readouterr().out
    assert run_inspect.STYLES["observation"] + "[[obs]]e[[/obs]]" in coloured
    assert run_inspect.STYLES["assistant"] + "d" in coloured
    assert run_inspect.main(["--workdir", str(tmp_path), "--step", "6"]) == 2
    assert run_inspect.main(["--workdir", str(tmp_path)]) == 0
    assert "saved trajectory steps: 5" in capsys.readouterr().out


def test_throughput_formulas_and_peak():
    cfg = get_model_config("tiny")
    q = cfg.num_heads * cfg.head_dim
    # the training count is 3x the forward count at equal context, both with their attention terms
    weights = (cfg.num_layers * (cfg.hidden_size * q * 2 + 2 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim
                                 + 3 * cfg.hidden_size * cfg.intermediate_size) + cfg.hidden_size * cfg.vocab_size)
    assert throughput.train_flops_per_token(cfg, 10) == 6 * weights + 6 * cfg.num_layers * 10 * q
    assert throughput.train_flops_per_token(cfg, 10, frozen_weights=True) == 4 * weights + 6 * cfg.num_layers * 10 * q
    valid = np.zeros((2, 8), bool)
    valid[0, :5] = valid[1, :3] = True
    update = throughput.update_metrics(cfg, valid, epochs=2, seconds=0.5, peak=1e12)
    assert update["perf/update_tokens"] == 16 and update["perf/update_tokens_per_s"] == 32
    assert update["perf/update_mfu"] == pytest.approx(throughput.train_flops_per_token(cfg, 8) * 32 / 1e12)
    decode = throughput.decode_metrics(cfg, [4, 6], [3, 2], [3, 1], seconds=2.0, peak=1e12)
    assert decode["perf/decode_tokens_per_s"] == 2.0
    flops = 3 * throughput.decode_flops_per_token(cfg, 7) + throughput.decode_flops_per_token(cfg, 8)
    assert decode["perf/decode_mfu"] == pytest.approx(flops / 2.0 / 1e12)
    assert throughput.decode_metrics(cfg, [4], [3], [3], seconds=0.0, peak=1.0) == {}
    assert throughput.run_peak_flops(2e12, "gpu", 4) == 8e12
    assert throughput.run_peak_flops(0.0, "cpu", 8, measure=lambda: 5e10) == 5e10
    assert throughput.run_peak_flops(0.0, "gpu", 2, measure=lambda: 5e10) == 1e11
    assert throughput.matmul_peak_flops(128) > 0
