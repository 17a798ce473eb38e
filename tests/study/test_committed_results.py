"""The committed studies (``results/<study>/``): ``results.md`` and ``results.json`` regenerate
byte for byte from the committed study config and compact metrics, every run in them ran the
study's whole budget, and the metrics stay compact."""
import json
import os
import shutil

import pytest

from spear_jax.study import report
from spear_jax.study.__main__ import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results")
STUDIES = ("twx_methods", "twx_ablations", "math_methods")
GENERATED = ("results.md", "results.json")


@pytest.mark.parametrize("study", STUDIES)
def test_the_report_regenerates_byte_for_byte(tmp_path, study):
    committed = os.path.join(RESULTS, study)
    folder = tmp_path / study
    shutil.copytree(committed, folder, ignore=shutil.ignore_patterns(*GENERATED, "figures"))
    assert main(["--report", str(folder)]) == 0
    for name in GENERATED:
        with open(os.path.join(committed, name), "rb") as handle:
            assert (folder / name).read_bytes() == handle.read(), f"{study}/{name} differs from its metrics"
    assert sorted(os.listdir(folder / "figures")) == sorted(os.listdir(os.path.join(committed, "figures")))


@pytest.mark.parametrize("study", STUDIES)
def test_every_committed_run_evaluated_over_the_whole_budget(study):
    folder = os.path.join(RESULTS, study)
    results = json.loads(open(os.path.join(folder, "results.json"), encoding="utf-8").read())
    budget = results["budget"]
    expected_steps = list(range(0, budget["total_steps"] + 1, budget["eval_every"]))
    runs = [(name, record) for name, entry in results["methods"].items() for record in entry["seeds"]]
    assert runs, f"{study}: no finished run committed"
    for name, record in runs:
        assert record["eval_steps"] == expected_steps, (name, record["seed"])
        train = [r for r in report.load_records(folder)[name][record["seed"]] if r["split"] == "train"]
        assert [r["step"] for r in train] == list(range(1, budget["total_steps"] + 1)), (name, record["seed"])
    # every method's seeds share a warm start: the same held-out success before any RL step
    step0 = {}
    for _, record in runs:
        step0.setdefault(record["seed"], set()).add(record["eval_success"][0])
    assert all(len(values) == 1 for values in step0.values()), step0


def test_the_committed_metrics_are_compact():
    total = sum(os.path.getsize(os.path.join(root, name))
                for study in STUDIES for root, _, names in os.walk(os.path.join(RESULTS, study)) for name in names)
    assert total < 8 * 2**20, f"results/ holds {total / 2**20:.1f} MiB"


@pytest.mark.parametrize("study", STUDIES)
def test_the_docs_show_the_committed_headline_table(study):
    """README.md and docs/results.md hold the table ``--report ... --docs`` writes from the results."""
    results = json.loads(open(os.path.join(RESULTS, study, "results.json"), encoding="utf-8").read())
    start, end = report.marked_block(study)
    found = 0
    for doc in ("README.md", os.path.join("docs", "results.md")):
        text = open(os.path.join(RESULTS, "..", doc), encoding="utf-8").read()
        if start in text:
            found += 1
            assert text.split(start + "\n", 1)[1].split("\n" + end, 1)[0] == report.headline_table(results), doc
    assert found, f"no document shows the {study} table"
