"""GSPMD sharding: one mesh (`data`, `fsdp`, `tensor`), logical axis names mapped to it by ONE rules table.

Model parameters carry logical axis names as Flax NNX sharding metadata (`out_sharding`, set by
`kif_jax.models.layers.param`); every tree derived from them by `jax.tree.map` (LoRA factors, AdamW
moments, importance EMAs, task vectors) keeps that metadata, so one function, `tree_shardings`,
gives every state its parameters' layout:

- `data`: batch rows only (pure data parallelism, parameters replicated);
- `fsdp`: batch rows, and the `embed` dimension of every weight (ZeRO-3 / FSDP: each device holds
  a slice of each tensor; XLA all-gathers one layer's weights where it uses them);
- `tensor`: Megatron-style: heads, MLP and vocabulary dimensions split, activations follow.

The mesh's axes are `Auto` (GSPMD propagation): the model code stays sharding-agnostic and the jitted
programs take their input shardings from the arrays they receive; outputs are pinned with
`constrain` so a state keeps its layout across steps and donation reuses its buffers.
A dimension that an axis does not divide stays unsplit on that axis (see `logical_spec`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kif_jax.errors import ConfigError

DATA_AXIS, FSDP_AXIS, TENSOR_AXIS = "data", "fsdp", "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # batch rows are split over both (FSDP is data parallel too)

#: THE rules table: logical axis name -> mesh axes (None: never split). Parameters name their
#: dimensions with these logical names (kif_jax/models/layers.py, t5/model.py, decoder/model.py).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),  # rows of a batch
    ("embed", FSDP_AXIS),  # d_model / hidden_size: the FSDP split of every weight
    ("vocab", TENSOR_AXIS),  # embedding rows and output-head columns
    ("heads", TENSOR_AXIS),  # T5 attention: num_heads * d_kv
    ("q_heads", TENSOR_AXIS),  # decoder attention queries / output: num_attention_heads * head_dim
    ("kv_heads", TENSOR_AXIS),  # decoder keys / values: num_key_value_heads * head_dim
    ("mlp", TENSOR_AXIS),  # feed-forward inner size
    ("head_dim", None),  # per-head norms (qwen3)
    ("rel_buckets", None),  # T5 relative-position buckets
    ("lora_rank", None),  # LoRA rank r: tiny, never split
)
_RULES = dict(LOGICAL_AXIS_RULES)


# --------------------------------------------------------------------------------------------
# The mesh
# --------------------------------------------------------------------------------------------


def mesh_shape(sharding: Any, device_count: int | None = None) -> dict[str, int]:
    """{data, fsdp, tensor} sizes from the config's `sharding` section; -1 takes the remaining devices.

    `sharding.num_devices` (0 = all devices) is how many devices the mesh uses; the three sizes
    must multiply to it. Errors are `ConfigError`s naming the field.
    """
    available = jax.device_count() if device_count is None else device_count
    n = int(sharding.num_devices) or available
    if n > available:
        raise ConfigError(f"config field 'sharding.num_devices' asks for {n} devices, {available} available")
    fields = {axis: f"sharding.{axis}_parallelism" for axis in ("data", "fsdp", "tensor")}
    sizes = {axis: int(getattr(sharding, f"{axis}_parallelism")) for axis in fields}
    free = [axis for axis, s in sizes.items() if s == -1]
    for axis, s in sizes.items():
        if s == 0 or s < -1:
            raise ConfigError(f"config field '{fields[axis]}' must be a positive integer or -1, got {s}")
    if len(free) > 1:
        raise ConfigError(f"config fields {' and '.join(repr(fields[a]) for a in free)} are both -1; "
                          "at most one axis takes the remaining devices")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % fixed:
            raise ConfigError(f"config field '{fields[free[0]]}' is -1 but the other axes ({fixed} devices) "
                              f"do not divide the {n} devices")
        sizes[free[0]] = n // fixed
    elif fixed != n:
        raise ConfigError(f"config fields 'sharding.data_parallelism' x 'sharding.fsdp_parallelism' x "
                          f"'sharding.tensor_parallelism' = {fixed} must equal the {n} devices used "
                          "(sharding.num_devices, 0 = all)")
    return sizes


def config_mesh(sharding: Any) -> Mesh:
    """The (data, fsdp, tensor) mesh of the config's `sharding` section, over the first devices (Auto axes)."""
    sizes = mesh_shape(sharding)
    n = math.prod(sizes.values())
    if jax.process_count() > 1 and n != jax.device_count():
        raise ConfigError(f"config field 'sharding.num_devices': a multi-process run's mesh takes all "
                          f"{jax.device_count()} devices of its {jax.process_count()} processes, not {n}")
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:n])


def data_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D `data` mesh over the first `num_devices` devices (0 = all of them)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, {len(devices)} available")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


# --------------------------------------------------------------------------------------------
# Logical names -> shardings
# --------------------------------------------------------------------------------------------


