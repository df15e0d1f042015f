"""Memory plan: bytes per device of every state under its actual sharding, before anything compiles.

`<workdir>/<method>/memory.json` = {"mesh": {axis: size}, "per_device_bytes": {"frozen", "trainable",
"optimizer", "importance", "method_state", "activations", "total"}}. State sizes are exact (shard shapes
of the arrays' shardings, from `kif_jax.sharding.tree_shardings`); activations are an estimate. Which
part of a method's state is optimizer, importance or other method state, the method says
(`Method.memory_parts`; kif_jax/train/state.py puts the parts together).

The same plan for a run that is not at hand (a pod, a 13B model), from shapes only, no weights read
(`kif_jax.train.plan`; the command lives in kif_jax/cli.py beside main.py's, run by this package's
`__main__`):

    python -m kif_jax.memory_plan --config=configs/llama2_13b_pod.py --devices=16 [--method=recurrent_kif]
        [--workdir=W (writes W/<method>/memory.json)] [--json] [--config.a.b=v ...]
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
from absl import logging
from jax.sharding import Mesh

from kif_jax.models.family import family_of
from kif_jax.sharding import BATCH_AXES, TENSOR_AXIS, batch_spec, per_device_bytes


def loss_logit_positions(model: Any, *, input_length: int, target_length: int) -> int:
    """Positions a row whose float32 logits the training loss holds at once, as the model's family says (T5:
    its target positions; a decoder: one chunk of labelled positions, or every position when its head is
    not a plain matmul)."""
    return family_of(model).loss_logit_positions(model, input_length=input_length, target_length=target_length)


def activation_bytes(model: Any, *, micro_batch_size: int, input_length: int, target_length: int,
                     itemsize: int, remat: str, mesh: Mesh) -> int:
    """Rough per-device bytes of what one micro-batch's backward pass keeps alive.

    Per layer and token (Korthikanti et al. 2022, without dropout masks): about 8 * d (norms, residual,
    q/k/v/o inputs) + 2 * d_ff (MLP) values, and 2 * heads * length attention scores and probabilities;
    split by the `tensor` axis where heads and MLP are. "full" remat keeps each layer's input and one
    layer's tensors; the other policies are counted like "none" (an upper bound). Plus the float32
    logits and their gradient at the positions a row the loss holds (`loss_logit_positions`).
    `model` may be abstract (`jax.eval_shape`): only its config and head are read (by its family).
    """
    logit_positions = loss_logit_positions(model, input_length=input_length, target_length=target_length)
    d, ff, heads, vocab, layers = family_of(model).sizes(model.config)
    spec = batch_spec(mesh, micro_batch_size, 0)
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape) if len(spec) else 1
    rows = math.ceil(micro_batch_size / shards)
    length = input_length + target_length
    t = mesh.shape.get(TENSOR_AXIS, 1)
    per_layer = rows * length * itemsize * (8 * d + (2 * ff + 2 * heads * length) / t)
    kept = layers * rows * length * d * itemsize + per_layer if remat == "full" else layers * per_layer
    logits = 2 * rows * logit_positions * vocab * 4 / t
    return int(kept + logits)


#: The parts of a method's own state the plan counts apart (`Method.memory_parts`); an "optimizer" part
#: joins the training state's optimizer.
METHOD_PARTS = ("importance", "method_state")
#: The parts of a training state the plan counts apart (`kif_jax.train.state.state_parts`).
STATE_PARTS = ("trainable", "optimizer", *METHOD_PARTS)


def memory_plan(state_parts: dict[str, Any], frozen: Any, mesh: Mesh, *, activations: int) -> dict:
    """The plan of a training state's parts {part: pytree of arrays or `jax.eval_shape` structs} (the
    `STATE_PARTS`) and the frozen weights on `mesh`."""
    b = lambda tree: per_device_bytes(tree, mesh)  # noqa: E731
    parts = {"frozen": b(frozen), **{name: b(state_parts[name]) for name in STATE_PARTS},
             "activations": int(activations)}
    parts["total"] = sum(parts.values())
    return {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "per_device_bytes": parts}


def report_memory_plan(plan: dict, path: pathlib.Path, name: str) -> None:
    """Write memory.json (process 0), log it, and warn in one line if it exceeds the device's memory."""
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=2) + "\n")
    gib = {k: f"{v / 2**30:.3f}" for k, v in plan["per_device_bytes"].items()}
    logging.info("%s: memory plan per device (GiB) on mesh %s: %s", name, plan["mesh"], gib)
    stats = jax.local_devices()[0].memory_stats()  # None on CPU
    limit = (stats or {}).get("bytes_limit")
    total = plan["per_device_bytes"]["total"]
    if limit and total > limit:
        logging.warning("%s: the memory plan needs %.2f GiB per device but %s has %.2f GiB; raise "
                        "sharding.fsdp_parallelism, lower train.micro_batch_size or set train.remat=full",
                        name, total / 2**30, jax.local_devices()[0].device_kind, limit / 2**30)


# --------------------------------------------------------------------------------------------
# How a plan compares with the chips it would run on
# --------------------------------------------------------------------------------------------

#: HBM per chip of the TPU generations the plan is compared with.
CHIP_HBM_BYTES = {"v4": 32 * 2**30, "v5e": 16 * 2**30}


def chip_fit(plan: dict) -> dict:
    """{chip: {"hbm_bytes", "fraction" (the plan's total per device / the chip's HBM), "fits"}}."""
    total = plan["per_device_bytes"]["total"]
    return {chip: {"hbm_bytes": hbm, "fraction": total / hbm, "fits": total <= hbm}
            for chip, hbm in CHIP_HBM_BYTES.items()}


def format_plan(plan: dict, *, method: str, origin: str) -> str:
    """The plan as a table of bytes and GiB per device, and its share of each chip's HBM."""
    mesh = " x ".join(f"{a} {s}" for a, s in plan["mesh"].items())
    lines = [f"{method}: memory per device on the mesh {mesh} ({math.prod(plan['mesh'].values())} devices); "
             f"architecture from {origin}"]
    for part, value in plan["per_device_bytes"].items():
        lines.append(f"  {part:<12}{value:>18,} bytes {value / 2**30:>10.3f} GiB")
    for chip, fit in chip_fit(plan).items():
        lines.append(f"  {chip} chip ({fit['hbm_bytes'] / 2**30:.0f} GiB HBM): {fit['fraction']:.1%} of one chip's "
                     f"memory per device, {'fits' if fit['fits'] else 'does NOT fit'}")
    return "\n".join(lines)
