import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spear_jax import checkpoint


def _mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _device_state():
    sharding = jax.sharding.NamedSharding(_mesh(), jax.sharding.PartitionSpec("data", None))
    params = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), sharding), "b": jnp.ones(3)}
    opt_state = optax.adamw(1e-3).init(params)
    return {"params": params, "opt_state": opt_state}


def _host_state():
    return {
        "replay": {
            "input_ids": np.zeros((0, 16), np.int32),  # empty buffer: zero-size arrays
            "scores": np.array([1.5, -2.0], np.float32),
            "entries": {},
        },
        "rng": np.array([7, 11], np.uint32),
        "step": np.array(12, np.int64),
    }


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_host_arrays_round_trip_exactly():
    tree = _host_state()
    restored = checkpoint.unpack_host_arrays(checkpoint.pack_host_arrays(tree))
    assert restored.keys() == tree.keys()
    assert restored["replay"]["entries"] == {}
    assert restored["replay"]["input_ids"].shape == (0, 16)
    _assert_trees_equal(restored, tree)


@pytest.mark.parametrize("bad", [{"a/b": np.ones(1)}, {"": np.ones(1)}, {"x": np.array([object()])}])
def test_host_arrays_reject_bad_entries(bad):
    with pytest.raises((ValueError, TypeError)):
        checkpoint.pack_host_arrays(bad)


def test_save_restore_keeps_values_and_sharding(tmp_path):
    ckpt = checkpoint.RunCheckpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    device = _device_state()
    ckpt.save(5, checkpoint.RunState(device=device, host=_host_state(), meta={"step": 5, "kappa": 0.5}))
    restored = ckpt.restore(device)
    _assert_trees_equal(restored.device, device)
    assert restored.device["params"]["w"].sharding.is_equivalent_to(device["params"]["w"].sharding, 2)
    _assert_trees_equal(restored.host, _host_state())
    assert restored.meta == {"step": 5, "kappa": 0.5}
    ckpt.close()


def test_keeps_only_the_newest_and_resumes_latest(tmp_path):
    ckpt = checkpoint.RunCheckpointer(str(tmp_path), max_to_keep=2)
    device = _device_state()
    for step in (1, 2, 3):
        ckpt.save(step, checkpoint.RunState(device=device, host={"s": np.array(step)}, meta={"step": step}))
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()
    reopened = checkpoint.RunCheckpointer(str(tmp_path), max_to_keep=2)
    assert reopened.latest_step() == 3
    assert int(reopened.restore(device).host["s"]) == 3
    reopened.close()


def test_incomplete_save_is_not_the_latest(tmp_path):
    ckpt = checkpoint.RunCheckpointer(str(tmp_path), max_to_keep=3)
    device = _device_state()
    ckpt.save(1, checkpoint.RunState(device=device, host={}, meta={"step": 1}))
    ckpt.close()
    # A run killed while writing step 2 leaves only orbax's temporary directory behind.
    os.makedirs(tmp_path / "2.orbax-checkpoint-tmp-123" / "device")
    reopened = checkpoint.RunCheckpointer(str(tmp_path), max_to_keep=3)
    assert reopened.latest_step() == 1
    reopened.close()


def test_restore_errors_are_clear(tmp_path):
    ckpt = checkpoint.RunCheckpointer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore(_device_state())
    ckpt.save(1, checkpoint.RunState(device=_device_state(), host={}, meta={}))
    with pytest.raises(FileNotFoundError, match="available: \\[1\\]"):
        ckpt.restore(_device_state(), step=4)
    with pytest.raises(ValueError, match="max_to_keep"):
        checkpoint.RunCheckpointer(str(tmp_path / "other"), max_to_keep=0)
    ckpt.close()
