"""scripts/compare_metrics.py: equal runs compare identical, any non-timing change is reported."""
import importlib.util
import json
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "compare_metrics.py"
_spec = importlib.util.spec_from_file_location("compare_metrics", _PATH)
compare_metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_metrics)


def _run(tmp_path, name, records):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(run)


_BASE = [{"step": 0, "split": "eval", "success_rate": 0.25, "time/eval": 3.0},
         {"step": 1, "split": "train", "actor/loss": 0.5, "time": 1.0, "rollout/sampler_time_s": 2.0,
          "perf/update_tokens_per_s": 9.0, "perf/update_tokens": 100.0}]


def test_timing_keys_are_ignored_and_equal_runs_are_identical(tmp_path, capsys):
    other = [dict(r) for r in _BASE]
    other[1].update({"time": 7.0, "rollout/sampler_time_s": 5.0, "perf/update_tokens_per_s": 1.0})
    other[0]["time/eval"] = 9.0
    assert compare_metrics.main([_run(tmp_path, "a", _BASE), _run(tmp_path, "b", other)]) == 0
    assert capsys.readouterr().out.strip().endswith("identical=true records=2 values=3")


def test_a_changed_value_missing_key_or_missing_record_is_reported(tmp_path, capsys):
    other = [dict(_BASE[0]), dict(_BASE[1], **{"actor/loss": 0.5000001, "perf/update_tokens": 100.0})]
    del other[0]["success_rate"]
    other.append({"step": 2, "split": "train", "actor/loss": 0.1})
    assert compare_metrics.main([_run(tmp_path, "a", _BASE), _run(tmp_path, "b", other)]) == 1
    out = capsys.readouterr().out
    assert "('eval', 0) success_rate: only in run A" in out
    assert "('train', 1) actor/loss: 0.5 != 0.5000001" in out
    assert "('train', 2): only in run B" in out and "identical=false" in out
    assert compare_metrics.main([_run(tmp_path, "c", _BASE[1:]), _run(tmp_path, "d", other[1:2]), "--rtol", "1e-6"]) == 0
