import json
import math
import os

import pytest

from spear_jax import metrics


def test_jsonl_records_and_nonfinite_values(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=True)
    writer.write(1, {"reward": 1.5, "loss": float("nan")})
    writer.write(2, {"reward": 2.5, "loss": 0.25})
    writer.write(2, {"success": 0.75}, split="eval")
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: no NaN literals
    assert records[0]["loss"] is None and records[0]["reward"] == 1.5
    assert metrics.curves(records, "loss") == ([2], [0.25])
    assert metrics.curves(records, "success", "eval") == ([2], [0.75])
    assert os.listdir(tmp_path / "tensorboard")


def test_resumed_step_last_record_wins(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write(3, {"reward": 1.0})
    writer.write(3, {"reward": 4.0})
    writer.close()
    assert metrics.curves(metrics.read_metrics(str(tmp_path)), "reward") == ([3], [4.0])


def test_reserved_names_rejected(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    with pytest.raises(ValueError, match="reserved"):
        writer.write(1, {"step": 3.0})
    writer.close()


def test_plot_run_writes_pngs(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    for step in range(5):
        writer.write(step, {"reward": math.sin(step)})
        writer.write(step, {"success": step / 5}, split="eval")
    writer.close()
    paths = metrics.plot_run(str(tmp_path), ["reward", "success", "absent"])
    assert [os.path.basename(p) for p in paths] == ["curve_reward.png", "curve_success.png"]
    for path in paths:
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_progress_summary_and_bar(capsys):
    summary = metrics.progress_summary({"success_rate": 0.53125, "time/step": 12.3456, "actor/loss": 1.0})
    assert summary == {"success": "0.531", "s/step": "12.3"}
    bar = metrics.progress_bar(4, initial=1, desc="spear")
    bar.set_postfix(summary, refresh=False)
    bar.update()
    bar.close()
    err = capsys.readouterr().err
    assert "spear" in err and "2/4" in err and "success=0.531" in err


def _tensorboard_scalars(logdir):
    """What TensorBoard shows: (tag, step) -> value over the event files in name order, applying
    its purge rule (a ``SessionLog.START`` at step s hides every earlier event of step >= s)."""
    import struct

    from tensorboardX.proto import event_pb2

    shown = {}
    for name in sorted(os.listdir(logdir)):
        data = (logdir / name).read_bytes()
        position = 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
            position += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                shown = {key: value for key, value in shown.items() if key[1] < event.step}
            for value in event.summary.value:
                assert (value.tag, event.step) not in shown, f"duplicate point {value.tag} at {event.step}"
                shown[(value.tag, event.step)] = value.simple_value
    return shown


def test_resume_discards_records_after_the_restored_step(tmp_path):
    """A run killed after writing steps 1-4 resumes from its step-2 checkpoint and writes steps
    3-4 again: each step appears once, with the new values, in metrics.jsonl and TensorBoard."""
    first = metrics.MetricsWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        first.write(step, {"reward": float(step)})
        first.write(step, {"success": 0.5}, split="eval")
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "split": "tr')  # a write cut by the kill
    resumed = metrics.MetricsWriter(str(tmp_path))
    assert resumed.discard_from(3) == 5
    for step in (3, 4):
        resumed.write(step, {"reward": 10.0 * step})
    resumed.close()
    records = metrics.read_metrics(str(tmp_path))
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (1, "eval"), (2, "train"),
                                                         (2, "eval"), (3, "train"), (4, "train")]
    assert [r["reward"] for r in records if r["split"] == "train"] == [1.0, 2.0, 30.0, 40.0]
    shown = _tensorboard_scalars(tmp_path / "tensorboard")
    assert {k: v for k, v in shown.items() if k[0] == "train/reward"} == {
        ("train/reward", 1): 1.0, ("train/reward", 2): 2.0, ("train/reward", 3): 30.0,
        ("train/reward", 4): 40.0}
    assert sorted(step for tag, step in shown if tag == "eval/success") == [1, 2]


def test_fresh_start_discards_every_record(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write(0, {"success": 0.1}, split="eval")
    writer.write(1, {"reward": 1.0})
    writer.close()
    again = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    assert again.discard_from(0) == 2
    again.write(0, {"success": 0.2}, split="eval")
    again.close()
    assert [r["success"] for r in metrics.read_metrics(str(tmp_path))] == [0.2]
