"""Per-device memory of the paper presets: the update step and decode, compiled ahead of time on
a simulated mesh of the preset's size.

    python -m bench.memory_plan                                  # every plan in PLANS
    python -m bench.memory_plan --presets alfworld_qwen2.5_1.5b --remat full

For each plan (a run preset of ``configs/spear.py``, its model preset's architecture with the
run's ``model.compute_dtype``, a device count and an fsdp x tensor mesh,
data parallel over the rest) a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=<devices>`` builds the preset's run config and
lowers and compiles, on ``jax.ShapeDtypeStruct`` inputs laid out on that mesh (nothing is
materialised):

* the update step (``train_step.make_update_fn``, on-policy, default objective, AdamW) on one
  micro-batch of ``actor.ppo_micro_batch_size`` rows (rounded up to a multiple of the data x fsdp
  devices, at least one row each) x (``rollout.max_prompt_length`` +
  ``rollout.max_response_length``) tokens, with ``--remat``;
* the decode program (``decode.extend_and_decode``) for the rows the trainer decodes at once:
  the rollout batch (``data.train_tasks_per_step`` x ``data.group_size`` rows), or chunks of
  ``rollout.max_decode_rows`` of it when that is set (``--decode_rows`` plans another count), on
  a cache of prompt + response slots in ``rollout.kv_cache_dtype``: a prompt-length append, then
  ``max_response_length`` steps. When that program does not fit the ``--fit`` device (H100 by
  default), the decode is planned again at half the rows, a quarter, ... (at least one row per
  data x fsdp device) and the largest chunk that fits is printed with the setting that selects it
  (``rollout.max_decode_rows=N``).

The optimizer state is laid out like the params (each AdamW moment sharded as its parameter).
Columns, per device, GiB: params and optimizer state (the shards of the sharded arrays), the KV
cache shard, and XLA's ``memory_analysis()`` temp bytes (activations and scratch) of each
program; ``update`` and ``decode`` are arguments + outputs - aliased (donated) + temp of each
program. The last columns say whether the larger of the two fits an H100 (80 GB), a TPU v5p
(95 GB) and a TPU v6e (32 GB). The lengths and batch sizes come from the presets, so a corrected
response budget flows in. XLA:CPU's temp figure stands for the accelerator's: the same
partitioned program, but another backend's fusion and scheduling change its temporaries.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

GIB = 2**30
DEVICE_BYTES = {"H100": 80e9, "v5p": 95e9, "v6e": 32e9}
# (run preset, devices, fsdp, tensor); data parallel takes the remaining factor.
PLANS = (
    ("alfworld_qwen2.5_1.5b", 8, 8, 1),
    ("webshop_qwen2.5_1.5b", 8, 8, 1),
    ("aime_qwen2.5_32b", 64, 16, 4),
    ("aime_qwen3_32b", 128, 32, 4),
)


def shard_bytes(tree) -> int:
    """Bytes one device holds of the ShapeDtypeStruct leaves of ``tree`` (their shard shapes)."""
    import jax
    import numpy as np

    return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def optimizer_layout(opt_state, params, mesh):
    """ShapeDtypeStructs of ``opt_state`` with every params-shaped subtree (AdamW's moments) laid
    out like ``params`` and the other leaves (the step count) replicated on ``mesh``."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    structure = jax.tree.structure(params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(node):
        if jax.tree.structure(node) == structure:
            return jax.tree.map(lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding), node, params)
        return jax.ShapeDtypeStruct(node.shape, node.dtype, sharding=replicated)

    return jax.tree.map(place, opt_state, is_leaf=lambda node: jax.tree.structure(node) == structure)


def _program_bytes(compiled) -> dict:
    analysis = compiled.memory_analysis()
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    return {"temp": analysis.temp_size_in_bytes, "total": total}


