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
