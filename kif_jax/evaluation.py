"""Evaluation: batched, jitted greedy decoding (or option scoring), scored by the task's format.

`eval.mode = "generate"` (the paper's metric) decodes greedily; the task format (kif_jax/tasks/) scores the
text: classification by exact match with the label (a generated answer may be no label at all), generation
(SuperNI) by ROUGE-L against the references, decoded to the length its references need. `"score"` ranks the
task's label options (its `Option:` list; classification only) by the model's log-likelihood of each option
(+ EOS) in one batched pass per batch: it can never produce an invalid label, and on a trained model it agrees
with greedy decoding wherever greedy decoding produced a valid option (`tests/test_evaluation.py`).

`evaluate_task` is what a run calls: predictions, one record per example with the format's scores, and the
task's entry of the score matrix; the training loop names no metric.

In multi-process runs every process feeds its rows of each batch and gets the whole batch's
predictions back (`kif_jax.distributed.fetch`), so every process computes the same accuracy.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kif_jax import metrics
from kif_jax.distributed import fetch
from kif_jax.data.batching import TokenizedDataset, eval_batches
from kif_jax.models.family import ModelFamily
from kif_jax.models.tokenizers import Tokenizer
from kif_jax.sharding import shard_rows
from kif_jax.tasks.base import TaskFormat

MODES = ("generate", "score")


class Evaluator:
    """Decodes (or scores) whole test sets in fixed-shape batches (one compile per length bucket)."""

    def __init__(self, graphdef: nnx.GraphDef, family: ModelFamily, tokenizer: Tokenizer, *, batch_size: int,
                 max_new_tokens: int, mesh: Mesh, mode: str = "generate", max_target_length: int = 128) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown evaluation mode {mode!r}; known: {', '.join(MODES)}")
        self.family = family
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.mesh = mesh
        self.mode = mode
        self.max_target_length = max_target_length
        self._options: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

        self.max_new_tokens = max_new_tokens

        def decode(params: Any, frozen: Any, input_ids: jax.Array, attention_mask: jax.Array, *,
                   max_new_tokens: int) -> jax.Array:
            model = nnx.merge(graphdef, params, frozen)
            return family.greedy(model, input_ids, attention_mask, max_new_tokens=max_new_tokens)

        def score(params: Any, frozen: Any, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
                  option_mask: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, params, frozen)
            return family.score(model, input_ids, attention_mask, option_ids, option_mask).argmax(-1)

        self._decode = jax.jit(decode, static_argnames="max_new_tokens")
        self._score = jax.jit(score)

    def option_arrays(self, options: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The options as targets are tokenized (label + EOS): ids and mask int32 [C, T]."""
        key = tuple(options)
        if key not in self._options:
            rows = self.family.tokenize([{"input": "x", "output": o} for o in options], self.tokenizer,
                                        max_input_length=8, max_target_length=self.max_target_length).target_ids
            length = max(len(r) for r in rows)
            ids = np.full((len(rows), length), self.tokenizer.pad_token_id, np.int32)
            mask = np.zeros((len(rows), length), np.int32)
            for i, row in enumerate(rows):
                ids[i, :len(row)], mask[i, :len(row)] = row, 1
            self._options[key] = (ids, mask)
        return self._options[key]

    def predictions(self, params: Any, frozen: Any, dataset: TokenizedDataset,
                    options: Sequence[str] | None = None, *, max_new_tokens: int | None = None) -> list[str]:
        """The predicted text of every example of `dataset`, in order ("score" needs `options`).

        `max_new_tokens`: the decoding length (default: the evaluator's, decoded as it is). A given length is
        decoded to the next power of two (from 8: one compiled program per bucket, not per task) and cut: the
        first tokens of a greedy continuation are those of a shorter one (in exact arithmetic; the longer
        decoding cache may round differently)."""
        if self.mode == "score" and not options:
            raise ValueError("eval mode 'score' needs the task's label options")
        length = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        bucket = length if max_new_tokens is None else _decode_bucket(length)
        out: list[str] = []
        for batch, n_real in eval_batches(dataset, self.batch_size):
            ids = shard_rows({k: batch[k] for k in ("input_ids", "attention_mask")}, self.mesh, row_axis=0)
            if self.mode == "generate":
                tokens = fetch(self._decode(params, frozen, ids["input_ids"], ids["attention_mask"],
                                            max_new_tokens=bucket))
                out.extend(self.tokenizer.decode_batch(tokens[:n_real, :length].tolist()))
                continue
            option_ids, option_mask = self.option_arrays(options)
            shape = (self.batch_size, *option_ids.shape)
            opts = shard_rows({"ids": np.broadcast_to(option_ids, shape).copy(),
                               "mask": np.broadcast_to(option_mask, shape).copy()}, self.mesh, row_axis=0)
            best = fetch(self._score(params, frozen, ids["input_ids"], ids["attention_mask"], opts["ids"],
                                          opts["mask"]))
            out.extend(options[int(i)] for i in best[:n_real])
        return out

    def accuracy(self, params: Any, frozen: Any, dataset: TokenizedDataset,
                 options: Sequence[str] | None = None) -> float:
        """Exact-match accuracy (case-insensitive, stripped) in [0, 1]."""
        return metrics.exact_match(self.predictions(params, frozen, dataset, options), dataset.references)


def _decode_bucket(length: int) -> int:
    """The decoding length a `length`-token generation runs at: the next power of two from 8."""
    bucket = 8
    while bucket < length:
        bucket *= 2
    return bucket


def evaluate_task(evaluator: Evaluator, task_format: TaskFormat, params: Any, frozen: Any, dataset: TokenizedDataset,
                  records: Sequence[dict], *, options: Sequence[str] | None = None,
                  max_new_tokens: int | None = None) -> tuple[float, list[dict]]:
    """One task's entry of the score matrix and one record per evaluated example, in order: `task`, `index` (its
    position among them), `id`, `prediction`, `label` (the target), what the format's `score` gives (`correct`
    and `score` for classification; `score` and `exact_match` for generation) and, where an example has several,
    its `references`."""
    predictions = evaluator.predictions(params, frozen, dataset, options, max_new_tokens=max_new_tokens)
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    out = []
    for i, (prediction, record) in enumerate(zip(predictions, records)):
        row = {"task": record["task"], "index": i, "id": record["id"], "prediction": prediction,
               "label": record["output"], **task_format.score(prediction, record)}
        if len(record.get("references", ())) > 1:
            row["references"] = list(record["references"])
        out.append(row)
    return task_format.aggregate([row["score"] for row in out]), out
