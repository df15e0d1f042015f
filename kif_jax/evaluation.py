"""Test-set accuracy by batched, jitted greedy decoding and exact match of the label text."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kif_jax import metrics
from kif_jax.data.batching import TokenizedDataset, eval_batches
from kif_jax.models.family import ModelFamily
from kif_jax.models.tokenizers import Tokenizer
from kif_jax.sharding import shard_rows


class Evaluator:
    """Greedy-decodes whole test sets in fixed-shape batches (one compile per length bucket)."""

    def __init__(self, graphdef: nnx.GraphDef, family: ModelFamily, tokenizer: Tokenizer, *, batch_size: int,
                 max_new_tokens: int, mesh: Mesh) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.mesh = mesh

        def decode(params: Any, frozen: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, params, frozen)
            return family.greedy(model, input_ids, attention_mask, max_new_tokens=max_new_tokens)

        self._decode = jax.jit(decode)

    def predictions(self, params: Any, frozen: Any, dataset: TokenizedDataset) -> list[str]:
        """The decoded label text of every example of `dataset`, in order."""
        out: list[str] = []
        for batch, n_real in eval_batches(dataset, self.batch_size):
            ids = shard_rows({k: batch[k] for k in ("input_ids", "attention_mask")}, self.mesh, row_axis=0)
            tokens = np.asarray(self._decode(params, frozen, ids["input_ids"], ids["attention_mask"]))
            out.extend(self.tokenizer.decode_batch(tokens[:n_real].tolist()))
        return out

    def accuracy(self, params: Any, frozen: Any, dataset: TokenizedDataset) -> float:
        """Exact-match accuracy (case-insensitive, stripped) in [0, 1]."""
        return metrics.exact_match(self.predictions(params, frozen, dataset), dataset.references)
