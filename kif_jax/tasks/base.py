"""The task-format interface: how a benchmark's files are read, what the model is asked, how an answer scores.

A format is one class. The data pipeline (kif_jax/data/, kif_jax/train/data.py) reads every file through
`read`, the evaluation (kif_jax/evaluation.py) scores every prediction through `score` and each task's entry of
the score matrix through `aggregate`; neither names a metric, as the training loop names no method.
"""
from __future__ import annotations

import abc
import math
import pathlib
from typing import Any, ClassVar, Sequence


class TaskFormat(abc.ABC):
    """One way a benchmark's tasks are stored, prompted and scored (subclass it; every hook but `read` and
    `score` has a default).

    A record (one example, what `read` returns) is a dict with at least

      id      str, unique in its file
      input   str, the whole prompt the model reads
      output  str, the target the model is trained on
      task    str, the task's name

    and whatever else `score` needs (the generation format keeps every reference in `references`).
    An optional `prompt_parts` (head, body, tail), whose concatenation is `input`, says what an over-long
    prompt may lose: the end of `body` only (decoder-only models; T5 inputs lose their end).
    """

    name: ClassVar[str] = ""  # the `config.task_format` name
    # What the score matrix holds, as tables and results.json name it ("accuracy" is not written there).
    metric: ClassVar[str] = "accuracy"
    # Every per-example score is 0 or 1: prediction records carry `correct` beside `score`, and
    # `kif_jax.compare` adds exact McNemar tests.
    binary: ClassVar[bool] = True
    # Per-example fields that `score` returns besides `score` and that a run also aggregates into a matrix of
    # their own (results.json "also"; e.g. the generation format's "exact_match").
    also: ClassVar[tuple[str, ...]] = ()
    # The files have a dev split (`<data_dir>/dev/<task>.json`). Without one, dev examples (eval.split="dev",
    # train.select_best) are held out of the training file, and the run trains on the rest.
    has_dev_split: ClassVar[bool] = True
    # The tasks have a fixed set of label options (`labels`): eval.mode="score" ranks them, and the memory
    # buffer samples class-balanced.
    has_options: ClassVar[bool] = False

    @abc.abstractmethod
    def read(self, path: pathlib.Path, task: str) -> list[dict]:
        """The validated records of one split file; any problem raises `kif_jax.errors.DataError` with one line
        naming the file (and the record)."""

    def labels(self, records: Sequence[dict]) -> list[str] | None:
        """The label options of a split's records, in prompt order; None for a format without options."""
        return None

    @abc.abstractmethod
    def score(self, prediction: str, record: dict) -> dict[str, Any]:
        """The prediction's scores: {"score": float in [0, 1], **fields named in `also`}. A binary format also
        returns {"correct": bool} with score == float(correct)."""

    def aggregate(self, scores: Sequence[float]) -> float:
        """A task's entry of the score matrix from its examples' scores (NaN without examples): the mean."""
        return math.fsum(scores) / len(scores) if len(scores) else math.nan

    def generation_length(self, records: Sequence[dict], tokenizer: Any, max_target_length: int) -> int | None:
        """Greedy-decoding length (tokens) of a task whose training records are `records`; None: the config's
        eval.max_new_tokens."""
        return None
