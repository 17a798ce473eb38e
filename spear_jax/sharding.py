"""Device mesh, logical-axis sharding rules and activation constraints.

Parameters carry *logical* axis names (``nnx.Param(..., out_sharding=("embed", "mlp"))``); a
rules table (``ModelConfig.sharding_rules``) maps each logical name to mesh axes of a
``("data", "fsdp", "tensor")`` mesh. A dimension whose size does not divide evenly over its mesh
axes is replicated, so one rules table serves every model size.

The mesh uses ``AxisType.Auto`` axes: ``jax.jit`` propagates shardings from the sharded inputs
and the ``constrain`` hints below (GSPMD), instead of requiring an explicit ``out_sharding`` on
every operation as ``AxisType.Explicit`` (the ``jax.make_mesh`` default) would.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axis types; ``-1`` takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by fsdp*tensor*... = {known}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} needs "
            f"{int(np.prod(shape))} devices, have {len(devices)}"
        )
    return jax.make_mesh(
        tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
    )


def _mesh_axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_pspec(
    logical_axes: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh
) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions carry ``logical_axes``.

    Unknown logical names raise; a dimension that its mesh axes do not divide is replicated;
    a mesh axis is used at most once per array (later dimensions replicate instead).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; rules: {sorted(table)}")
        axes = table[name]
        axes_tuple = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes_tuple = tuple(a for a in axes_tuple if a in mesh.shape and mesh.shape[a] > 1)
        if not axes_tuple or used & set(axes_tuple) or size % _mesh_axis_size(mesh, axes_tuple):
            spec.append(None)
            continue
        used |= set(axes_tuple)
        spec.append(axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, rules: Rules, mesh: Mesh) -> nnx.State:
    """NamedSharding for every variable of an NNX state, from its ``out_sharding`` names
    (variables without names are replicated)."""

    def one(variable):
        names = variable.get_metadata().get("out_sharding")
        shape = variable.shape
        if names is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_to_pspec(names, shape, rules, mesh))

    return jax.tree.map(
        lambda v: v.replace(one(v)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def shard_state(state: nnx.State, rules: Rules, mesh: Mesh) -> nnx.State:
    """Place every variable of ``state`` on ``mesh`` according to its logical axes."""
    return jax.device_put(state, state_shardings(state, rules, mesh))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules) -> jax.Array:
    """Sharding hint for an activation, under the mesh set with ``jax.set_mesh``
    (a no-op when no mesh is set)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_pspec(logical_axes, x.shape, rules, mesh))
