"""The one list of task formats: `config.task_format` names them, the data pipeline and the evaluation ask them.

Built-in formats are the `FORMATS` tuples of the modules in `BUILTIN_MODULES`, in that order. A format of one's
own is either registered (`register(MyFormat)`) or named in `config.task_format` as `module:Class`
(`my_formats:MyFormat`), which imports the module (from the Python path) and registers the class under its
`name`, as `config.methods` does for methods.
"""
from __future__ import annotations

import importlib
from typing import Any

from kif_jax.errors import ConfigError
from kif_jax.tasks.base import TaskFormat

BUILTIN_MODULES = (
    "kif_jax.tasks.classification",
    "kif_jax.tasks.generation",
)
DEFAULT = "classification"  # the format of a run whose benchmark names none (the CL benchmark, synthetic tasks)

_REGISTRY: dict[str, type[TaskFormat]] = {}
_BUILTIN: list[str] = []
_INSTANCES: dict[type[TaskFormat], TaskFormat] = {}


def register(cls: type[TaskFormat]) -> type[TaskFormat]:
    """Add a format class under its `name` (usable as a decorator); a different class of a taken name is refused."""
    if not (isinstance(cls, type) and issubclass(cls, TaskFormat)):
        raise ConfigError(f"{cls!r} is not a kif_jax.tasks.TaskFormat subclass")
    if not cls.name:
        raise ConfigError(f"task format class {cls.__qualname__} has no `name`")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ConfigError(f"task format name {cls.name!r} is taken by {_REGISTRY[cls.name].__module__}."
                          f"{_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    if _BUILTIN:
        return
    for module in BUILTIN_MODULES:
        for cls in importlib.import_module(module).FORMATS:
            register(cls)
            _BUILTIN.append(cls.name)


def builtin_names() -> tuple[str, ...]:
    """The built-in formats, in registry order."""
    _load_builtins()
    return tuple(_BUILTIN)


def names() -> tuple[str, ...]:
    """Every registered format: the built-in ones, then those registered since."""
    _load_builtins()
    return tuple(_REGISTRY)


def format_class(name: str) -> type[TaskFormat]:
    """The class of a `config.task_format` entry: a registered name, or `module:Class` (imported and registered)."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"task format {name!r} in config field 'task_format': cannot import module "
                              f"{module_name!r} ({err})") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            raise ConfigError(f"task format {name!r} in config field 'task_format': module {module_name!r} has no "
                              f"{class_name!r}")
        return register(cls)
    raise ConfigError(f"unknown task format '{name}' in config field 'task_format'; known: {', '.join(_REGISTRY)}"
                      " (or module:Class for a format of your own)")


def get_format(spec: str | TaskFormat | type[TaskFormat] | None = None) -> TaskFormat:
    """The (shared, stateless) instance of a format: a name, `module:Class`, a class or an instance; None is
    the default, classification."""
    if isinstance(spec, TaskFormat):
        return spec
    cls = spec if isinstance(spec, type) else format_class(spec or DEFAULT)
    if not issubclass(cls, TaskFormat):
        raise ConfigError(f"{cls!r} is not a kif_jax.tasks.TaskFormat subclass")
    if cls not in _INSTANCES:
        _INSTANCES[cls] = cls()
    return _INSTANCES[cls]


def run_format(config: Any) -> TaskFormat:
    """The format of a run: `config.task_format`, else its benchmark's (kif_jax/data/benchmark.py), else
    classification."""
    from kif_jax.data.benchmark import benchmark_format

    name = config.get("task_format", "") or benchmark_format(config.benchmark or None)
    return get_format(name)
