"""The one list of methods: `config.methods` names, the validation messages, the report and the memory plan read it.

Built-in methods are the `METHODS` tuples of the modules in `BUILTIN_MODULES`, in that order. A method
of one's own is either registered (`register(MyMethod)`, e.g. at the end of its module) or named in
`config.methods` as `module:Class` (`my_methods:MyMethod`), which imports the module (from the Python
path) and registers the class under its `name`.
"""
from __future__ import annotations

from typing import Iterable

import ml_collections

from kif_jax.class_registry import ClassRegistry
from kif_jax.comma_lists import split_list
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

_METHODS = ClassRegistry(Method, kind="method", field="methods", public="kif_jax.methods.Method",
                         builtin_modules=BUILTIN_MODULES, attr="METHODS")
register = _METHODS.register
builtin_names = _METHODS.builtin_names
names = _METHODS.names
method_class = _METHODS.lookup


def resolve(entries: Iterable[str]) -> list[type[Method]]:
    """The classes of every `config.methods` entry, in order."""
    return [method_class(entry) for entry in entries]


def sections() -> dict[str, type[Method]]:
    """Each config section of a built-in method, and the (first) method class that owns it, in registry order."""
    owners: dict[str, type[Method]] = {}
    for name in _METHODS.builtin_names():
        cls = _METHODS.classes[name]
        if cls.section and cls.section not in owners:
            owners[cls.section] = cls
    return owners


def unrelated_sections(config: ml_collections.ConfigDict, cls: type[Method]) -> list[str]:
    """The config sections a run of `cls` does not read: every other method's (built-in, registered or named in
    `config.methods`), less its own and its `shared_sections`. Its checkpoints' fingerprint leaves them out, so
    adding a method to a workdir, or changing another method's settings, keeps the finished runs there."""
    resolve(split_list(config.methods))  # registers the methods of one's own named there
    owned = {c.section for c in _METHODS.classes.values() if c.section}
    keep = {cls.section, *cls.shared_sections}
    return sorted(s for s in owned - keep if s in config)
