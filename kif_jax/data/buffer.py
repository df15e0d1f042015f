"""The replay memory: a small sample of every earlier task's training split (class-balanced where tasks have labels)."""
from __future__ import annotations

import os
import zlib
from typing import Any, Callable, Sequence

import numpy as np

from kif_jax.data.benchmark import load_split, task_labels


def buffer_size(n_train: int, ratio: float) -> int:
    """Records kept of a task with `n_train` training records: int(ratio * n_train)."""
    return int(ratio * n_train)


def balanced_sample(labels: Sequence[str], label_set: Sequence[str], size: int, rng: np.random.Generator) -> list[int]:
    """Indices of `size` rows: max(1, size // n_labels) per label (all rows of a smaller label),
    topped up uniformly from the rest; sorted. If the per-label picks exceed `size` (fewer slots
    than labels) a random `size` of them is kept."""
    if size <= 0:
        return []
    per_label = max(1, size // len(label_set))
    picked: list[int] = []
    for label in label_set:
        rows = [i for i, y in enumerate(labels) if y == label]
        take = min(per_label, len(rows))
        if take:
            picked.extend(int(i) for i in rng.choice(rows, size=take, replace=False))
    if len(picked) > size:
        picked = [int(i) for i in rng.choice(picked, size=size, replace=False)]
    chosen = set(picked)
    rest = [i for i in range(len(labels)) if i not in chosen]
    extra = min(size - len(picked), len(rest))
    if extra > 0:
        picked.extend(int(i) for i in rng.choice(rest, size=extra, replace=False))
    return sorted(picked)


def task_seed(seed: int, task: str) -> list[int]:
    """Seed of one task's sample: (seed, crc32(task)), so it does not depend on the task order."""
    return [int(seed), zlib.crc32(task.encode("utf-8"))]


def memory_buffer(
    data_dir: str | os.PathLike, tasks: Sequence[str], *, ratio: float = 0.02, seed: int = 42,
    task_format: Any = None, records_of: Callable[[str], list[dict]] | None = None,
) -> list[dict]:
    """int(ratio * n_train) training records of each task in `tasks`, in task order, each tagged with its
    `task`; class-balanced where the format has label options (classification), uniform otherwise; the same
    records for the same (seed, task) in any task order.

    `records_of(task)`: the training records to draw from (default: the task's whole training file, read by
    `task_format`), e.g. without the examples a run holds out as dev examples."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"memory ratio must be in [0, 1], got {ratio}")
    memory: list[dict] = []
    for task in tasks:
        records = records_of(task) if records_of is not None else load_split(data_dir, task, "train", task_format)
        rng = np.random.default_rng(task_seed(seed, task))
        size = buffer_size(len(records), ratio)
        label_set = task_labels(data_dir, task, task_format)
        if label_set:
            rows = balanced_sample([r["output"] for r in records], label_set, size, rng)
        else:
            rows = sorted(int(i) for i in rng.choice(len(records), size=min(size, len(records)), replace=False))
        memory.extend(records[i] for i in rows)
    return memory
