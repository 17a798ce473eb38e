"""Math datasets through tfds (no TensorFlow) and reasoning-gym procedural problems."""
import hashlib
import importlib.util
import json
import os
import sys

import pytest

from environments.math_data import (BUNDLED_DIR, FieldMap, ProceduralProblems, bundled_math_builder,
                                    load_problems, math_file_builder)


def test_tensorflow_is_not_needed(tmp_path):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("tensorflow is installed here; this checks the TensorFlow-free path")
    assert len(load_problems(bundled_math_builder("aime2024", str(tmp_path)), "test")) == 30
    assert "tensorflow" not in sys.modules


def test_bundled_copies_match_provenance_checksums():
    provenance = open(os.path.join(BUNDLED_DIR, "PROVENANCE.md")).read()
    for name in ("aime2024", "aime2025", "math500", "gsm8k_test"):
        with open(os.path.join(BUNDLED_DIR, f"{name}.jsonl"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() in provenance, name


@pytest.mark.parametrize("name, count", [("aime2024", 30), ("aime2025", 30), ("math500", 500)])
def test_bundled_sets_load_completely_and_faithfully(tmp_path, name, count):
    problems = load_problems(bundled_math_builder(name, str(tmp_path)), "test")
    with open(os.path.join(BUNDLED_DIR, f"{name}.jsonl")) as f:
        originals = {r["id"]: r for r in map(json.loads, f)}
    assert len(problems) == count == len(originals)
    for p in problems:
        assert (p.problem, p.answer, p.source) == (originals[p.id]["problem"], originals[p.id]["answer"], name)


def test_host_shards_are_disjoint_and_cover_the_split(tmp_path):
    builder = bundled_math_builder("aime2025", str(tmp_path))
    shards = [load_problems(builder, "test", i, 4) for i in range(4)]
    ids = [p.id for shard in shards for p in shard]
    assert sorted(len(s) for s in shards) == [7, 7, 8, 8]
    assert len(ids) == len(set(ids)) == 30
    assert [p.id for p in load_problems(builder, "test")] == ids  # contiguous, in order
    assert len(load_problems(builder, "test[:10]")) == 10


def test_bad_shard_and_split_arguments(tmp_path):
    builder = bundled_math_builder("aime2024", str(tmp_path))
    with pytest.raises(ValueError, match="shard_index"):
        load_problems(builder, "test", 4, 4)
    with pytest.raises(ValueError, match="shard_count"):
        load_problems(builder, "test", 0, 0)
    with pytest.raises(ValueError, match="unknown split 'train'"):
        load_problems(builder, "train")
    with pytest.raises(ValueError, match="unknown bundled math set"):
        bundled_math_builder("aime1999", str(tmp_path))


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_user_jsonl_with_dapo_style_fields(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"What is {i}+{i}?"}],
             "reward_model": {"ground_truth": str(2 * i), "style": "rule"}} for i in range(12)]
    _write_jsonl(tmp_path / "dapo.jsonl", rows[:10])
    _write_jsonl(tmp_path / "dapo_val.jsonl", rows[10:])
    builder = math_file_builder({"train": str(tmp_path / "dapo.jsonl"), "validation": str(tmp_path / "dapo_val.jsonl")},
                                str(tmp_path / "tfds"), FieldMap(prompt="prompt", answer="reward_model.ground_truth", id=None))
    train = load_problems(builder, "train")
    assert len(train) == 10 and len(load_problems(builder, "validation")) == 2
    by_id = {p.id: p for p in train}
    assert by_id["dapo-3"].problem == "What is 3+3?" and by_id["dapo-3"].answer == "6"


def test_user_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"question": ["1+1?", "2+2?"], "label": [2, 4]}), tmp_path / "p.parquet")
    builder = math_file_builder({"train": str(tmp_path / "p.parquet")}, str(tmp_path / "tfds"),
                                FieldMap(prompt="question", answer="label", id=None))
    assert sorted((p.problem, p.answer) for p in load_problems(builder, "train")) == [("1+1?", "2"), ("2+2?", "4")]


def test_changed_file_is_prepared_again(tmp_path):
    path = tmp_path / "m.jsonl"
    _write_jsonl(path, [{"id": "a", "problem": "p", "answer": "1"}])
    first = math_file_builder({"test": str(path)}, str(tmp_path / "tfds"))
    _write_jsonl(path, [{"id": "a", "problem": "p", "answer": "1"}, {"id": "b", "problem": "q", "answer": "2"}])
    second = math_file_builder({"test": str(path)}, str(tmp_path / "tfds"))
    assert first.builder_config.name != second.builder_config.name
    assert len(load_problems(second, "test")) == 2


def test_bad_files_and_fields_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="files\\['train'\\]"):
        math_file_builder({"train": str(tmp_path / "missing.jsonl")}, str(tmp_path))
    _write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(Exception, match="field 'problem'"):
        math_file_builder({"train": str(tmp_path / "x.jsonl")}, str(tmp_path / "tfds"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        math_file_builder({"train": str(tmp_path / "x.csv")}, str(tmp_path / "tfds2"))


def test_procedural_problems_are_deterministic_and_sharded():
    full = ProceduralProblems("gsm_symbolic", seed=7, size=8)
    again = ProceduralProblems("gsm_symbolic", seed=7, size=8)
    other = ProceduralProblems("gsm_symbolic", seed=8, size=8)
    assert [p.problem for p in full] == [p.problem for p in again]
    assert [p.problem for p in full] != [p.problem for p in other]
    odd = ProceduralProblems("gsm_symbolic", seed=7, size=8, shard_index=1, shard_count=2)
    assert [p.id for p in odd] == [f"gsm_symbolic-{i}" for i in (1, 3, 5, 7)]
    assert [p.problem for p in odd] == [full[i].problem for i in (1, 3, 5, 7)]


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum", "gsm_symbolic"])
def test_procedural_grading_with_the_generators_scorer(name):
    problems = ProceduralProblems(name, seed=0, size=4)
    p = problems[2]
    assert problems.grade(f"so \\boxed{{{p.answer}}}", p).correct
    wrong = problems.grade(f"\\boxed{{{p.answer}1}}", p)
    assert not wrong.correct and wrong.score == -1.0
    assert problems.grade("no box", p).incomplete


def test_procedural_bad_name():
    with pytest.raises(ValueError, match="no_such_task"):
        ProceduralProblems("no_such_task", seed=0, size=2)
