"""PEFT LoRA adapters <-> kif_jax LoRA, for every model family (safetensors only, no torch).

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` as
`peft.PeftModel.save_pretrained` writes them: keys `base_model.model.<HF module>.lora_A.weight`
[r, in] and `.lora_B.weight` [out, r] (torch `nn.Linear` layout), i.e. kif_jax's `lora_a.T` and
`lora_b.T`; the update is x A^T B^T * lora_alpha / r, kif_jax's x @ lora_a @ lora_b * alpha / rank.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from kif_jax.errors import ModelLoadError
from kif_jax.models.family import family_of
from kif_jax.models.hf_files import FLOAT_DTYPES, SafetensorsReader, resolve_checkpoint, summarise
from kif_jax.models.layers import Dense

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<factor>A|B)\.weight")


# --------------------------------------------------------------------------------------------
# What the model's family names: the PEFT task type and the Hugging Face module name of a projection
# --------------------------------------------------------------------------------------------


def _projections(model: nnx.Module) -> dict[str, Dense]:
    """Hugging Face module name -> projection, for every `Dense` of the model (adapted or not)."""
    family = family_of(model)
    return {family.peft_module(m.path): m for _, m in nnx.iter_graph(model) if isinstance(m, Dense)}


def _target_modules(projections: dict[str, Dense]) -> list[str]:
    """PEFT `target_modules` adapting exactly the adapted projections.

    PEFT adapts a module whose name equals a target or ends with '.' + target. The bare leaf names
    (`q`, `v_proj`) are used when they select exactly the adapted set (always so for bare-name
    targets); otherwise the full module names.
    """
    adapted = sorted(name for name, m in projections.items() if m.has_lora)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    if {n for n in projections if n.rsplit(".", 1)[-1] in leaves} == set(adapted):
        return leaves
    return adapted


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def adapter_config(model: nnx.Module, *, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The `adapter_config.json` fields PEFT reads (values as `LoraConfig` defaults them otherwise).

    Only fields every PEFT since 0.10 knows are written, so older versions load it without a warning
    about unknown keys; `peft_version` is left for PEFT to fill in.
    """
    lora = model.lora
    if lora is None:
        raise ModelLoadError(f"this {type(model).__name__} has no LoRA adapters to save (built with lora=None)")
    alpha = float(lora.alpha)
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(lora.dropout),
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(lora.rank),
        "rank_pattern": {},
        "revision": None,
        "target_modules": _target_modules(_projections(model)),
        "task_type": family_of(model).peft_task_type,
        "use_dora": False,
        "use_rslora": False,
    }


def adapter_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """PEFT tensor names -> float32 arrays: lora_A [r, in] = lora_a.T, lora_B [out, r] = lora_b.T."""
    out = {}
    for name, m in sorted(_projections(model).items()):
        if m.has_lora:
            out[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(m.lora_a[...], np.float32).T)
            out[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(m.lora_b[...], np.float32).T)
    return out


def save_adapter(model: nnx.Module, directory: str, *, base_model_name_or_path: str | None = None) -> None:
    """Write the model's LoRA adapters as PEFT does: `adapter_config.json` + `adapter_model.safetensors`.

    `peft.PeftModel.from_pretrained(hf_model, directory)` then reproduces the kif_jax model.
    `base_model_name_or_path` defaults to what `from_pretrained` loaded the model from (`model.name_or_path`).
    """
    from safetensors.numpy import save

    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None)
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path)
    tensors = adapter_state_dict(model)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
    # Serialised in memory and written with open(), so the file gets the umask's mode (safetensors'
    # save_file writes a 0600 temporary file). Adapters are small.
    with open(os.path.join(directory, ADAPTER_WEIGHTS), "wb") as f:
        f.write(save(tensors, metadata={"format": "pt"}))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise ModelLoadError(f"no {ADAPTER_CONFIG} in {directory}: not a PEFT adapter directory")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return config


