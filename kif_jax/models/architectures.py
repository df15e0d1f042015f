"""The one list of supported architectures, keyed by Hugging Face `model_type`.

Each entry says which model family builds it, the `config.json` fields it reads and writes, its tensor
name tables (safetensors and GGUF) with their transforms, its own config reading where the family's
generic one is not enough, and its family's options (a decoder's feature switches). Entries come with
their family (`ModelFamily.architectures`, kif_jax/models/family.py): the built-in families' on first
use, from `BUILTIN_FAMILY_MODULES`; a family registered later brings its own. Loading, export, PEFT,
GGUF reading and the error messages look types up here and name no family (see docs/models.md).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator, Mapping

from kif_jax.errors import ConfigError
from kif_jax.models.hf_files import NameTable

#: The modules of the built-in model families, each with a `FAMILIES` tuple of `ModelFamily` classes.
#: Their architectures are listed in this order (decoder-only first, as the error messages name them).
BUILTIN_FAMILY_MODULES = ("kif_jax.models.decoder.family", "kif_jax.models.t5.family")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One supported `model_type`."""

    model_type: str
    family: str  # the `ModelFamily.name` that builds it
    hf_class: str  # the transformers class named in an exported config.json
    config_fields: tuple[str, ...]  # config.json fields read (and written back on export)
    names: NameTable  # Hugging Face tensor names <-> model paths, with each row's transform
    features: Any = None  # the family's options for this type (a decoder's `DecoderFeatures`)
    untyped: bool = False  # a config.json without `model_type` is of this type (T5's first checkpoints)
    # Config reading of its own, called by the family's generic reading: config_from_hf(hf, kwargs, read_rope)
    # -> kwargs; config_to_hf(config, out) -> out; config_from_gguf(meta, config, path) -> fields to add.
    config_from_hf: Callable[..., dict[str, Any]] | None = None
    config_to_hf: Callable[..., dict[str, Any]] | None = None
    config_from_gguf: Callable[..., dict[str, Any]] | None = None
    gguf_arch: str | None = None  # general.architecture of a GGUF file of this type
    gguf_block_names: tuple[tuple[str, str], ...] = ()  # GGUF name after blk.N. -> HF name after layers.N.
    gguf_norm_offset: float = 0.0  # llama.cpp stores Gemma's norms as 1 + w: subtract this on load
    gguf_unpermute_qk: bool = False  # llama.cpp permuted q/k rows for its adjacent-pair RoPE


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

_REGISTERED: dict[str, Architecture] = {}
_builtins_loaded = False


def register_architecture(arch: Architecture) -> Architecture:
    """Add an entry (a family's registration does it for each of its `architectures`); a different entry
    of a taken `model_type` is refused."""
    taken = _REGISTERED.get(arch.model_type, arch)
    if taken != arch:
        raise ConfigError(f"model_type {arch.model_type!r} is taken by an architecture of family {taken.family!r}")
    _REGISTERED[arch.model_type] = arch
    return arch


def _load_builtins() -> None:
    """The built-in families' entries, imported by name on first use (the families import this module)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    builtin = [a for module in BUILTIN_FAMILY_MODULES for family in importlib.import_module(module).FAMILIES
               for a in family.architectures]
    registered_first = dict(_REGISTERED)
    _REGISTERED.clear()
    for arch in (*builtin, *registered_first.values()):
        register_architecture(arch)


class _Table(Mapping[str, Architecture]):
    """A read-only view of the registry keyed by `key(entry)` (entries with a None key left out)."""

    def __init__(self, key: Callable[[Architecture], str | None]) -> None:
        self._key = key

    def _entries(self) -> dict[str, Architecture]:
        _load_builtins()
        return {self._key(a): a for a in _REGISTERED.values() if self._key(a) is not None}

    def __getitem__(self, name: str) -> Architecture:
        return self._entries()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def __repr__(self) -> str:
        return repr(self._entries())


#: model_type -> its Architecture.
ARCHITECTURES: Mapping[str, Architecture] = _Table(lambda a: a.model_type)
#: general.architecture of a GGUF file -> its Architecture.
GGUF_ARCHITECTURES: Mapping[str, Architecture] = _Table(lambda a: a.gguf_arch)


def model_types(family: str) -> tuple[str, ...]:
    """The model types of one family, in registry order."""
    return tuple(k for k, a in ARCHITECTURES.items() if a.family == family)


def architecture(model_type: Any, *, family: str | None = None, where: str = "model_type") -> Architecture:
    """The registry entry of `model_type` (of `family` if given); a one-line ConfigError naming the known types."""
    known = [k for k, a in ARCHITECTURES.items() if family is None or a.family == family]
    if model_type not in known:
        raise ConfigError(f"{where} {model_type!r} is not supported; supported: {', '.join(known)}")
    return ARCHITECTURES[model_type]


def config_model_type(hf: Mapping[str, Any]) -> Any:
    """The `model_type` of a config.json dict; for one without, the type registered as `untyped` (if any)."""
    if "model_type" in hf:
        return hf["model_type"]
    return next((k for k, a in ARCHITECTURES.items() if a.untyped), None)


def hf_to_model_path(name: str, model_type: str) -> tuple[str, Callable | None] | None:
    """The model path of a Hugging Face tensor name of `model_type` and its transform; None if unknown."""
    return architecture(model_type).names.to_model(name)


def model_to_hf_name(path: str, model_type: str) -> tuple[str, Callable | None] | None:
    """The Hugging Face name of a dotted model path of `model_type` and its (inverse) transform."""
    return architecture(model_type).names.to_hf(path)
