"""Hugging Face T5 checkpoints <-> kif_jax `T5`, through `safetensors` alone (no torch).

One table maps Hugging Face names to model paths (both directions), with an explicit transform
per row; every shape is checked against the abstract model (`nnx.eval_shape`) before any tensor
is read, and every problem is collected and reported in one `ModelLoadError`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.errors import ConfigError, ModelLoadError
from kif_jax.models.hf_files import (FLOAT_DTYPES, HUB_ALLOW_PATTERNS, SAFE_INDEX, SAFE_WEIGHTS,  # noqa: F401
                                     NameTable, SafetensorsReader, convert_hint, resolve_checkpoint, summarise,
                                     transpose, weight_files)
from kif_jax.models.layers import LoRAConfig, LoRAParam, dotted, init_lora_state, merged_kernels
from kif_jax.models.t5 import T5, T5Config
from kif_jax.sharding import place


_FIELDS = {
    "stack": r"encoder|decoder",
    "i": r"\d+",
    "proj": r"q|k|v|o",
    "ff": r"wi|wi_0|wi_1|wo",
}


_t = transpose  # [out, in] (torch) <-> [in, out] (kif_jax)


# (Hugging Face name, model path, transform applied on load; its inverse is the same transpose).
_TABLE: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray] | None], ...] = (
    ("shared.weight", "shared.embedding", None),
    ("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "{stack}.relative_attention_bias.embedding", None),
    ("{stack}.block.{i}.layer.0.SelfAttention.{proj}.weight", "{stack}.blocks.{i}.self_attention.{proj}.kernel", _t),
    ("{stack}.block.{i}.layer.0.layer_norm.weight", "{stack}.blocks.{i}.self_attention_norm.scale", None),
    ("decoder.block.{i}.layer.1.EncDecAttention.{proj}.weight", "decoder.blocks.{i}.cross_attention.{proj}.kernel", _t),
    ("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.blocks.{i}.cross_attention_norm.scale", None),
    ("encoder.block.{i}.layer.1.DenseReluDense.{ff}.weight", "encoder.blocks.{i}.ff.{ff}.kernel", _t),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.blocks.{i}.ff_norm.scale", None),
    ("decoder.block.{i}.layer.2.DenseReluDense.{ff}.weight", "decoder.blocks.{i}.ff.{ff}.kernel", _t),
    ("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.blocks.{i}.ff_norm.scale", None),
    ("{stack}.final_layer_norm.weight", "{stack}.final_norm.scale", None),
    ("lm_head.weight", "lm_head.kernel", _t),
)
# Tied copies of `shared.weight`, and a bias Hugging Face creates but never uses.
_IGNORED = (
    r"(encoder|decoder)\.embed_tokens\.weight",
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)
_EMBED_ALIASES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


NAMES = NameTable(_TABLE, _FIELDS)


def hf_to_model_path(name: str) -> tuple[str, Callable | None] | None:
    """The model path of a Hugging Face tensor name and its transform; None if unknown."""
    return NAMES.to_model(name)


def model_to_hf_name(path: str) -> tuple[str, Callable | None] | None:
    """The Hugging Face name of a dotted model path and its (inverse) transform."""
    return NAMES.to_hf(path)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _untie_if_separate_head(config: T5Config, reader: SafetensorsReader) -> T5Config:
    """transformers 5 marks every T5 tied; a stored lm_head that differs from the embedding unties it."""
    import dataclasses

    if not config.tie_word_embeddings or "lm_head.weight" not in reader.files:
        return config
    source = next((n for n in _EMBED_ALIASES if n in reader.files), None)
    if source is not None and reader.shape(source) == reader.shape("lm_head.weight") and np.array_equal(
            reader.get(source), reader.get("lm_head.weight")):
        return config
    return dataclasses.replace(config, tie_word_embeddings=False)


def load_t5(path_or_repo_id: str, *, dtype: Any = jnp.float32, lora: LoRAConfig | None = None,
            seed: int = 0, mesh: Any = None) -> T5:
    """Read `config.json` and `*.safetensors` into a `T5` whose parameters are `dtype`.

    With a `mesh`, each tensor goes straight into its `kif_jax.sharding` layout as it is read.
    """
    directory = resolve_checkpoint(path_or_repo_id)
    config_file = os.path.join(directory, "config.json")
    if not os.path.exists(config_file):
        raise ModelLoadError(f"no config.json in {directory}")
    try:
        config = T5Config.from_json(config_file)
    except (ConfigError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{config_file}: {e}") from None
    reader = SafetensorsReader(weight_files(directory))
    config = _untie_if_separate_head(config, reader)

    abstract = nnx.eval_shape(lambda: T5(config, lora=lora, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, lora_abstract, base_abstract = nnx.split(abstract, LoRAParam, ...)
    expected = {dotted(path): var for path, var in nnx.to_flat_state(base_abstract)}

    problems: dict[str, list[str]] = {"unexpected tensors": [], "missing parameters": [], "shape mismatches": [],
                                      "unsupported dtypes": []}
    plan: dict[str, tuple[str, Callable | None]] = {}
    seen: set[str] = set()  # parameters with a tensor in the checkpoint, usable or not
    for name in reader.names():
        target = hf_to_model_path(name)
        if target is None:
            if not any(re.fullmatch(p, name) for p in _IGNORED):
                problems["unexpected tensors"].append(name)
            continue
        path, fn = target
        if path not in expected:
            if not (path == "lm_head.kernel" and config.tie_word_embeddings):
                problems["unexpected tensors"].append(f"{name} (no {path} in this model)")
            continue
        seen.add(path)
        shape = reader.shape(name)
        if fn is _t:
            shape = shape[::-1]
        want = tuple(expected[path].get_value().shape)
        if shape != want:
            problems["shape mismatches"].append(f"{name}: checkpoint {shape} (as [in, out]), model {want}")
            continue
        if reader.dtype(name) not in FLOAT_DTYPES:
            problems["unsupported dtypes"].append(f"{name}: {reader.dtype(name)}")
            continue
        plan[path] = (name, fn)
    if "shared.embedding" not in plan and "shared.embedding" in expected:
        alias = next((n for n in _EMBED_ALIASES[1:] if n in reader.files), None)
        if alias is not None and reader.shape(alias) == tuple(expected["shared.embedding"].get_value().shape):
            plan["shared.embedding"] = (alias, None)
            seen.add("shared.embedding")
    problems["missing parameters"] = sorted(set(expected) - seen)
    found = [summarise(k, v) for k, v in problems.items() if v]
    if found:
        raise ModelLoadError(f"checkpoint {directory} does not fit the T5 of its config.json:\n" + "\n".join(found))

    flat = []
    for path, var in nnx.to_flat_state(base_abstract):
        name, fn = plan[dotted(path)]
        value = reader.get(name)
        if fn is not None:
            value = fn(value)
        flat.append((path, var.replace(place(np.asarray(value).astype(var.get_value().dtype), var, mesh))))
    base = nnx.from_flat_state(flat)
    model = nnx.merge(graphdef, lora_abstract if lora is None else init_lora_state(lora_abstract, seed), base)
    model.name_or_path = str(path_or_repo_id)
    return model


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def to_hf_state_dict(model: T5) -> dict[str, np.ndarray]:
    """Hugging Face names -> numpy arrays, adapters merged into their kernels (W + scale A B)."""
    merged = {f"{p}.kernel": w for p, w in merged_kernels(model).items()}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam))):
        key = dotted(path)
        hf = model_to_hf_name(key)
        if hf is None:
            raise ModelLoadError(f"no Hugging Face name for model parameter {key}")
        name, fn = hf
        value = np.asarray(merged.get(key, var[...]))
        out[name] = np.ascontiguousarray(fn(value) if fn is not None else value)
    return out


def save_pretrained(model: T5, directory: str) -> None:
    """Write `config.json` and `model.safetensors` (LoRA merged) that `from_pretrained` and HF read."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf(), f, indent=2)
    save_file(to_hf_state_dict(model), os.path.join(directory, SAFE_WEIGHTS), metadata={"format": "pt"})
