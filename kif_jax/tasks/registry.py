"""The one list of task formats: `config.task_format` names them, the data pipeline and the evaluation ask them.

Built-in formats are the `FORMATS` tuples of the modules in `BUILTIN_MODULES`, in that order. A format of one's
own is either registered (`register(MyFormat)`) or named in `config.task_format` as `module:Class`
(`my_formats:MyFormat`), which imports the module (from the Python path) and registers the class under its
`name`, as `config.methods` does for methods.
"""
from __future__ import annotations

from typing import Any

from kif_jax.class_registry import ClassRegistry
from kif_jax.errors import ConfigError
from kif_jax.tasks.base import TaskFormat

BUILTIN_MODULES = (
    "kif_jax.tasks.classification",
    "kif_jax.tasks.generation",
)
DEFAULT = "classification"  # the format of a run whose benchmark names none (the CL benchmark, synthetic tasks)
# The format of each benchmark's files (kif_jax/data/benchmark.py names the benchmarks); others are DEFAULT's.
BENCHMARK_FORMATS: dict[str, str] = {"superni": "generation", "superni_gen5": "generation"}

_FORMATS = ClassRegistry(TaskFormat, kind="task format", field="task_format", public="kif_jax.tasks.TaskFormat",
                         builtin_modules=BUILTIN_MODULES, attr="FORMATS")
_INSTANCES: dict[type[TaskFormat], TaskFormat] = {}
register = _FORMATS.register
builtin_names = _FORMATS.builtin_names
names = _FORMATS.names
format_class = _FORMATS.lookup


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


def benchmark_format(benchmark: str | None) -> str:
    """The task format a benchmark's files are in: DEFAULT unless BENCHMARK_FORMATS says."""
    return BENCHMARK_FORMATS.get(benchmark or "", DEFAULT)


def run_format(config: Any) -> TaskFormat:
    """The format of a run: `config.task_format`, else its benchmark's (`BENCHMARK_FORMATS`), else classification."""
    name = config.get("task_format", "") or benchmark_format(config.benchmark or None)
    return get_format(name)