def logical_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> P:
    """The PartitionSpec of an array with dimensions named `names` under `LOGICAL_AXIS_RULES` on `mesh`.

    Mesh axes that are absent or of size 1 are dropped; a dimension keeps the longest run of its
    axes whose product divides it (e.g. a 259-row vocabulary stays whole on a 4-way `tensor` axis);
    no mesh axis is used twice; `fsdp` left unused goes on the largest dimension it divides (FSDP
    splits every weight). Unknown names raise ValueError.
    """
    if not names:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(names, shape):
        if name is None:
            out.append(None)
            continue
        if name not in _RULES:
            raise ValueError(f"logical axis {name!r} has no rule in kif_jax.sharding.LOGICAL_AXIS_RULES")
        target = _RULES[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        picked: list[str] = []
        for axis in axes:
            size = mesh.shape.get(axis, 1)
            if size == 1 or axis in used:
                continue
            if dim % (math.prod(mesh.shape[a] for a in picked) * size):
                break
            picked.append(axis)
        used.update(picked)
        out.append(None if not picked else picked[0] if len(picked) == 1 else tuple(picked))
    fsdp = mesh.shape.get(FSDP_AXIS, 1)
    if fsdp > 1 and FSDP_AXIS not in used:
        # FSDP splits every weight: one whose named dimensions leave `fsdp` unused (LoRA's B [r, out],
        # biases, T5's bucket table) is split over it on its largest dimension that it divides.
        def size(entry: Any) -> int:
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            return math.prod(mesh.shape[a] for a in names)

        fits = [i for i, dim in enumerate(shape) if dim % (size(out[i]) * fsdp) == 0]
        if fits:
            i = max(fits, key=lambda k: shape[k] // size(out[k]))
            names = () if out[i] is None else (out[i],) if isinstance(out[i], str) else out[i]
            out[i] = FSDP_AXIS if not names else (*names, FSDP_AXIS)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _leaf_spec(x: Any, mesh: Mesh) -> P:
    if _is_var(x):
        names = x.get_metadata().get("out_sharding")
        return logical_spec(names, tuple(x.get_value().shape), mesh)
    return P()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding per array of `tree` (a prefix tree: one per Variable), from its logical axis names.

    Arrays outside NNX Variables (counters, keys, losses) are replicated.
    """
    return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(x, mesh)), tree, is_leaf=_is_var)


def shard_tree(tree: Any, mesh: Mesh) -> Any:
    """`tree` placed in its final sharding (a no-op for arrays already there)."""
    return jax.device_put(tree, tree_shardings(tree, mesh))


def constrain(tree: Any, mesh: Mesh) -> Any:
    """Inside jit: pin every array of `tree` to its sharding (GSPMD otherwise chooses freely)."""
    return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh))


def is_sharded(tree: Any, mesh: Mesh) -> bool:
    """Whether any array of `tree` is split over some mesh axis (not fully replicated)."""
    leaves = jax.tree.leaves(jax.tree.map(lambda x: _leaf_spec(x, mesh), tree, is_leaf=_is_var),
                             is_leaf=lambda x: isinstance(x, P))
    return any(any(a is not None for a in spec) for spec in leaves)


def place(value: Any, var: nnx.Variable, mesh: Mesh | None) -> jax.Array:
    """A host tensor for Variable `var` (abstract or not) on device: straight into its final sharding
    on `mesh` (each device receives only its shard), or on the default device without a mesh."""
    if mesh is None:
        return jax.numpy.asarray(value)
    return put_host(value, NamedSharding(mesh, _leaf_spec(var, mesh)))


def put_host(value: Any, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole, placed in `sharding`.

    In one process this is `jax.device_put`; with several, each process transfers only its own
    devices' shards (`jax.make_array_from_callback`), without `device_put`'s cross-process check that
    the value is equal everywhere (an all-gather of the whole value).
    """
    if jax.process_count() == 1 or sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf copied to every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def batch_spec(mesh: Mesh, rows: int, row_axis: int) -> P:
    """Rows at `row_axis` split over the batch axes (`data`, `fsdp`) that divide them; else replicated."""
    axes = [a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1]
    while axes and rows % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    if not axes:
        return P()
    return P(*([None] * row_axis), axes[0] if len(axes) == 1 else tuple(axes))


def shard_rows(tree: Any, mesh: Mesh, row_axis: int) -> Any:
    """Split axis `row_axis` (batch rows) of every leaf over the batch axes; replicate if they do not divide.

    Every process passes the same global (host) batch; with several processes each one feeds only
    the rows of its own devices (`jax.make_array_from_process_local_data`).
    """
    def put(x: Any) -> jax.Array:
        sharding = NamedSharding(mesh, batch_spec(mesh, x.shape[row_axis], row_axis))
        if jax.process_count() == 1 or sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, process_rows(x, sharding, row_axis), x.shape)

    return jax.tree.map(put, tree)


def process_rows(x: Any, sharding: NamedSharding, row_axis: int) -> np.ndarray:
    """This process's rows of the global host array `x` under `sharding`: the contiguous block at
    `row_axis` that its devices hold (all rows where they are replicated)."""
    x = np.asarray(x)
    n = x.shape[row_axis]
    spans = {(s[row_axis].start or 0, n if s[row_axis].stop is None else s[row_axis].stop)
             for s in sharding.addressable_devices_indices_map(x.shape).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = sum(b - a for a, b in spans)
    if covered != hi - lo:
        raise ValueError(f"this process's devices hold rows {sorted(spans)} of {n}: not one contiguous block; "
                         "order the mesh's devices process by process (jax.make_mesh does)")
    return x[(slice(None),) * row_axis + (slice(lo, hi),)]


def per_device_bytes(tree: Any, mesh: Mesh) -> int:
    """Bytes that the arrays of `tree` (arrays or ShapeDtypeStructs) occupy on one device under `tree_shardings`."""
    shardings = jax.tree.leaves(tree_shardings(tree, mesh), is_leaf=lambda x: isinstance(x, NamedSharding))
    leaves = jax.tree.leaves(tree)
    return int(sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
                   for x, s in zip(leaves, shardings, strict=True)))
