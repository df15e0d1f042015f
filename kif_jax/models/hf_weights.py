"""Hugging Face weights <-> NNX parameters for every family: one loader, one exporter.

The loader plans from a family's name table (`architectures`): every tensor of the reader is mapped
to a model path and checked against the abstract model (`nnx.eval_shape`) before anything is read;
every problem (unknown tensors, missing parameters, shapes, dtypes) goes into one `ModelLoadError`.
Tensors are then read one at a time, transformed, and cast on the host straight into the target
dtype (no float32 copy of a bfloat16 model). The reader is anything with `names()`, `shape(name)`
([out, in] for linear weights), `dtype(name)` and `get(name)`: a safetensors checkpoint
(`hf_files.SafetensorsReader`) or a GGUF file (`gguf.GGUFCheckpoint`).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

import numpy as np
from flax import nnx

from kif_jax.errors import ModelLoadError
from kif_jax.models.hf_files import FLOAT_DTYPES, SAFE_WEIGHTS, NameTable, summarise, transpose
from kif_jax.models.layers import LoRAConfig, LoRAParam, dotted, init_lora_state, merged_kernels
from kif_jax.sharding import place


class TensorReader(Protocol):
    """What the loader reads: tensor names, shapes and dtypes first, data on demand."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> str: ...

    def get(self, name: str) -> np.ndarray: ...


def load_weights(build: Callable[[], nnx.Module], names: NameTable, reader: TensorReader, *,
                 lora: LoRAConfig | None, seed: int, source: str, what: str, mesh: Any = None,
                 ignored: Sequence[str] = (), tied_copies: Collection[str] = (),
                 aliases: Mapping[str, Sequence[str]] | None = None) -> nnx.Module:
    """The model `build()` makes (built abstractly), its parameters read from `reader`.

    `ignored`: regexes of tensors to skip (buffers, tied copies). `tied_copies`: model paths whose
    stored tensor is skipped when the model has no such parameter (a tied head). `aliases`: model path
    -> other tensor names that may hold its value when its own is absent (T5's embedding copies).
    With `lora`, adapters are added as peft initialises them (A from `seed` and each path, B = 0).
    With a `mesh`, each tensor goes straight into its `kif_jax.sharding` layout as it is read.
    """
    abstract = nnx.eval_shape(build)
    graphdef, lora_abstract, base_abstract = nnx.split(abstract, LoRAParam, ...)
    expected = {dotted(path): var for path, var in nnx.to_flat_state(base_abstract)}

    problems: dict[str, list[str]] = {"unexpected tensors": [], "missing parameters": [], "shape mismatches": [],
                                      "unsupported dtypes": []}
    plan: dict[str, tuple[str, Callable | None]] = {}
    seen: set[str] = set()  # parameters with a tensor in the checkpoint, usable or not

    def check(name: str, path: str, fn: Callable | None) -> bool:
        shape = tuple(reader.shape(name))
        if fn is transpose:
            shape = shape[::-1]
        want = tuple(expected[path].get_value().shape)
        if shape != want:
            problems["shape mismatches"].append(f"{name}: checkpoint {shape} (in the model's layout), model {want}")
            return False
        if reader.dtype(name) not in FLOAT_DTYPES:
            problems["unsupported dtypes"].append(f"{name}: {reader.dtype(name)}")
            return False
        return True

    available = set(reader.names())
    for name in reader.names():
        target = names.to_model(name)
        if target is None:
            if not any(re.fullmatch(p, name) for p in ignored):
                problems["unexpected tensors"].append(name)
            continue
        path, fn = target
        if path not in expected:
            if path not in tied_copies:
                problems["unexpected tensors"].append(f"{name} (no {path} in this model)")
            continue
        seen.add(path)
        if check(name, path, fn):
            plan[path] = (name, fn)
    for path, others in (aliases or {}).items():
        if path in expected and path not in seen:
            name = next((n for n in others if n in available), None)
            if name is not None:
                seen.add(path)
                if check(name, path, None):
                    plan[path] = (name, None)
    problems["missing parameters"] = sorted(set(expected) - seen)
    found = [summarise(k, v) for k, v in problems.items() if v]
    if found:
        raise ModelLoadError(f"{source} does not fit the {what} of its config:\n" + "\n".join(found))

    flat = []
    for path, var in nnx.to_flat_state(base_abstract):
        name, fn = plan[dotted(path)]
        value = np.asarray(reader.get(name))
        if fn is not None:
            value = fn(value)
        flat.append((path, var.replace(place(value.astype(var.get_value().dtype, copy=False), var, mesh))))
        del value
    base = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, lora_abstract if lora is None else init_lora_state(lora_abstract, seed), base)


def to_hf_state_dict(model: nnx.Module, names: NameTable) -> dict[str, np.ndarray]:
    """Hugging Face names -> numpy arrays, adapters merged into their kernels (W + scale A B)."""
    merged = {f"{p}.kernel": w for p, w in merged_kernels(model).items()}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam))):
        key = dotted(path)
        hf = names.to_hf(key)
        if hf is None:
            raise ModelLoadError(f"no Hugging Face name for model parameter {key}")
        name, fn = hf
        value = np.asarray(merged.get(key, var[...]))
        out[name] = np.ascontiguousarray(fn(value) if fn is not None else value)
    return out


def save_pretrained(model: nnx.Module, directory: str, names: NameTable) -> None:
    """Write `config.json` (the config's `to_hf()`) and `model.safetensors` (LoRA merged), as transformers reads them."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf(), f, indent=2)
    weights = os.path.join(directory, SAFE_WEIGHTS)
    save_file(to_hf_state_dict(model, names), weights, metadata={"format": "pt"})
    # safetensors writes a 0600 file; give it the mode open() would (0644 under umask 022), like config.json.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)
