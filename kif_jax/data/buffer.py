"""The replay memory: a small class-balanced sample of every earlier task's training split."""
from __future__ import annotations

import os
import zlib
from typing import Sequence

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
    data_dir: str | os.PathLike, tasks: Sequence[str], *, ratio: float = 0.02, seed: int = 42
) -> list[dict]:
    """int(ratio * n_train) class-balanced training records of each task in `tasks`, in task order,
    each tagged with its `task`; the same records for the same (seed, task) in any task order."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"memory ratio must be in [0, 1], got {ratio}")
    memory: list[dict] = []
    for task in tasks:
        records = load_split(data_dir, task, "train")
        rng = np.random.default_rng(task_seed(seed, task))
        rows = balanced_sample([r["output"] for r in records], task_labels(data_dir, task),
                               buffer_size(len(records), ratio), rng)
        memory.extend(records[i] for i in rows)
    return memory
