"""Hugging Face decoder-only checkpoints (and GGUF files) <-> kif_jax `DecoderLM`, without torch.

One table maps Hugging Face names to model paths (both directions) with an explicit transform per
row; every shape is checked against the abstract model (`nnx.eval_shape`) before any tensor is
read, and every problem is collected into one `ModelLoadError`. Tensors are then read one at a
time and cast straight into the target dtype. The core takes any reader with `names()`,
`shape(name)` ([out, in] for linear weights), `dtype(name)` and `get(name)`: the safetensors
reader of a directory, or `gguf.GGUFCheckpoint` for a `.gguf` file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.errors import ConfigError, ModelLoadError
from kif_jax.models.architectures import architecture
from kif_jax.models.decoder import DecoderConfig, DecoderLM
from kif_jax.models.hf_files import (FLOAT_DTYPES, SAFE_WEIGHTS, SafetensorsReader, read_config, resolve_checkpoint,
                                     summarise, transpose, weight_files)
from kif_jax.models.layers import LoRAConfig, LoRAParam, dotted, init_lora_state, merged_kernels
from kif_jax.sharding import place


class TensorReader(Protocol):
    """What the loading core reads: tensor names, shapes and dtypes first, data on demand."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> str: ...

    def get(self, name: str) -> np.ndarray: ...


# Buffers some (older) checkpoints store: RoPE tables are recomputed from the config.
_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")
_EMBED = "model.embed_tokens.weight"
_HEAD = "lm_head.weight"


def hf_to_model_path(name: str, model_type: str = "llama") -> tuple[str, Callable | None] | None:
    """The model path of a Hugging Face tensor name (in `model_type`'s table) and its transform; None if unknown."""
    return architecture(model_type, family="decoder").names.to_model(name)


def model_to_hf_name(path: str, model_type: str = "llama") -> tuple[str, Callable | None] | None:
    """The Hugging Face name of a dotted model path and its (inverse) transform."""
    return architecture(model_type, family="decoder").names.to_hf(path)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _untie_if_separate_head(config: DecoderConfig, reader: TensorReader) -> DecoderConfig:
    """A config that says tied but a stored lm_head that differs from the embedding: keep the head."""
    names = set(reader.names())
    if not config.tie_word_embeddings or _HEAD not in names:
        return config
    if _EMBED in names and reader.shape(_EMBED) == reader.shape(_HEAD) and np.array_equal(
            reader.get(_EMBED), reader.get(_HEAD)):
        return config
    return dataclasses.replace(config, tie_word_embeddings=False)


