"""The one list of methods: `config.methods` names, the validation messages, the report and the memory plan read it.

Built-in methods are the `METHODS` tuples of the modules in `BUILTIN_MODULES`, in that order. A method
of one's own is either registered (`register(MyMethod)`, e.g. at the end of its module) or named in
`config.methods` as `module:Class` (`my_methods:MyMethod`), which imports the module (from the Python
path) and registers the class under its `name`.
"""
from __future__ import annotations

import importlib
from typing import Iterable

import ml_collections

from kif_jax.config import split_list
from kif_jax.errors import ConfigError
from kif_jax.methods.base import Method

BUILTIN_MODULES = (
    "kif_jax.methods.recurrent_kif",
    "kif_jax.methods.seq_lora",
    "kif_jax.methods.replay",
    "kif_jax.methods.mtl",
    "kif_jax.methods.o_lora",
    "kif_jax.methods.tasl",
    "kif_jax.methods.ewc",
    "kif_jax.methods.migu",
)

_REGISTRY: dict[str, type[Method]] = {}
_BUILTIN: list[str] = []


def register(cls: type[Method]) -> type[Method]:
    """Add a method class under its `name` (usable as a decorator); a different class of a taken name is refused."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"{cls!r} is not a kif_jax.methods.Method subclass")
    if not cls.name:
        raise ConfigError(f"method class {cls.__qualname__} has no `name`")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ConfigError(f"method name {cls.name!r} is taken by {_REGISTRY[cls.name].__module__}."
                          f"{_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    if _BUILTIN:
        return
    for module in BUILTIN_MODULES:
        for cls in importlib.import_module(module).METHODS:
            register(cls)
            _BUILTIN.append(cls.name)


def builtin_names() -> tuple[str, ...]:
    """The built-in methods, in registry order."""
    _load_builtins()
    return tuple(_BUILTIN)


def names() -> tuple[str, ...]:
    """Every registered method: the built-in ones, then those registered since, in order."""
    _load_builtins()
    return tuple(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class of a `config.methods` entry: a registered name, or `module:Class` (imported and registered)."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"method {name!r} in config field 'methods': cannot import module {module_name!r} "
                              f"({err})") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            raise ConfigError(f"method {name!r} in config field 'methods': module {module_name!r} has no "
                              f"{class_name!r}")
        return register(cls)
    raise ConfigError(f"unknown method '{name}' in config field 'methods'; known: {', '.join(_REGISTRY)}"
                      " (or module:Class for a method of your own)")


def resolve(entries: Iterable[str]) -> list[type[Method]]:
    """The classes of every `config.methods` entry, in order."""
    return [method_class(entry) for entry in entries]


def sections() -> dict[str, type[Method]]:
    """Each config section of a built-in method, and the (first) method class that owns it, in registry order."""
    _load_builtins()
    owners: dict[str, type[Method]] = {}
    for name in _BUILTIN:
        cls = _REGISTRY[name]
        if cls.section and cls.section not in owners:
            owners[cls.section] = cls
    return owners


def unrelated_sections(config: ml_collections.ConfigDict, cls: type[Method]) -> list[str]:
    """The config sections a run of `cls` does not read: every other method's (built-in, registered or named in
    `config.methods`), less its own and its `shared_sections`. Its checkpoints' fingerprint leaves them out, so
    adding a method to a workdir, or changing another method's settings, keeps the finished runs there."""
    resolve(split_list(config.methods))  # registers the methods of one's own named there
    owned = {c.section for c in _REGISTRY.values() if c.section}
    keep = {cls.section, *cls.shared_sections}
    return sorted(s for s in owned - keep if s in config)
