import os
import subprocess
import sys

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


# -- integrity: damaged checkpoints are refused and the previous complete one restored ------------

def _save_steps(directory, steps, max_to_keep=2):
    ckpt = checkpoint.RunCheckpointer(str(directory), max_to_keep=max_to_keep)
    for step in steps:
        device = jax.tree.map(lambda x: x + step, _device_state())
        ckpt.save(step, checkpoint.RunState(device=device, host={"s": np.array(step)}, meta={"step": step}))
    ckpt.close()


def _largest_file(step_dir):
    """The step's biggest file (the OCDBT data file holding params and optimizer state)."""
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names
             if name != checkpoint.MANIFEST_FILE]
    return max(files, key=os.path.getsize)


def _flip_bytes(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        chunk = handle.read(16)
        handle.seek(size // 2)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    assert os.path.getsize(path) == size


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate, os.remove])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
    _save_steps(tmp_path, (1, 2))
    damaged_file = _largest_file(tmp_path / "2")
    damage(damaged_file)
    ckpt = checkpoint.RunCheckpointer(str(tmp_path), max_to_keep=2)
    with caplog.at_level("WARNING"):
        restored = ckpt.restore(_device_state())
    assert restored.meta == {"step": 1} and int(restored.host["s"]) == 1
    _assert_trees_equal(restored.device, jax.tree.map(lambda x: x + 1, _device_state()))
    warning = caplog.text
    assert "step 2" in warning and os.path.relpath(damaged_file, tmp_path / "2") in warning
    assert "restoring checkpoint step 1" in warning
    # the damaged step is moved aside, so the resumed run can save that step again
    assert ckpt.all_steps() == [1] and os.listdir(tmp_path / checkpoint.REJECTED_SUBDIR)
    ckpt.save(2, checkpoint.RunState(device=_device_state(), host={}, meta={"step": 2}))
    assert ckpt.all_steps() == [1, 2] and ckpt.restore(_device_state()).meta == {"step": 2}
    ckpt.close()


def test_damaged_only_checkpoint_fails_naming_step_and_file(tmp_path):
    _save_steps(tmp_path, (3,))
    damaged_file = _largest_file(tmp_path / "3")
    _flip_bytes(damaged_file)
    ckpt = checkpoint.RunCheckpointer(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match=r"no intact checkpoint .*steps \[3\].*new workdir"):
        ckpt.restore(_device_state())
    ckpt.close()
    _save_steps(tmp_path / "again", (3,))
    _flip_bytes(_largest_file(tmp_path / "again" / "3"))
    ckpt = checkpoint.RunCheckpointer(str(tmp_path / "again"))
    with pytest.raises(checkpoint.CheckpointError, match="step 3 .*damaged.*sha256 mismatch"):
        ckpt.restore(_device_state(), step=3)
    ckpt.close()


def test_a_step_without_its_manifest_is_not_complete(tmp_path):
    """A kill after orbax finished step 2 but before its manifest was written: step 1 is the
    newest complete checkpoint, and saving step 2 again replaces the leftover."""
    _save_steps(tmp_path, (1, 2))
    os.remove(tmp_path / "2" / checkpoint.MANIFEST_FILE)
    ckpt = checkpoint.RunCheckpointer(str(tmp_path))
    assert ckpt.latest_step() == 1
    assert ckpt.restore(_device_state()).meta == {"step": 1}
    ckpt.save(2, checkpoint.RunState(device=_device_state(), host={}, meta={"step": 2}))
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()
    assert checkpoint.complete_steps(str(tmp_path)) == [1, 2]


def test_steps_without_any_manifest_are_not_silently_discarded(tmp_path):
    """Only steps that orbax finished but that have no manifest: a run must not start over (its
    retention would delete them); the error names the steps and the fix."""
    _save_steps(tmp_path, (1, 2))
    for step in (1, 2):
        os.remove(tmp_path / str(step) / checkpoint.MANIFEST_FILE)
    ckpt = checkpoint.RunCheckpointer(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match=r"steps \[1, 2\] but none with integrity.json.*rm -r"):
        ckpt.newest_intact_step()
    with pytest.raises(checkpoint.CheckpointError, match="none with integrity.json"):
        ckpt.restore(_device_state())
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


_WRITE_FAILURE_SCRIPT = """
import os, subprocess, sys, time
import jax.numpy as jnp, numpy as np
from spear_jax import checkpoint
directory, mode = sys.argv[1], sys.argv[2]
if mode == "full":  # a 1 MiB filesystem: step 1 fits, step 2 (4 MiB of params) does not
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", directory], check=True)
ckpt = checkpoint.RunCheckpointer(directory)
ckpt.save(1, checkpoint.RunState(device={"w": jnp.ones(4)}, host={}, meta={"step": 1}))
if mode == "read_only":
    subprocess.run(["mount", "--bind", directory, directory], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", directory], check=True)
start = time.time()
try:
    ckpt.save(2, checkpoint.RunState(device={"w": jnp.asarray(np.arange(1 << 20, dtype=np.float32))},
                                     host={}, meta={"step": 2}))
except Exception as error:
    print("RAISED", type(error).__name__, error)
print("SECONDS", time.time() - start)
print("STEPS", ckpt.all_steps())
ckpt.close()
"""


def _can_mount(tmp_path):
    probe = tmp_path / "mount_probe"
    probe.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                      capture_output=True).returncode != 0:
        return False
    subprocess.run(["umount", str(probe)], check=True)
    return True


@pytest.mark.parametrize("mode", ["read_only", "full"])
def test_write_failure_mid_run_raises_the_os_error_promptly(tmp_path, mode):
    """The checkpoint directory turns read-only (a read-only bind mount: root ignores file
    modes) or fills up (a 1 MiB tmpfs) mid-run: the save raises the real OS error at once, the
    previous step stays the newest, and the process exits without waiting on orbax's threads."""
    if not _can_mount(tmp_path):
        pytest.skip("needs permission to mount (root with CAP_SYS_ADMIN)")
    directory = tmp_path / "ckpt"
    directory.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run([sys.executable, "-c", _WRITE_FAILURE_SCRIPT, str(directory), mode],
                             cwd=repo, capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu"))
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = "Read-only file system" if mode == "read_only" else "No space left on device"
    assert f"RAISED CheckpointError saving checkpoint step 2" in out.stdout, out.stdout
    assert expected in out.stdout and "step 1, is untouched" in out.stdout
    assert float(out.stdout.split("SECONDS ")[1].split()[0]) < 10
    assert "STEPS [1]" in out.stdout
