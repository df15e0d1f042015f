"""The memory plan of a run that is not at hand (a pod, a 13B model), from shapes only: no weights, no devices."""
from __future__ import annotations

import copy
from typing import Any

from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from kif_jax import data as kdata
from kif_jax.config import SYNTHETIC_DATA, validate_config, with_method_sections
from kif_jax.errors import ConfigError
from kif_jax.memory_plan import activation_bytes
from kif_jax.methods import method_class
from kif_jax.models.loading import abstract_model
from kif_jax.models.layers import LoRAParam
from kif_jax.sharding import MESH_AXES, mesh_shape
from kif_jax.train.state import plan_method_memory
from kif_jax.train.steps import adam_transform


def plan_abstract(config: Any, num_devices: int, method: str) -> tuple[dict, str]:
    """(The memory.json plan of `method` under `config` on a mesh of `num_devices` devices, where the
    model's architecture came from).

    The model is built abstractly (`nnx.eval_shape`), the mesh is a `jax.sharding.AbstractMesh` of the
    config's `sharding` sizes, and the state is the one a real run plans (the method's largest fresh
    training state); no device, weight or data file is touched. Errors are `KifError`s.
    """
    c = copy.deepcopy(config)
    c.methods = method
    c.data_dir = SYNTHETIC_DATA  # the plan reads no data: only the task count matters
    c = with_method_sections(c)
    validate_config(c)
    if num_devices < 1:
        raise ConfigError(f"the number of devices must be a positive integer, got {num_devices}")
    sizes = mesh_shape(c.sharding, device_count=num_devices)
    mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    tasks = kdata.resolve_tasks(benchmark=c.benchmark or None, order=c.order or None, tasks=c.tasks or None)
    model, arch, origin = abstract_model(c.model, seed=c.seed)
    trainable = LoRAParam if c.model.trainable == "lora" else nnx.Param
    _, params, frozen = nnx.split(model, trainable, ...)
    activations = activation_bytes(model, micro_batch_size=c.train.micro_batch_size,
                                   input_length=c.train.max_input_length, target_length=c.train.max_target_length,
                                   itemsize=2 if c.model.dtype == "bfloat16" else 4, remat=c.train.remat, mesh=mesh)
    run_method = method_class(method)(c)
    plan = plan_method_memory(run_method, params, frozen, mesh, num_phases=len(run_method.phases(tasks)),
                              tx=adam_transform(c.train.max_grad_norm, c.train.weight_decay), activations=activations)
    return plan, origin


def plan_config(config: Any, num_devices: int, method: str) -> dict:
    """The memory.json plan of `method` under `config` on `num_devices` devices (see `plan_abstract`)."""
    return plan_abstract(config, num_devices, method)[0]
