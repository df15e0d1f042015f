"""Hugging Face T5 checkpoints <-> kif_jax `T5`, through `safetensors` alone (no torch).

The tensors go through the shared loader and exporter (`hf_weights`) with T5's name table (both directions,
an explicit transform per row; `t5/architectures.py`), which check every shape against the abstract model
before any tensor is read and report every problem in one `ModelLoadError`.
"""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.errors import ConfigError, ModelLoadError
from kif_jax.models import hf_weights
from kif_jax.models.hf_files import (FLOAT_DTYPES, HUB_ALLOW_PATTERNS, SAFE_INDEX, SAFE_WEIGHTS,  # noqa: F401
                                     SafetensorsReader, resolve_checkpoint, weight_files)
from kif_jax.models.hf_weights import load_weights
from kif_jax.models.layers import LoRAConfig
from kif_jax.models.t5.architectures import NAMES
from kif_jax.models.t5.model import T5, T5Config


# Tied copies of `shared.weight`, and a bias Hugging Face creates but never uses.
_IGNORED = (
    r"(encoder|decoder)\.embed_tokens\.weight",
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)
_EMBED_ALIASES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


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
    model = load_weights(lambda: T5(config, lora=lora, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)), NAMES,
                         reader, lora=lora, seed=seed, source=f"checkpoint {directory}", what="T5", mesh=mesh,
                         ignored=_IGNORED, tied_copies=("lm_head.kernel",) if config.tie_word_embeddings else (),
                         aliases={"shared.embedding": _EMBED_ALIASES[1:]})
    model.name_or_path = str(path_or_repo_id)
    return model


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def to_hf_state_dict(model: T5) -> dict[str, np.ndarray]:
    """Hugging Face names -> numpy arrays, adapters merged into their kernels (W + scale A B)."""
    return hf_weights.to_hf_state_dict(model, NAMES)


def save_pretrained(model: T5, directory: str) -> None:
    """Write `config.json` and `model.safetensors` (LoRA merged) that `from_pretrained` and HF read."""
    hf_weights.save_pretrained(model, directory, NAMES)
