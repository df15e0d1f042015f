"""Hugging Face decoder-only checkpoints (and GGUF files) <-> kif_jax `DecoderLM`, without torch.

The config comes from `config.json` (or a GGUF file's metadata); the tensors go through the shared
loader and exporter (`hf_weights`) with the architecture's name table (`decoder/architectures.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.errors import ConfigError, ModelLoadError
from kif_jax.models import hf_weights
from kif_jax.models.decoder.architectures import decoder_architecture
from kif_jax.models.gguf import GGUFCheckpoint
from kif_jax.models.decoder.model import DecoderConfig, DecoderLM
from kif_jax.models.hf_files import SafetensorsReader, read_config, resolve_checkpoint, weight_files
from kif_jax.models.hf_weights import TensorReader, load_weights
from kif_jax.models.layers import LoRAConfig

# Buffers some (older) checkpoints store: RoPE tables are recomputed from the config.
_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")
_EMBED = "model.embed_tokens.weight"
_HEAD = "lm_head.weight"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def untie_if_separate_head(config: DecoderConfig, reader: TensorReader) -> DecoderConfig:
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
    """A `DecoderLM` of `config` whose parameters (in `dtype`) come from `reader`'s tensors (`hf_weights`)."""
    config = untie_if_separate_head(config, reader)
    return load_weights(lambda: DecoderLM(config, lora=lora, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)),
                        decoder_architecture(config.model_type).names, reader, lora=lora, seed=seed, source=source,
                        what=f"{config.model_type} model", mesh=mesh, ignored=_IGNORED,
                        tied_copies=("lm_head.kernel",) if config.tie_word_embeddings else ())


def _config(hf: dict, source: str) -> DecoderConfig:
    try:
        return DecoderConfig.from_hf(hf)
    except ConfigError as e:
        raise ModelLoadError(f"{source}: {e}") from None


def _with_generation_stops(config: DecoderConfig, directory: str) -> DecoderConfig:
    """Add the stop ids of `generation_config.json`, which transformers' generate() stops on.

    Instruction-tuned checkpoints list their end-of-turn token there only, e.g. Gemma 3's
    <end_of_turn> (106) beside <eos> (1).
    """
    path = os.path.join(directory, "generation_config.json")
    if not os.path.exists(path):
        return config
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    extra = [eos] if isinstance(eos, int) else list(eos or ())
    if not all(isinstance(i, int) and 0 <= i < config.vocab_size for i in extra):
        raise ModelLoadError(f"{path}: eos_token_id {eos!r} must be ids in [0, {config.vocab_size})")
    ids = tuple(dict.fromkeys((*config.eos_token_ids, *extra)))
    return config if ids == config.eos_token_ids else dataclasses.replace(config, eos_token_ids=ids)


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
        checkpoint = GGUFCheckpoint(path)
        model = load_from_reader(_config(checkpoint.config, path), checkpoint, dtype=dtype, lora=lora, seed=seed,
                                 source=path, mesh=mesh)
    else:
        directory = resolve_checkpoint(path)
        config = _with_generation_stops(_config(read_config(directory), os.path.join(directory, "config.json")),
                                        directory)
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
    return hf_weights.to_hf_state_dict(model, decoder_architecture(model.config.model_type).names)


def save_pretrained(model: DecoderLM, directory: str) -> None:
    """Write `config.json` and `model.safetensors` (LoRA merged) that `load_decoder` and HF read."""
    hf_weights.save_pretrained(model, directory, decoder_architecture(model.config.model_type).names)
