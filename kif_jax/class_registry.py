"""A registry of classes by `name`: built-in ones from a list of modules, a user's own by `register` or by a
`module:Class` entry in a config field. Methods (kif_jax/methods/registry.py) and task formats
(kif_jax/tasks/registry.py) are each one of these."""
from __future__ import annotations

import importlib
from typing import Generic, Iterable, TypeVar

from kif_jax.errors import ConfigError

T = TypeVar("T", bound=type)


class ClassRegistry(Generic[T]):
    """Classes of `base` by their `name`.

    `kind` names one in messages ("method", "task format"), `field` the config field whose entries name them,
    `public` the base class as users import it; built-in classes are the `attr` tuples of `builtin_modules`,
    loaded on first use, in that order.
    """

    def __init__(self, base: T, *, kind: str, field: str, public: str, builtin_modules: Iterable[str],
                 attr: str) -> None:
        self.base, self.kind, self.field, self.public, self.attr = base, kind, field, public, attr
        self.builtin_modules = tuple(builtin_modules)
        self.classes: dict[str, T] = {}
        self.builtin: list[str] = []

    def register(self, cls: T) -> T:
        """Add a class under its `name` (usable as a decorator); a different class of a taken name is refused."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise ConfigError(f"{cls!r} is not a {self.public} subclass")
        if not cls.name:
            raise ConfigError(f"{self.kind} class {cls.__qualname__} has no `name`")
        taken = self.classes.get(cls.name, cls)
        if taken is not cls:
            raise ConfigError(f"{self.kind} name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}")
        self.classes[cls.name] = cls
        return cls

    def load_builtins(self) -> None:
        if self.builtin:
            return
        for module in self.builtin_modules:
            for cls in getattr(importlib.import_module(module), self.attr):
                self.register(cls)
                self.builtin.append(cls.name)

    def builtin_names(self) -> tuple[str, ...]:
        """The built-in classes' names, in registry order."""
        self.load_builtins()
        return tuple(self.builtin)

    def names(self) -> tuple[str, ...]:
        """Every registered name: the built-in ones, then those registered since, in order."""
        self.load_builtins()
        return tuple(self.classes)

    def lookup(self, name: str) -> T:
        """The class of a config entry: a registered name, or `module:Class` (imported and registered)."""
        self.load_builtins()
        if name in self.classes:
            return self.classes[name]
        where = f"{self.kind} {name!r} in config field '{self.field}'"
        if ":" in name:
            module_name, _, class_name = name.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise ConfigError(f"{where}: cannot import module {module_name!r} ({err})") from None
            cls = getattr(module, class_name, None)
            if cls is None:
                raise ConfigError(f"{where}: module {module_name!r} has no {class_name!r}")
            return self.register(cls)
        raise ConfigError(f"unknown {self.kind} '{name}' in config field '{self.field}'; known: "
                          f"{', '.join(self.classes)} (or module:Class for a {self.kind.split()[-1]} of your own)")
