"""Benchmark loading and validation, the replay memory, batching for jit, and the synthetic suite.

    tasks = resolve_tasks(benchmark="long", order=1)          # or tasks="cb,copa,rte"
    validate_tasks(data_dir, tasks)                           # every file checked up front
    train = tokenize_records(load_split(data_dir, tasks[4], "train"), tokenizer)
    memory = tokenize_records(memory_buffer(data_dir, tasks[:4]), tokenizer)  # 2%, class-balanced
    batches = BatchIterator(train, 8, seed=0)                 # .next(), .state(), .restore(state)
    replay = sample_batch(memory, 8, np.random.default_rng(0))
"""
from kif_jax.data.batching import (
    IGNORE_INDEX,
    BatchIterator,
    TokenizedDataset,
    collate,
    eval_batches,
    pad_batch,
    power_of_two_buckets,
    sample_batch,
    stack_batches,
)
from kif_jax.data.benchmark import (
    BENCHMARK_ORDERS,
    BENCHMARKS,
    ORDERS,
    SUPERNI_GEN5_ORDERS,
    SUPERNI_ORDERS,
    SPLITS,
    TASKS,
    load_split,
    resolve_tasks,
    split_labels,
    split_path,
    task_labels,
    validate_tasks,
)
from kif_jax.data.buffer import memory_buffer
from kif_jax.data.synthetic import SYNTHETIC_TASKS, make_task, write_synthetic_benchmark

__all__ = [
    "BENCHMARK_ORDERS", "SUPERNI_GEN5_ORDERS", "SUPERNI_ORDERS",
    "BENCHMARKS", "IGNORE_INDEX", "ORDERS", "SPLITS", "SYNTHETIC_TASKS", "TASKS", "BatchIterator",
    "TokenizedDataset", "collate", "eval_batches", "load_split", "make_task", "memory_buffer",
    "pad_batch", "power_of_two_buckets", "resolve_tasks", "sample_batch", "split_labels", "split_path",
    "stack_batches", "task_labels", "tokenize_records", "tokenized_split", "validate_tasks",
    "write_synthetic_benchmark",
]


def __getattr__(name: str):
    """`tokenize_records` and `tokenized_split`, T5's tokenization, moved to kif_jax.models.t5.tokenize: still
    importable from here (the README's path); imported on first use, as kif_jax.data does not depend on models."""
    if name in ("tokenize_records", "tokenized_split"):
        from kif_jax.models.t5 import tokenize

        return getattr(tokenize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
