"""Data assembly of a run: the tokenized splits every method and step reads, cached once, and batch stacking."""
from __future__ import annotations

import pathlib
import zlib
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from kif_jax import data as kdata
from kif_jax.data.batching import TokenizedDataset, pad_batch
from kif_jax.errors import ConfigError
from kif_jax.models.family import ModelFamily
from kif_jax.sharding import shard_rows


class RunData:
    """The benchmark data of a run, tokenized once per (split, tasks) and kept for every method and step."""

    def __init__(self, config: ml_collections.ConfigDict, data_dir: pathlib.Path, family: ModelFamily,
                 tokenizer: Any) -> None:
        self.config = config
        self.data_dir = pathlib.Path(data_dir)
        self.family = family
        self.tokenizer = tokenizer
        self._cache: dict[tuple, TokenizedDataset] = {}

    def tokenized(self, key: tuple, records_fn: Callable[[], list[dict]]) -> TokenizedDataset:
        """The records `records_fn()` gives, tokenized the first time `key` is asked for."""
        if key not in self._cache:
            c = self.config.train
            self._cache[key] = self.family.tokenize(records_fn(), self.tokenizer, max_input_length=c.max_input_length,
                                                    max_target_length=c.max_target_length)
        return self._cache[key]

    def train_records(self, task: str) -> list[dict]:
        """A task's training file, or its seeded random subset of `train.max_examples_per_task` rows."""
        rows = kdata.load_split(self.data_dir, task, "train")
        cap = self.config.train.max_examples_per_task
        if not cap or cap >= len(rows):
            return rows
        pick = np.random.default_rng([self.config.seed, zlib.crc32(task.encode())]).choice(len(rows), cap,
                                                                                           replace=False)
        return [rows[i] for i in sorted(pick)]

    def train_set(self, tasks: Sequence[str]) -> TokenizedDataset:
        """The training examples of `tasks`, in task order."""
        return self.tokenized(("train", tuple(tasks)), lambda: [r for t in tasks for r in self.train_records(t)])

    def memory_records(self, tasks: Sequence[str], *, ratio: float) -> list[dict]:
        """The memory buffer: `ratio` of every task's full training file, class-balanced, seeded by `config.seed`."""
        return kdata.memory_buffer(self.data_dir, list(tasks), ratio=ratio, seed=self.config.seed)

    def memory(self, tasks: Sequence[str], *, ratio: float) -> TokenizedDataset:
        """The memory buffer of `tasks`, tokenized."""
        return self.tokenized(("memory", tuple(tasks)), lambda: self.memory_records(tasks, ratio=ratio))

    def eval_records(self, task: str) -> list[dict]:
        """The examples a task is evaluated on: the first `eval.max_examples_per_task` of its test file,
        or with `eval.split = "dev"` of its dev file, minus any dev input among those test examples."""
        cap = self.config.eval.max_examples_per_task
        test = kdata.load_split(self.data_dir, task, "test")
        test = test[:cap] if cap else test
        if self.config.eval.split == "test":
            return test
        seen = {r["input"] for r in test}
        dev = [r for r in kdata.load_split(self.data_dir, task, "dev") if r["input"] not in seen]
        if not dev:
            raise ConfigError(f"task {task}: every dev example is among the evaluated test examples; "
                              f"lower eval.max_examples_per_task or use eval.split=test")
        return dev[:cap] if cap else dev

    def test_set(self, task: str) -> TokenizedDataset:
        return self.tokenized((self.config.eval.split, task), lambda: self.eval_records(task))

    def dev_set(self, tasks: Sequence[str]) -> TokenizedDataset:
        """`train.select_dev_examples` dev examples of every task, for `train.select_best`."""
        n = self.config.train.select_dev_examples
        return self.tokenized(("dev", tuple(tasks)), lambda: [
            r for t in tasks for r in kdata.load_split(self.data_dir, t, "dev")[:n]])


def common_shape(batches: Sequence[dict]) -> tuple[int, int]:
    """The (input, target) lengths every batch pads to."""
    return (max(b["input_ids"].shape[1] for b in batches), max(b["labels"].shape[1] for b in batches))


def stack_batches(batches: Sequence[dict], input_len: int, target_len: int, *, micro_batch_size: int,
                  mesh: Any) -> dict:
    """Pad to one shape, split rows into [A, mb] micro-batches, stack to [n, A, mb, L], shard rows."""
    mb = micro_batch_size
    padded = [pad_batch(b, input_len, target_len) for b in batches]
    stacked = {k: np.stack([b[k].reshape(-1, mb, b[k].shape[-1]) for b in padded]) for k in padded[0]}
    return shard_rows(stacked, mesh, row_axis=2)
