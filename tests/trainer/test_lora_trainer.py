"""LoRA through the run config and the trainer: validation of config.model.lora, a short LoRA
run whose optimizer state is adapter-sized and whose base weights stay frozen, exact resume."""
import importlib
import math

import jax
import numpy as np
import pytest

from spear_jax import run_config
from spear_jax.model import lora
from spear_jax.policy import load_policy
from spear_jax.run_config import ConfigError
from spear_jax.sharding import make_mesh
from spear_jax.trainer import Trainer
from tests.trainer.test_trainer import RandomAdmissibleSampler, _coin, _config, _run, _timed, _train_records


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("field, value, message", [
    ("rank", -2, "config.model.lora.rank"),
    ("alpha", 0.0, "config.model.lora.alpha"),
    ("targets", ("q", "qkv"), "config.model.lora.targets"),
    ("targets", (), "config.model.lora.targets"),
    ("targets", ("q", "q"), "config.model.lora.targets"),
])
def test_bad_lora_fields_are_named(field, value, message):
    c = importlib.import_module("configs.grpo").get_config("twx_tiny")
    c.model.lora.rank = 4
    setattr(c.model.lora, field, value)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        run_config.validate(c, num_devices=8)


def _lora_config(steps, method="spear", preset="twx_tiny,grpo"):
    c = _coin(_config(method, preset, steps=steps))
    c.model.lora.rank, c.model.lora.alpha, c.model.lora.targets = 4, 8.0, ("q", "v", "o", "up", "down")
    c.actor.lr = 1e-3
    c.trainer.eval_before_train = False
    c.mesh.data, c.mesh.fsdp = 4, 2
    return c


@pytest.mark.slow
def test_lora_spear_run_trains_only_the_adapters(tmp_path):
    c = _lora_config(steps=2)
    trainer = Trainer(c, str(tmp_path))
    trainer.engine.sampler = RandomAdmissibleSampler(trainer.engine.tokenizer)
    start = jax.tree.map(np.asarray, trainer.policy.params)
    adapters = lora.trainable_params(trainer.policy.params)
    moments = [x for x in jax.tree.leaves(trainer.opt_state) if np.ndim(x) > 0]
    assert _size(moments) == 2 * _size(adapters) < _size(trainer.policy.params) / 10
    try:
        trainer.train()  # its final evaluation decodes with the merged adapters
        # the checkpoint holds the trained adapters; a fresh policy of the same config has B = 0
        restored = trainer.checkpointer.restore({"params": load_policy(c, trainer.mesh).params,
                                                 "opt_state": trainer.opt_state})
    finally:
        trainer.close()
    records = _train_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["actor/skipped"] == 0.0 and math.isfinite(r["actor/loss"]) for r in records)
    end_adapters, end_base = lora.split_trainable(trainer.policy.params)
    start_adapters, start_base = lora.split_trainable(start)
    for a, b in zip(jax.tree.leaves(start_base), jax.tree.leaves(end_base)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert any(not np.array_equal(a, np.asarray(b))
               for a, b in zip(jax.tree.leaves(start_adapters), jax.tree.leaves(end_adapters)))
    for a, b in zip(jax.tree.leaves(end_adapters), jax.tree.leaves(lora.trainable_params(restored.device["params"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_lora_resume_is_exact(tmp_path):
    _run(_lora_config(2, "grpo", "twx_tiny"), tmp_path / "full", random_admissible=True)
    _run(_lora_config(1, "grpo", "twx_tiny"), tmp_path / "resumed", random_admissible=True)
    _run(_lora_config(2, "grpo", "twx_tiny"), tmp_path / "resumed", random_admissible=True)
    first, full = _train_records(tmp_path / "full")
    resumed = _train_records(tmp_path / "resumed")[1]
    assert first["actor/grad_norm"] > 0  # step 2's log-probs see the adapters step 1 trained
    for key in [k for k in full if not _timed(k)]:
        assert full[key] == resumed[key], (key, full[key], resumed[key])


@pytest.mark.slow
def test_lora_warm_start_is_saved_merged_and_seeds_a_lora_run(tmp_path):
    from spear_jax import sft
    from spear_jax.model import forward
    from tests.trainer.test_sft_data import MESSAGES, write_jsonl

    c = importlib.import_module("configs.sft").get_config("math_tiny")
    c.unlock()
    record = {"messages": [{"role": r, "content": text} for r, text in MESSAGES]}
    c.sft.source, c.sft.data_path = "conversations", write_jsonl(tmp_path / "conv.jsonl", [record] * 3)
    c.sft.steps, c.sft.batch_size, c.sft.lr = 10, 8, 1e-2
    c.actor.ppo_micro_batch_size = 8
    c.model.lora.rank = 4
    run_config.validate(c, num_devices=8)
    sft.run_sft(c, str(tmp_path / "warm"))
    mesh = make_mesh(data=8)
    start = load_policy(c, mesh)  # random base + fresh adapters (B = 0)
    c.model.checkpoint_format, c.model.checkpoint_path = "orbax", str(tmp_path / "warm")
    warm = load_policy(c, mesh)  # the merged warm start as base + fresh adapters
    assert lora.has_adapters(warm.params)
    tokens = jax.numpy.arange(12, dtype=np.int32).reshape(1, 12)
    valid = jax.numpy.ones_like(tokens, bool)
    logits = [forward(p.graphdef, p.params, tokens, valid)[0] for p in (warm, start)]
    assert float(np.abs(logits[0] - logits[1]).max()) > 1e-3  # the trained adapters live on in the merged base
