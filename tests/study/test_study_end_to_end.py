"""One real study, as a user runs it: 2 methods x 1 seed x 1 RL step of the tiny model, from a
recorded warm start, then the same command again (everything skipped) and ``--report``."""
import json
import os

import pytest

from spear_jax.study import scheduler
from spear_jax.study.__main__ import main

STUDY = '''
from configs.studies._common import method, study

SMALL = (("data.train_tasks_per_step", 2), ("data.group_size", 2), ("actor.ppo_mini_batch_size", 8),
         ("actor.ppo_micro_batch_size", 8), ("env.history_length", 0), ("env.max_steps", 2),
         ("rollout.max_response_length", 16), ("actor.loss_agg_max_response_length", 16))


def get_config():
    return study("e2e", "end to end", (0,), "drbot",
                 (method("drbot", "Dr.BoT", "configs/drbot.py:twx_tiny"),
                  method("spear", "Dr.BoT + SPEAR", "configs/spear.py:twx_tiny,drbot")),
                 "configs/sft.py:twx_tiny", "gold", total_steps=1, eval_every=1, eval_episodes=8,
                 overrides=SMALL, warm_start_overrides=(("sft.episodes", 4), ("sft.steps", 3), ("sft.batch_size", 8)))
'''


@pytest.mark.slow
def test_a_tiny_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    study_file, workdir, results = tmp_path / "e2e.py", tmp_path / "study", tmp_path / "results"
    study_file.write_text(STUDY)
    argv = [f"--study={study_file}", f"--workdir={workdir}", "--parallel=2", f"--results={results}"]
    assert main(argv) == 0
    assert (workdir / "warm_start_data" / "seed0.jsonl").is_file()
    data = json.loads((results / "results.json").read_text())
    assert list(data["methods"]) == ["drbot", "spear"]
    for name in ("drbot", "spear"):
        (record,) = data["methods"][name]["seeds"]
        assert record["seed"] == 0 and record["eval_steps"] == [0, 1]
        assert (results / "metrics" / name / "seed0.jsonl").is_file()
        config = json.loads((workdir / "runs" / name / "seed0" / "config.json").read_text())
        assert config["trainer"]["init_from"] == os.path.abspath(workdir / "warm_start" / "seed0")
    # one warm start for both: the same held-out success before any RL step
    assert data["methods"]["drbot"]["seeds"][0]["eval_success"][0] == data["methods"]["spear"]["seeds"][0]["eval_success"][0]
    assert data["methods"]["spear"]["vs_baseline"]["final"]["seeds"] == [0]
    written = {name: (results / name).read_bytes() for name in ("results.md", "results.json")}

    def no_run(spec):
        raise AssertionError(f"{spec.name} ran again")

    monkeypatch.setattr(scheduler, "subprocess_runner", no_run)
    assert main(argv) == 0  # a finished study: every run skipped
    assert main(["--report", str(results)]) == 0
    assert {name: (results / name).read_bytes() for name in written} == written
