"""bench.memory_plan: the optimizer-state layout it plans with, per-device shard bytes and the
table row (the compiles themselves run in ``python -m bench.memory_plan``)."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from bench import memory_plan
from spear_jax import sharding, train_step
from spear_jax.model import get_model_config
from spear_jax.policy import abstract_params


def test_adam_moments_are_laid_out_like_their_params_and_the_count_replicated():
    mesh = sharding.make_mesh(data=1, fsdp=8)
    _, params = abstract_params(get_model_config("tiny"), mesh)
    optimizer = train_step.make_optimizer(train_step.OptimizerConfig())
    opt_state = memory_plan.optimizer_layout(jax.eval_shape(optimizer.init, params), params, mesh)
    adam = opt_state[1][0]
    assert adam.mu["embed"].get_value().sharding.spec == PartitionSpec(None, "fsdp")
    assert adam.nu["blocks"]["mlp"]["up_proj"].get_value().sharding == params["blocks"]["mlp"]["up_proj"].get_value().sharding
    assert adam.count.sharding == NamedSharding(mesh, PartitionSpec())
    # AdamW's two moments: twice the params' bytes per device, plus a few replicated scalars
    extra = memory_plan.shard_bytes(opt_state) - 2 * memory_plan.shard_bytes(params)
    assert 0 < extra <= 16


def test_shard_bytes_count_one_device_share():
    mesh = sharding.make_mesh(data=1, fsdp=8)
    leaf = jax.ShapeDtypeStruct((16, 4), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
    assert memory_plan.shard_bytes({"w": leaf}) == 2 * 4 * 2


def test_row_reports_gib_and_which_devices_hold_the_larger_program():
    gib = memory_plan.GIB
    row = {"preset": "p", "devices": 8, "mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "remat": "full",
           "rows": 16, "length": 2560,
           "params": gib, "optimizer": 2 * gib, "update": {"temp": 3 * gib, "total": 40 * gib},
           "kv_cache": gib, "decode": {"temp": gib, "total": 31 * gib}}
    fields = memory_plan.format_row(row).split()
    assert fields[:5] == ["p", "8", "1x8x1", "full", "16x2560"]
    assert fields[5:12] == ["1.00", "2.00", "3.00", "40.00", "1.00", "1.00", "31.00"]
    assert fields[12:] == ["yes", "yes", "no"]  # 40 GiB = 42.9 GB: H100 80 GB, v5p 95 GB, not v6e 32 GB


def test_decode_rows_are_the_rollout_batch_or_its_chunk():
    from configs.base import base_config

    c = base_config()
    c.data.train_tasks_per_step, c.data.group_size = 16, 8
    assert memory_plan.preset_decode_rows(c) == 128
    c.rollout.max_decode_rows = 32
    assert memory_plan.preset_decode_rows(c) == 32
    c.rollout.max_decode_rows = 512
    assert memory_plan.preset_decode_rows(c) == 128


def test_fitting_decode_rows_halves_until_the_program_fits():
    planned = []

    def decode_bytes(rows):  # 1 GB fixed + 0.5 GB per row
        planned.append(rows)
        return 1e9 + 0.5e9 * rows

    assert memory_plan.fitting_decode_rows(decode_bytes, 2048, 80e9, min_rows=16) == (128, 65e9)
    assert planned == [1024, 512, 256, 128]
    planned.clear()
    assert memory_plan.fitting_decode_rows(decode_bytes, 2048, 5e9, min_rows=16) is None  # 16 rows: 9 GB
    assert planned[-1] == 16


class _Lowered(Exception):
    """Raised by the stand-in ``extend_and_decode.lower``: carries its keyword arguments."""


def test_decode_plan_lowers_the_program_the_trainers_sampler_picks(monkeypatch):
    import importlib
    import types

    from spear_jax.sampling import decode

    def lower(*args, **kwargs):
        raise _Lowered(kwargs)

    monkeypatch.setattr(decode, "extend_and_decode", types.SimpleNamespace(lower=lower))
    c = importlib.import_module("configs.spear").get_config("twx_tiny")
    cfg = get_model_config("tiny", num_layers=6)  # scanned and deeper than the unrolled limit
    one_device = sharding.make_mesh(devices=jax.devices()[:1])
    fsdp_mesh = sharding.make_mesh(data=1, fsdp=2, devices=jax.devices()[:2])
    picked = {}
    for name, mesh in (("one device", one_device), ("fsdp", fsdp_mesh)):
        for decode_layers in ("auto", "unrolled", "scanned"):
            c.rollout.decode_layers = decode_layers
            try:
                memory_plan.decode_plan(c, cfg, mesh, decode_rows=4)
            except _Lowered as lowered:
                picked[name, decode_layers] = lowered.args[0]["weights"] is not None
    assert picked == {("one device", "auto"): False, ("one device", "unrolled"): True,  # "auto" as on a GPU
                      ("one device", "scanned"): True, ("fsdp", "auto"): False, ("fsdp", "unrolled"): False,
                      ("fsdp", "scanned"): False}