def update_plan(c, cfg, mesh) -> dict:
    """Per-device bytes of params, optimizer state and the compiled update step."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from spear_jax import train_step
    from spear_jax.objectives import ObjectiveConfig, SILConfig
    from spear_jax.policy import abstract_params

    graphdef, params = abstract_params(cfg, mesh)
    optimizer = train_step.make_optimizer(train_step.OptimizerConfig())
    opt_state = optimizer_layout(jax.eval_shape(optimizer.init, params), params, mesh)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = -(-int(c.actor.ppo_micro_batch_size) // batch_devices) * batch_devices  # whole rows per device
    length = int(c.rollout.max_prompt_length + c.rollout.max_response_length)
    batch = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
    dtypes = {"tokens": jnp.int32, "valid": bool, "loss_mask": jnp.float32, "old_logprobs": jnp.float32,
              "advantages": jnp.float32}
    minibatch = {k: jax.ShapeDtypeStruct((1, rows, length), d, sharding=batch) for k, d in dtypes.items()}
    minibatch["row_valid"] = jax.ShapeDtypeStruct((1, rows), bool, sharding=batch)
    update = train_step.make_update_fn(graphdef, optimizer, train_step.UpdateConfig(
        objective=ObjectiveConfig(), sil=SILConfig()), replay=False, mesh=mesh)
    with jax.set_mesh(mesh):
        compiled = update.lower(params, opt_state, minibatch, jax.eval_shape(lambda: jax.random.key(0)),
                                jax.ShapeDtypeStruct((), jnp.float32)).compile()
    return {"params": shard_bytes(params), "optimizer": shard_bytes(opt_state), "rows": rows, "length": length,
            "update": _program_bytes(compiled)}


def preset_decode_rows(c) -> int:
    """Rows of one decode program as the trainer runs it: the rollout batch
    (``data.train_tasks_per_step`` x ``data.group_size``), in chunks of at most
    ``rollout.max_decode_rows`` when that is set."""
    rollout_rows = int(c.data.train_tasks_per_step * c.data.group_size)
    chunk = int(c.rollout.max_decode_rows)
    return min(rollout_rows, chunk) if chunk else rollout_rows


def fitting_decode_rows(decode_bytes, rows: int, device_bytes: float, min_rows: int) -> tuple[int, int] | None:
    """(rows, bytes) of the largest decode chunk rows / 2^i (i >= 1, at least ``min_rows``, the
    data x fsdp devices that each hold a row) whose per-device bytes ``decode_bytes(rows)`` fit
    ``device_bytes``; None when even ``min_rows`` rows do not fit."""
    while rows > min_rows:
        rows = max(min_rows, rows // 2)
        total = decode_bytes(rows)
        if total <= device_bytes:
            return rows, total
    return None


def decode_plan(c, cfg, mesh, decode_rows: int = 0) -> dict:
    """Per-device bytes of the KV cache and of the compiled decode program for ``decode_rows``
    rows (0: ``preset_decode_rows``, as the trainer decodes them)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from spear_jax.model import KVCache
    from spear_jax.policy import abstract_params
    from spear_jax.sampling import decode
    from spear_jax.sampling.decode_step import abstract_decode_weights
    from spear_jax.sampling.distribution import SamplingKnobs
    from spear_jax.sampling.stops import StopTable
    from spear_jax.sharding import logical_to_pspec

    graphdef, params = abstract_params(cfg, mesh)
    rules = cfg.sharding_rules
    batch = decode_rows or preset_decode_rows(c)
    prompt, response = int(c.rollout.max_prompt_length), int(c.rollout.max_response_length)
    shape = (cfg.num_layers, batch, prompt + response, cfg.num_kv_heads, cfg.head_dim)
    kv = jax.ShapeDtypeStruct(shape, jnp.dtype(c.rollout.kv_cache_dtype),
                              sharding=NamedSharding(mesh, logical_to_pspec(decode.CACHE_AXES, shape, rules, mesh)))
    rows = NamedSharding(mesh, logical_to_pspec(("act_batch",), (batch,), rules, mesh))
    cache = KVCache(k=kv, v=kv, lengths=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows))
    appended = NamedSharding(mesh, logical_to_pspec(("act_batch", None), (batch, prompt), rules, mesh))
    knobs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), SamplingKnobs.make(1.0, 1.0, 0, False))
    with jax.set_mesh(mesh):
        compiled = decode.extend_and_decode.lower(
            graphdef, params, cache, jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=appended),
            jax.ShapeDtypeStruct((batch, prompt), bool, sharding=appended),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows), knobs, StopTable.make([0], []),
            jax.eval_shape(lambda: jax.random.key(0)),
            weights=abstract_decode_weights(  # the plan is an accelerator's: "auto" as on a GPU
                graphdef, params, decode.decode_step_form(cfg, mesh, c.rollout.decode_layers, platform="gpu")),
            max_steps=response, window=prompt + response, rules=rules,
        ).compile()  # the sampler's program, as the trainer's Sampler picks it
    return {"kv_cache": 2 * shard_bytes(kv), "decode_rows": batch, "decode": _program_bytes(compiled)}


