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
from kif_jax.tasks import TaskFormat, get_format


class RunData:
    """The benchmark data of a run, tokenized once per (split, tasks) and kept for every method and step.

    Every file is read by the run's task format (kif_jax/tasks/). A format without a dev split (SuperNI: its
    upstream dev file is its test file) holds dev examples out of the training file whenever the run reads dev
    examples (`eval.split = "dev"`, `train.select_best`): a fixed tenth of each task's training file, by task
    name, and the run trains (and draws its memory buffer) on the rest.
    """

    def __init__(self, config: ml_collections.ConfigDict, data_dir: pathlib.Path, family: ModelFamily,
                 tokenizer: Any, task_format: TaskFormat | None = None) -> None:
        self.config = config
        self.data_dir = pathlib.Path(data_dir)
        self.family = family
        self.tokenizer = tokenizer
        self.format = get_format(task_format)
        self.holds_out = not self.format.has_dev_split and (config.train.select_best or config.eval.split == "dev")
        self._cache: dict[tuple, TokenizedDataset] = {}
        self._lengths: dict[str, int | None] = {}

    def tokenized(self, key: tuple, records_fn: Callable[[], list[dict]]) -> TokenizedDataset:
        """The records `records_fn()` gives, tokenized the first time `key` is asked for."""
        if key not in self._cache:
            c = self.config.train
            self._cache[key] = self.family.tokenize(records_fn(), self.tokenizer, max_input_length=c.max_input_length,
                                                    max_target_length=c.max_target_length)
        return self._cache[key]

    def split(self, task: str, split: str) -> list[dict]:
        """The records of one split file, read by the run's task format."""
        return kdata.load_split(self.data_dir, task, split, self.format)

    def training_file(self, task: str) -> list[dict]:
        """A task's training records: its whole training file, less the held-out dev examples where the run
        holds some out."""
        rows = self.split(task, "train")
        if not self.holds_out:
            return rows
        held = set(held_out_rows(task, len(rows)))
        return [r for i, r in enumerate(rows) if i not in held]

    def dev_records(self, task: str) -> list[dict]:
        """A task's dev examples: its dev file, or the examples held out of its training file."""
        if self.format.has_dev_split:
            return self.split(task, "dev")
        rows = self.split(task, "train")
        return [rows[i] for i in held_out_rows(task, len(rows))]

    def train_records(self, task: str) -> list[dict]:
        """A task's training records, or their seeded random subset of `train.max_examples_per_task` rows."""
        rows = self.training_file(task)
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
        """The memory buffer: `ratio` of every task's full training file (class-balanced where the tasks have
        labels), seeded by `config.seed`."""
        return kdata.memory_buffer(self.data_dir, list(tasks), ratio=ratio, seed=self.config.seed,
                                   task_format=self.format, records_of=self.training_file if self.holds_out else None)

    def memory(self, tasks: Sequence[str], *, ratio: float) -> TokenizedDataset:
        """The memory buffer of `tasks`, tokenized."""
        return self.tokenized(("memory", tuple(tasks)), lambda: self.memory_records(tasks, ratio=ratio))

    def eval_records(self, task: str) -> list[dict]:
        """The examples a task is evaluated on: the first `eval.max_examples_per_task` of its test file, or with
        `eval.split = "dev"` of its dev examples; from a dev file, less any dev input among those test examples."""
        cap = self.config.eval.max_examples_per_task
        if self.config.eval.split == "dev" and not self.format.has_dev_split:
            dev = self.dev_records(task)  # held out of training, never read from the test file
            return dev[:cap] if cap else dev
        test = self.split(task, "test")
        test = test[:cap] if cap else test
        if self.config.eval.split == "test":
            return test
        seen = {r["input"] for r in test}
        dev = [r for r in self.dev_records(task) if r["input"] not in seen]
        if not dev:
            raise ConfigError(f"task {task}: every dev example is among the evaluated test examples; "
                              f"lower eval.max_examples_per_task or use eval.split=test")
        return dev[:cap] if cap else dev

    def test_set(self, task: str) -> TokenizedDataset:
        return self.tokenized((self.config.eval.split, task), lambda: self.eval_records(task))

    def options(self, task: str) -> list[str] | None:
        """The task's label options (for eval.mode = "score"), or None for a format without them."""
        return kdata.task_labels(self.data_dir, task, self.format) or None

    def generation_length(self, task: str) -> int | None:
        """How many tokens a task's answers are decoded to: the format's length from the task's training records
        (the generation format: its longest reference), or None for `eval.max_new_tokens`."""
        if task not in self._lengths:
            self._lengths[task] = self.format.generation_length(self.train_records(task), self.tokenizer,
                                                                self.config.train.max_target_length)
        return self._lengths[task]

    def dev_set(self, tasks: Sequence[str]) -> TokenizedDataset:
        """`train.select_dev_examples` dev examples of every task, for `train.select_best`."""
        n = self.config.train.select_dev_examples
        return self.tokenized(("dev", tuple(tasks)), lambda: [r for t in tasks for r in self.dev_records(t)[:n]])


HOLD_OUT_FRACTION = 10  # a format without a dev split holds out 1 / HOLD_OUT_FRACTION of each training file


def held_out_rows(task: str, n: int) -> list[int]:
    """The rows of a task's `n` training records held out as dev examples: n // 10 of them (at least one, none
    of a single record), drawn once by the task's name, so every seed and order holds out the same ones."""
    k = min(max(1, n // HOLD_OUT_FRACTION), n - 1) if n > 1 else 0
    rng = np.random.default_rng([zlib.crc32(task.encode("utf-8")), 1])
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


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
