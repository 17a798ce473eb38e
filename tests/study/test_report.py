"""The study report: results.json's numbers on hand-made metrics, and results.md / results.json
rewritten byte for byte from a committed results folder (``fixture_results/``)."""
import json
import os
import shutil

import pytest

from spear_jax.study import report, stats
from spear_jax.study.__main__ import main

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture_results")
STUDY = {
    "name": "fixture", "title": "A hand-made study", "seeds": [0, 1, 2, 3, 4], "baseline": "base",
    "budget": {"total_steps": 10, "eval_every": 5, "eval_episodes": 8}, "overrides": [],
    "warm_start": {"config": "configs/sft.py:twx_tiny", "data": "gold", "overrides": []},
    "methods": [{"name": "base", "label": "Base", "config": "configs/drbot.py:twx_tiny", "overrides": []},
                {"name": "spear", "label": "Base + SPEAR", "config": "configs/spear.py:twx_tiny,drbot",
                 "overrides": [["algorithm.use_toolcall_reward", "none"]]}],
}
# (method, seed) -> held-out success at steps 0, 5, 10; spear seed 2 is missing.
EVALS = {("base", 0): [0.2, 0.3, 0.4], ("base", 1): [0.1, 0.1, 0.2], ("base", 2): [0.3, 0.5, 0.4],
         ("base", 3): [0.15, 0.35, 0.3625], ("base", 4): [0.25, 0.2, 0.0875],
         ("spear", 0): [0.2, 0.5, 0.6], ("spear", 1): [0.1, 0.3, 0.3], ("spear", 3): [0.15, 0.45, 0.5125],
         ("spear", 4): [0.25, 0.3, 0.4375]}


def _records(method, seed):
    evals = [{"split": "eval", "step": step, "success_rate": value}
             for step, value in zip((0, 5, 10), EVALS[method, seed])]
    train = [{"split": "train", "step": step, "episode_return": step * 0.1 + seed, "actor/entropy": 1.0 - step * 0.01,
              **({"replay/sil_weight": step / 10} if method == "spear" else {})} for step in range(1, 11)]
    return evals + train