def plan_one(preset: str, fsdp: int, tensor: int, remat: str, decode_rows: int = 0,
             decode_only: bool = False) -> dict:
    """The plan of one preset on this process's (simulated) devices (``decode_only``: the decode
    program's, without the update step's)."""
    import jax

    from spear_jax import sharding
    from spear_jax.model import get_model_config

    c = importlib.import_module("configs.spear").get_config(preset)
    cfg = get_model_config(c.model.preset, compute_dtype=c.model.compute_dtype, remat=remat)
    mesh = sharding.make_mesh(data=-1, fsdp=fsdp, tensor=tensor)
    row = {"preset": preset, "model": c.model.preset, "devices": jax.device_count(), "mesh": dict(mesh.shape),
           "remat": remat}
    if not decode_only:
        row.update(update_plan(c, cfg, mesh))
    row.update(decode_plan(c, cfg, mesh, decode_rows))
    return row


def run_plan(preset: str, devices: int, fsdp: int, tensor: int, remat: str, decode_rows: int = 0,
             decode_only: bool = False) -> dict:
    """``plan_one`` in a subprocess with ``devices`` simulated CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "bench.memory_plan", "--one", preset, "--fsdp", str(fsdp),
               "--tensor", str(tensor), "--remat", remat, "--decode_rows", str(decode_rows)]
    command += ["--decode_only"] if decode_only else []
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"plan {preset} on {devices} devices failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_row(row: dict) -> str:
    """One table line: per-device GiB and the devices the larger program fits."""
    mesh = "x".join(f"{row['mesh'][a]}" for a in ("data", "fsdp", "tensor"))
    peak = max(row["update"]["total"], row["decode"]["total"])
    fits = " ".join(f"{'yes' if peak <= size else 'no':>5}" for size in DEVICE_BYTES.values())
    gib = [row["params"], row["optimizer"], row["update"]["temp"], row["update"]["total"], row["kv_cache"],
           row["decode"]["temp"], row["decode"]["total"]]
    return (f"{row['preset']:<24} {row['devices']:>4} {mesh:>8} {row['remat']:>5} "
            f"{row['rows']:>4}x{row['length']:<6} "
            + " ".join(f"{b / GIB:>8.2f}" for b in gib) + f" {fits}")


HEADER = (f"{'preset':<24} {'devs':>4} {'d x f x t':>8} {'remat':>5} {'micro':>11} {'params':>8} {'optim':>8} "
          f"{'upd_tmp':>8} {'update':>8} {'kv':>8} {'dec_tmp':>8} {'decode':>8} "
          + " ".join(f"{name:>5}" for name in DEVICE_BYTES))


def fitting_chunk_line(row: dict, plan: tuple, remat: str, device: str) -> str:
    """The decode chunk (rows per program) that fits ``device``, planned by halving the rows of
    ``row``'s decode program, as the setting that selects it."""
    preset, devices, fsdp, tensor = plan
    min_rows = row["mesh"]["data"] * row["mesh"]["fsdp"]

    def decode_bytes(rows: int) -> int:
        return run_plan(preset, devices, fsdp, tensor, remat, rows, decode_only=True)["decode"]["total"]

    found = fitting_decode_rows(decode_bytes, row["decode_rows"], DEVICE_BYTES[device], min_rows)
    if found is None:
        return f"  {preset}: no decode chunk of >= {min_rows} rows fits a {device}"
    rows, total = found
    return (f"  {preset}: a decode chunk of {rows} rows fits a {device} ({total / GIB:.2f} GiB per device): "
            f"rollout.max_decode_rows={rows}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(p[0] for p in PLANS))
    parser.add_argument("--remat", default="full")
    parser.add_argument("--decode_rows", type=int, default=0,
                        help="rows of the decode program (0: the preset's rollout batch, in chunks of "
                             "rollout.max_decode_rows when set)")
    parser.add_argument("--fit", default="H100", choices=tuple(DEVICE_BYTES),
                        help="when the decode program does not fit this device, plan it at halved "
                             "row counts and print the largest chunk that fits")
    parser.add_argument("--decode_only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tensor", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(plan_one(args.one, args.fsdp, args.tensor, args.remat, args.decode_rows, args.decode_only)))
        return
    wanted = args.presets.split(",")
    unknown = sorted(set(wanted) - {p[0] for p in PLANS})
    if unknown:
        parser.error(f"--presets {unknown} have no plan; choose from {[p[0] for p in PLANS]}")
    print("per-device GiB; update/decode = arguments + outputs - donated + temp of each program")
    print(HEADER, flush=True)
    for preset, devices, fsdp, tensor in PLANS:
        if preset in wanted:
            row = run_plan(preset, devices, fsdp, tensor, args.remat, args.decode_rows)
            print(format_row(row) + f"  (decode rows {row['decode_rows']})", flush=True)
            if row["decode"]["total"] > DEVICE_BYTES[args.fit]:
                print(fitting_chunk_line(row, (preset, devices, fsdp, tensor), args.remat, args.fit), flush=True)


if __name__ == "__main__":
    main()
