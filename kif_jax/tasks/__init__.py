"""Task formats: how a benchmark's files are read, prompted and scored (docs/tasks.md).

    from kif_jax.tasks import get_format
    fmt = get_format("generation")                  # or "classification", or "my_formats:MyFormat"
    records = fmt.read(path, "task1510_evalution_relation_extraction")
    fmt.score("person HasA offspring", records[0])  # {"score": 1.0, "exact_match": True}

`config.task_format` picks a run's format ("" = its benchmark's); a format of one's own is one module with a
`TaskFormat` subclass, named as `module:Class`.
"""
from kif_jax.tasks.base import TaskFormat
from kif_jax.tasks.registry import (BENCHMARK_FORMATS, benchmark_format, builtin_names, format_class, get_format, names,
                                    register, run_format)

__all__ = ["BENCHMARK_FORMATS", "TaskFormat", "benchmark_format", "builtin_names", "format_class", "get_format", "names",
           "register", "run_format"]
