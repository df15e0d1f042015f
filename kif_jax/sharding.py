"""Data parallelism with jit + NamedSharding: batch rows split over a `data` mesh axis, parameters replicated."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first `num_devices` local devices (0 = all of them)."""
    devices = jax.local_devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, {len(devices)} available")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf copied to every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_rows(tree: Any, mesh: Mesh, row_axis: int) -> Any:
    """Split axis `row_axis` (batch rows) of every leaf over the data axis; replicate if it does not divide."""

    def put(x: np.ndarray) -> jax.Array:
        if x.shape[row_axis] % mesh.size:
            return jax.device_put(x, NamedSharding(mesh, P()))
        spec = P(*([None] * row_axis), DATA_AXIS)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)
