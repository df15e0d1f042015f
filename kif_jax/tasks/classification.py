"""Classification: the CL benchmark's format (Standard and Long sequences, the synthetic tasks).

A split file is a JSON list of `{"id", "input", "output"}` records; `input` is already the prompt,
`<instruction> Option: <label>, <label>.\\n<text>\\nAnswer:`, and `output` one of its options
(kif_jax/data/benchmark.py reads and validates it). A prediction scores 1 when it equals the label after
stripping and lower-casing (exact match, the paper's metric), else 0; a task's entry is the accuracy.
"""
from __future__ import annotations

import pathlib
from typing import Any, Sequence

from kif_jax.data.benchmark import read_classification, record_options
from kif_jax.metrics import normalize_answer
from kif_jax.tasks.base import TaskFormat


class Classification(TaskFormat):
    name = "classification"
    metric = "accuracy"
    binary = True
    has_dev_split = True
    has_options = True

    def read(self, path: pathlib.Path, task: str) -> list[dict]:
        return read_classification(path, task)

    def labels(self, records: Sequence[dict]) -> list[str] | None:
        return list(record_options(records[0])) if records else []

    def score(self, prediction: str, record: dict) -> dict[str, Any]:
        correct = normalize_answer(prediction) == normalize_answer(record["output"])
        return {"correct": correct, "score": float(correct)}


FORMATS = (Classification,)
