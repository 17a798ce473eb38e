"""bench.rl_step: the step's parts (the trainer's own laps and rollout timers) cover the step,
sub-parts add up to their phase, and the device parts' token counts match the trainer's."""
import jax
import jax.numpy as jnp
import pytest

from bench import rl_step

MINIMAL = ["data.train_tasks_per_step=2", "data.group_size=2", "data.eval_episodes=2", "env.max_steps=3",
           "env.history_length=0", "rollout.max_response_length=16", "actor.loss_agg_max_response_length=16",
           "actor.ppo_mini_batch_size=16", "actor.ppo_micro_batch_size=8", "logging.peak_flops=1e12"]


def _children(parent):
    return [label for label, _, p in rl_step.PARTS if p == parent]


def test_part_seconds_take_the_rest_of_the_rollout_as_host_and_of_the_step_as_other():
    metrics = {"time/rollout": 5.0, "rollout/sampler_time_s": 3.0, "rollout/env_time_s": 1.5,
               "time/prepare": 2.0, "time/update": 4.0, "time/replay": 1.0, "time/buffer": 0.25,
               "time/step": 12.5}
    seconds = rl_step.part_seconds(metrics)
    assert seconds["host"] == pytest.approx(0.5)
    assert seconds["other"] == pytest.approx(0.25)
    assert sum(seconds[p] for p in rl_step.TOP_LEVEL) == pytest.approx(12.5)


def test_compile_counter_sees_a_new_shape_and_not_a_cached_one():
    double, x = jax.jit(lambda x: 2 * x), jnp.ones(3)
    with rl_step.compile_counter() as compiles:
        double(x).block_until_ready()
    assert len(compiles) == 1 and compiles[0] > 0
    with rl_step.compile_counter() as compiles:
        double(x).block_until_ready()
    assert compiles == []


def test_load_config_applies_overrides_and_names_a_malformed_one():
    config = rl_step.load_config("configs/spear.py:twx_tiny", ["data.group_size=3", "env.kwargs.game=coin"])
    assert config.data.group_size == 3 and config.env.kwargs.game == "coin"
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        rl_step.load_config("configs/spear.py:twx_tiny", ["data.group_size"])


@pytest.mark.slow
def test_minimal_run_table_parts_sum_to_the_step(tmp_path, capsys):
    args = [arg for item in MINIMAL for arg in ("--set", item)]
    record = rl_step.main(["--steps", "1", "--warmup", "1", *args])
    step = record["step"]
    top = sum(record[f"s/{p}"] for p in rl_step.TOP_LEVEL if p != "other")
    assert top == pytest.approx(step, rel=0.02, abs=0.02)  # the laps cover the step
    for parent in ("rollout", "prepare", "replay"):
        assert sum(record[f"s/{c}"] for c in _children(parent)) == pytest.approx(record[f"s/{parent}"], abs=1e-6)
    assert record["s/host"] >= 0 and record["s/decode"] > 0 and record["s/old_logprobs"] > 0
    # one policy pass (no reference) over the batch the update then trains once (ppo_epochs = 1)
    assert record["tokens/old_logprobs"] == pytest.approx(record["tokens/update"])
    lines = capsys.readouterr().out.splitlines()
    table = {line[:22].strip(): float(line[22:31]) for line in lines if line[:22].strip() in rl_step.TOP_LEVEL}
    summed = next(float(line[22:31]) for line in lines if line.startswith("step (sum of parts)"))
    measured = next(float(line[22:31]) for line in lines if line.startswith("step (time/step)"))
    assert set(table) == set(rl_step.TOP_LEVEL)
    assert sum(table.values()) == pytest.approx(measured, abs=0.01) and summed == pytest.approx(measured, abs=0.01)
