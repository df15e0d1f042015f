"""Test-set accuracy: batched, jitted greedy decoding (or option scoring) and exact match of the label text.

`eval.mode = "generate"` (the paper's metric) decodes greedily and compares the text with the label;
a generated answer may be no label at all. `"score"` ranks the task's label options (its `Option:`
list) by the model's log-likelihood of each option (+ EOS) in one batched pass per batch: it can
never produce an invalid label, and on a trained model it agrees with greedy decoding wherever
greedy decoding produced a valid option (`tests/test_evaluation.py`).

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

        def decode(params: Any, frozen: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, params, frozen)
            return family.greedy(model, input_ids, attention_mask, max_new_tokens=max_new_tokens)

        def score(params: Any, frozen: Any, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
                  option_mask: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, params, frozen)
            return family.score(model, input_ids, attention_mask, option_ids, option_mask).argmax(-1)

        self._decode = jax.jit(decode)
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
                    options: Sequence[str] | None = None) -> list[str]:
        """The predicted label text of every example of `dataset`, in order ("score" needs `options`)."""
        if self.mode == "score" and not options:
            raise ValueError("eval mode 'score' needs the task's label options")
        out: list[str] = []
        for batch, n_real in eval_batches(dataset, self.batch_size):
            ids = shard_rows({k: batch[k] for k in ("input_ids", "attention_mask")}, self.mesh, row_axis=0)
            if self.mode == "generate":
                tokens = fetch(self._decode(params, frozen, ids["input_ids"], ids["attention_mask"]))
                out.extend(self.tokenizer.decode_batch(tokens[:n_real].tolist()))
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