def load_from_reader(config: DecoderConfig, reader: TensorReader, *, dtype: Any = jnp.float32,
                     lora: LoRAConfig | None = None, seed: int = 0, source: str = "checkpoint",
                     mesh: Any = None) -> DecoderLM:
    """A `DecoderLM` of `config` whose parameters (in `dtype`) come from `reader`'s tensors.

    With a `mesh`, each tensor goes straight into its `kif_jax.sharding` layout as it is read.
    """
    config = _untie_if_separate_head(config, reader)
    abstract = nnx.eval_shape(lambda: DecoderLM(config, lora=lora, dtype=dtype, param_dtype=dtype,
                                                rngs=nnx.Rngs(seed)))
    graphdef, lora_abstract, base_abstract = nnx.split(abstract, LoRAParam, ...)
    expected = {dotted(path): var for path, var in nnx.to_flat_state(base_abstract)}

    problems: dict[str, list[str]] = {"unexpected tensors": [], "missing parameters": [], "shape mismatches": [],
                                      "unsupported dtypes": []}
    plan: dict[str, tuple[str, Callable | None]] = {}
    seen: set[str] = set()  # parameters with a tensor in the checkpoint, usable or not
    for name in reader.names():
        target = hf_to_model_path(name, config.model_type)
        if target is None:
            if not any(re.fullmatch(p, name) for p in _IGNORED):
                problems["unexpected tensors"].append(name)
            continue
        path, fn = target
        if path not in expected:
            if not (name == _HEAD and config.tie_word_embeddings):  # a stored copy of the tied embedding
                problems["unexpected tensors"].append(f"{name} (no {path} in this {config.model_type} model)")
            continue
        seen.add(path)
        shape = tuple(reader.shape(name))
        if fn is transpose:
            shape = shape[::-1]
        want = tuple(expected[path].get_value().shape)
        if shape != want:
            problems["shape mismatches"].append(f"{name}: checkpoint {shape} (as model layout), model {want}")
            continue
        if reader.dtype(name) not in FLOAT_DTYPES:
            problems["unsupported dtypes"].append(f"{name}: {reader.dtype(name)}")
            continue
        plan[path] = (name, fn)
    problems["missing parameters"] = sorted(set(expected) - seen)
    found = [summarise(k, v) for k, v in problems.items() if v]
    if found:
        raise ModelLoadError(f"{source} does not fit the {config.model_type} model of its config:\n"
                             + "\n".join(found))

    flat = []
    for path, var in nnx.to_flat_state(base_abstract):
        name, fn = plan[dotted(path)]
        value = np.asarray(reader.get(name))
        if fn is not None:
            value = fn(value)
        # One tensor at a time, cast on the host into the target dtype: no float32 copy of a bf16 model.
        flat.append((path, var.replace(place(value.astype(var.get_value().dtype, copy=False), var, mesh))))
        del value
    base = nnx.from_flat_state(flat)
    if lora is None:
        return nnx.merge(graphdef, lora_abstract, base)
    return nnx.merge(graphdef, init_lora_state(lora_abstract, seed), base)


def _config(hf: dict, source: str) -> DecoderConfig:
    try:
        return DecoderConfig.from_hf(hf)
    except ConfigError as e:
        raise ModelLoadError(f"{source}: {e}") from None


def load_decoder(path_or_dir_or_gguf: str, *, dtype: Any = jnp.float32, lora: LoRAConfig | None = None,
                 seed: int = 0, mesh: Any = None) -> DecoderLM:
    """A `DecoderLM` from a checkpoint directory (config.json + safetensors), a hub id or a `.gguf` file.

    Parameters become `dtype` (float32 or bfloat16; logits stay float32). With `lora`, adapters are
    added (float32, B = 0, A drawn from `seed` and each adapter's path), as peft initialises them.
    """
    path = os.path.expanduser(str(path_or_dir_or_gguf))
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelLoadError(f"GGUF file {path} does not exist")
        from kif_jax.models.gguf import GGUFCheckpoint

        checkpoint = GGUFCheckpoint(path)
        model = load_from_reader(_config(checkpoint.config, path), checkpoint, dtype=dtype, lora=lora, seed=seed,
                                 source=path, mesh=mesh)
    else:
        directory = resolve_checkpoint(path)
        config = _config(read_config(directory), os.path.join(directory, "config.json"))
        reader = SafetensorsReader(weight_files(directory))
        model = load_from_reader(config, reader, dtype=dtype, lora=lora, seed=seed, source=f"checkpoint {directory}",
                                 mesh=mesh)
    model.name_or_path = str(path_or_dir_or_gguf)
    return model


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def to_hf_state_dict(model: DecoderLM) -> dict[str, np.ndarray]:
    """Hugging Face names -> numpy arrays, adapters merged into their kernels (W + scale A B)."""
    merged = {f"{p}.kernel": w for p, w in merged_kernels(model).items()}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam))):
        key = dotted(path)
        hf = model_to_hf_name(key, model.config.model_type)
        if hf is None:
            raise ModelLoadError(f"no Hugging Face name for model parameter {key}")
        name, fn = hf
        value = np.asarray(merged.get(key, var[...]))
        out[name] = np.ascontiguousarray(fn(value) if fn is not None else value)
    return out


def save_pretrained(model: DecoderLM, directory: str) -> None:
    """Write `config.json` and `model.safetensors` (LoRA merged) that `load_decoder` and HF read."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf(), f, indent=2)
    save_file(to_hf_state_dict(model), os.path.join(directory, SAFE_WEIGHTS), metadata={"format": "pt"})