def _config_problems(config: dict[str, Any], model: nnx.Module) -> list[str]:
    """What in `adapter_config.json` kif_jax's LoRA cannot represent, or differs from the model's."""
    problems = []
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        problems.append(f"peft_type {peft_type!r}: only 'LORA' is supported")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    lora = model.lora
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r {r!r} is not a positive integer")
    elif not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        problems.append(f"lora_alpha {alpha!r} is not a number")
    elif lora is None:
        problems.append(f"the model has no LoRA adapters: build it with lora=LoRAConfig(rank={r}, "
                        f"alpha={float(alpha)}, targets={tuple(config.get('target_modules') or ())!r})")
    else:
        if r != lora.rank:
            problems.append(f"r {r} != the model's LoRA rank {lora.rank}")
        if not math.isclose(alpha / r, lora.scale, rel_tol=1e-6):
            problems.append(f"scale lora_alpha / r = {alpha}/{r} = {alpha / r:g} != the model's "
                            f"alpha / rank = {lora.alpha}/{lora.rank} = {lora.scale:g}")
    if config.get("use_rslora"):
        problems.append("use_rslora true (scale alpha / sqrt(r)) is not supported")
    if config.get("use_dora"):
        problems.append("use_dora true (DoRA) is not supported")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config.get('bias')!r}: only 'none' is supported")
    if config.get("lora_bias"):
        problems.append("lora_bias true is not supported")
    for key in ("modules_to_save", "layer_replication", "target_parameters", "trainable_token_indices"):
        if config.get(key):
            problems.append(f"{key} {config[key]!r} is not supported")
    for key, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        odd = {k: v for k, v in (config.get(key) or {}).items() if v != default}
        if odd:
            problems.append(f"{key} {odd!r}: per-module ranks and scales are not supported")
    return problems


def load_adapter(model: nnx.Module, directory: str) -> nnx.Module:
    """Read a PEFT LoRA adapter into `model` in place (its LoRA variables are assigned); returns `model`.

    The model must carry LoRA of the adapter's rank and scale on exactly the adapter's modules
    (e.g. `from_pretrained(base, lora=LoRAConfig(rank=r, alpha=lora_alpha, targets=...))`); every
    mismatch is reported in one `ModelLoadError` and the model is left untouched. Values keep the
    sharding of the variables they replace.
    """
    if not os.path.isdir(os.path.expanduser(str(directory))):
        directory = resolve_checkpoint(str(directory))
    directory = os.path.expanduser(str(directory))
    config = _read_config(directory)
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        if os.path.exists(os.path.join(directory, "adapter_model.bin")):
            raise ModelLoadError(f"{directory} holds only a PyTorch pickle (adapter_model.bin); kif_jax reads "
                                 "safetensors only. Re-save it once with torch: PeftModel.from_pretrained(base, "
                                 "SRC).save_pretrained(DST) (safe_serialization is the default).")
        raise ModelLoadError(f"no {ADAPTER_WEIGHTS} in {directory}")
    try:
        reader = SafetensorsReader(dict.fromkeys(_tensor_names(weights), weights))
    except Exception as e:  # noqa: BLE001 - a corrupt file of any kind
        raise ModelLoadError(f"cannot read {weights}: {e}") from None

    problems: dict[str, list[str]] = {"config": _config_problems(config, model), "unexpected tensors": [],
                                      "unexpected modules": [], "missing modules": [], "missing tensors": [],
                                      "shape mismatches": [], "unsupported dtypes": []}
    projections = _projections(model)
    adapted = {name: m for name, m in projections.items() if m.has_lora}
    found: dict[str, dict[str, str]] = {}  # module -> {"A": tensor name, "B": tensor name}
    for name in reader.names():
        key = _KEY.fullmatch(name)
        if key is None:
            problems["unexpected tensors"].append(name)
        else:
            found.setdefault(key["module"], {})[key["factor"]] = name
    if model.lora is not None:
        for module in sorted(set(found) - set(adapted)):
            why = "not adapted by this model" if module in projections else "no such projection in this model"
            problems["unexpected modules"].append(f"{module} ({why})")
        problems["missing modules"] = sorted(set(adapted) - set(found))
    plan: list[tuple[nnx.Variable, str]] = []
    for module, factors in sorted(found.items()):
        m = adapted.get(module)
        if m is None:
            continue
        for factor in ("A", "B"):
            if factor not in factors:
                problems["missing tensors"].append(f"{_PREFIX}{module}.lora_{factor}.weight")
                continue
            name = factors[factor]
            var = m.lora_a if factor == "A" else m.lora_b
            want = tuple(var[...].shape[::-1])  # PEFT stores the transpose
            if reader.shape(name) != want:
                layout = "[r, in]" if factor == "A" else "[out, r]"
                problems["shape mismatches"].append(f"{name}: adapter {reader.shape(name)}, model {want} {layout}")
            elif reader.dtype(name) not in FLOAT_DTYPES:
                problems["unsupported dtypes"].append(f"{name}: {reader.dtype(name)}")
            else:
                plan.append((var, name))
    report = [summarise(k, v) for k, v in problems.items() if v]
    if report:
        raise ModelLoadError(f"PEFT adapter {directory} does not fit this {type(model).__name__}:\n"
                             + "\n".join(report))

    for var, name in plan:
        old = var[...]
        value = np.ascontiguousarray(np.asarray(reader.get(name), np.float32).T).astype(old.dtype)
        var[...] = jax.device_put(value, old.sharding) if isinstance(old, jax.Array) else value
    return model


def _tensor_names(file: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, framework="numpy") as f:
        return list(f.keys())