def make_fixture(directory):
    """Writes the fixture's study.json and compact metrics into ``directory``."""
    report.write_study_json(str(directory), STUDY)
    for method, seed in EVALS:
        path = report.compact_path(str(directory), method, seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.writelines(json.dumps(r, sort_keys=True) + "\n" for r in _records(method, seed))


def test_results_hold_the_known_per_seed_values_and_paired_differences(tmp_path):
    make_fixture(tmp_path)
    results = report.write_report(str(tmp_path))
    base, spear = results["methods"]["base"], results["methods"]["spear"]
    assert [r["seed"] for r in base["seeds"]] == [0, 1, 2, 3, 4] and [r["seed"] for r in spear["seeds"]] == [0, 1, 3, 4]
    assert spear["seeds"][0]["final"] == 0.6 and spear["seeds"][0]["best"] == 0.6
    assert spear["seeds"][0]["auc"] == pytest.approx((5 * 0.35 + 5 * 0.55) / 10)
    finals = [0.4, 0.2, 0.4, 0.3625, 0.0875]
    assert base["final"]["mean"] == pytest.approx(sum(finals) / 5)
    assert (base["final"]["ci_low"], base["final"]["ci_high"]) == stats.bootstrap_interval(finals)
    assert spear["vs_baseline"]["final"]["seeds"] == [0, 1, 3, 4]  # seed 2 only in the baseline
    assert spear["vs_baseline"]["final"]["values"] == pytest.approx([0.2, 0.1, 0.15, 0.35])
    assert spear["vs_baseline"]["best"]["mean"] == pytest.approx((0.2 + 0.1 + 0.15 + 0.1875) / 4)
    assert "vs_baseline" not in base
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert list(on_disk["methods"]) == ["base", "spear"] and on_disk["methods"]["spear"]["seeds"][1]["seed"] == 1
    text = (tmp_path / "results.md").read_text()
    assert "| Base + SPEAR | 4 | 0.462 [" in text and "Base + SPEAR seed 2" in text
    assert (tmp_path / "figures" / "eval_success_rate.png").is_file()
    assert (tmp_path / "figures" / "train_replay_sil_weight.png").is_file()
    assert not (tmp_path / "figures" / "train_tool_calls.png").exists()  # no run has it


def test_report_command_rewrites_the_committed_results_byte_for_byte(tmp_path):
    folder = tmp_path / "fixture"
    shutil.copytree(FIXTURE, folder)
    for name in ("results.md", "results.json"):
        (folder / name).unlink()
    assert main(["--report", str(folder)]) == 0
    for name in ("results.md", "results.json"):
        assert (folder / name).read_bytes() == open(os.path.join(FIXTURE, name), "rb").read(), name
    figures = {p.name: p.read_bytes() for p in (folder / "figures").iterdir()}
    assert main(["--report", str(folder)]) == 0
    assert figures == {p.name: p.read_bytes() for p in (folder / "figures").iterdir()}


def test_the_committed_fixture_is_the_hand_made_one(tmp_path):
    make_fixture(tmp_path)
    for path in ["study.json"] + [os.path.relpath(report.compact_path("", m, s)) for m, s in EVALS]:
        assert (tmp_path / path).read_bytes() == open(os.path.join(FIXTURE, path), "rb").read(), path


def test_report_without_a_study_json_is_an_error(tmp_path, capsys):
    assert main(["--report", str(tmp_path)]) == 2
    assert "no study.json" in capsys.readouterr().err


def test_compact_records_keep_the_report_keys_and_the_last_record_of_a_step():
    records = [{"split": "train", "step": 1, "actor/entropy": 2.0, "actor/loss": 5.0, "perf/mfu": 0.1},
               {"split": "eval", "step": 0, "success_rate": 0.25, "episodes": 8},
               {"split": "train", "step": 1, "actor/entropy": 1.5, "replay/sil_weight": None},
               {"split": "train", "step": 2, "replay/sil_weight": 0.5}]
    assert report.compact_records(records) == [
        {"split": "eval", "step": 0, "success_rate": 0.25},
        {"split": "train", "step": 1, "actor/entropy": 1.5},
        {"split": "train", "step": 2, "replay/sil_weight": 0.5}]


def test_docs_blocks_are_rewritten_with_the_headline_table(tmp_path, capsys):
    make_fixture(tmp_path / "results")
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n\nbefore\n<!-- results:fixture -->\nstale | table\n<!-- /results:fixture -->\nafter\n")
    assert main(["--report", str(tmp_path / "results"), "--docs", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Doc\n\nbefore\n<!-- results:fixture -->\n| method | seeds |") and text.endswith(
        "<!-- /results:fixture -->\nafter\n")
    assert "stale" not in text
    table = text.split("<!-- results:fixture -->\n")[1].split("\n<!-- /results:fixture -->")[0].splitlines()
    final_low, final_high = stats.bootstrap_interval([0.4, 0.2, 0.4, 0.3625, 0.0875])
    auc_low, auc_high = stats.bootstrap_interval([0.3, 0.125, 0.425, 0.303125, 0.184375])  # (a + 2b + c) / 4
    assert table[2] == (f"| Base | 5 | 0.290 [{final_low:.3f}, {final_high:.3f}] | "
                        f"0.267 [{auc_low:.3f}, {auc_high:.3f}] | (baseline) |")
    assert table[3].startswith("| Base + SPEAR | 4 | 0.462 [") and "| +0.200 [" in table[3]
    again = doc.read_text()
    assert main(["--report", str(tmp_path / "results"), "--docs", str(doc)]) == 0 and doc.read_text() == again
    plain = tmp_path / "plain.md"
    plain.write_text("no block\n")
    assert main(["--report", str(tmp_path / "results"), "--docs", str(plain)]) == 2
    assert "no <!-- results:fixture --> ... <!-- /results:fixture --> block" in capsys.readouterr().err


def test_a_method_with_a_base_is_also_paired_against_it(tmp_path):
    """``base``: the paired differences against that method too, in results.json and in a table
    of results.md; a base that is not another method is a study config error."""
    make_fixture(tmp_path)
    study = json.loads((tmp_path / "study.json").read_text())
    study["methods"][1]["base"] = "base"
    report.write_study_json(str(tmp_path), study)
    results = report.write_report(str(tmp_path))
    spear = results["methods"]["spear"]
    assert spear["base"] == "base" and spear["vs_base"] == spear["vs_baseline"]
    assert spear["vs_base"]["final"]["values"] == pytest.approx([0.2, 0.1, 0.15, 0.35])
    assert "base" not in results["methods"]["base"]
    text = (tmp_path / "results.md").read_text()
    assert "## Paired differences against each method's base (same seeds)" in text
    assert "| Base + SPEAR | Base | 4 | +0.200 [" in text


def test_a_base_that_is_not_another_method_is_an_error():
    from configs.studies._common import method, study
    from spear_jax.study import spec as study_spec

    for base in ("missing", "b"):
        config = study("toy", "toy", (0,), "a", (method("a", "A", "configs/drbot.py:twx_tiny"),
                                                 method("b", "B", "configs/spear.py:twx_tiny", base=base)),
                       "configs/sft.py:twx_tiny", "gold", 1, 1, 8)
        with pytest.raises(study_spec.StudyConfigError, match=f"method 'b' has base '{base}': it must be another"):
            study_spec.check_study(config, "toy.py")
