"""Tokenized splits and fixed-shape batches for jit: bucketed lengths, padded rows, resumable order.

Shapes. `jit` compiles once per distinct batch shape, so lengths are padded up to a small set of
buckets: powers of two from 32 (inputs) / 8 (targets) up to the configured maximum, plus the
maximum itself (`power_of_two_buckets`). With the defaults (1024 input / 128 target tokens) that is
at most 6 x 5 shapes for a whole run, shared by every task because the buckets depend on the
configured maxima only, not on the data; padding never more than doubles a batch's length (a
sequence of length L lands in a bucket < 2L), and short tasks (labels of a few tokens, inputs of a
few hundred) do not pay for the 1024-token maximum. Every training batch has exactly `batch_size`
rows: a short final batch is filled with rows whose labels are all IGNORE_INDEX (no loss, no
gradient) and whose encoder sees a single EOS token (so no attention row is fully masked).

Two batch layouts, chosen by the dataset's `layout` (all `np.int32`):

"seq2seq" (T5):
  input_ids          [B, S]  token ids, pad id after the EOS
  attention_mask     [B, S]  1 on real tokens
  decoder_input_ids  [B, T]  targets shifted right, starting with the pad id (T5's start token)
  labels             [B, T]  target ids, IGNORE_INDEX on padding

"causal" (decoder-only): a row is prompt + label + EOS, right-padded to a bucket of length L
  input_ids          [B, L]  the row's ids, pad id after it
  attention_mask     [B, L]  1 on real tokens
  labels             [B, L]  the ids of the label and its EOS at their own positions, IGNORE_INDEX
                             elsewhere (the loss shifts: logits at t predict labels at t + 1)
Since `labels` has the length of `input_ids`, padding and stacking treat both layouts alike.
Decoding batches of the causal layout hold the prompts only, left-padded (`eval_batches`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import numpy as np

IGNORE_INDEX = -100
LAYOUTS = ("seq2seq", "causal")
MIN_INPUT_BUCKET = 32
MIN_TARGET_BUCKET = 8
Batch = dict[str, np.ndarray]


def power_of_two_buckets(max_length: int, min_length: int) -> tuple[int, ...]:
    """Powers of two from `min_length` below `max_length`, then `max_length` itself."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    buckets = []
    size = min_length
    while size < max_length:
        buckets.append(size)
        size *= 2
    buckets.append(max_length)
    return tuple(buckets)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedDataset:
    """One split tokenized once: per-row id arrays (truncated) and reference labels.

    seq2seq: input_ids end with EOS. causal: input_ids are the prompt (no EOS). target_ids always
    end with EOS.
    """

    input_ids: tuple[np.ndarray, ...]  # each [len <= max_input_length], int32
    target_ids: tuple[np.ndarray, ...]  # each [len <= max_target_length], int32, ends with EOS
    references: tuple[str, ...]  # the label text of each row (for exact-match accuracy)
    ids: tuple[str, ...]
    tasks: tuple[str, ...]
    pad_token_id: int
    eos_token_id: int
    max_input_length: int
    max_target_length: int
    layout: str = "seq2seq"

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def input_buckets(self) -> tuple[int, ...]:
        """Default input-length buckets: powers of two from 32 up to `max_input_length`."""
        return power_of_two_buckets(self.max_input_length, MIN_INPUT_BUCKET)

    @property
    def sequence_buckets(self) -> tuple[int, ...]:
        """causal layout: buckets of prompt + target lengths, from 32 up to both maxima added."""
        return power_of_two_buckets(self.max_input_length + self.max_target_length, MIN_INPUT_BUCKET)

    @property
    def target_buckets(self) -> tuple[int, ...]:
        """Default target-length buckets: powers of two from 8 up to `max_target_length`."""
        return power_of_two_buckets(self.max_target_length, MIN_TARGET_BUCKET)

    def subset(self, indices: Sequence[int]) -> "TokenizedDataset":
        """The rows at `indices`, in that order (no re-tokenization)."""
        pick = [int(i) for i in indices]
        return dataclasses.replace(
            self,
            input_ids=tuple(self.input_ids[i] for i in pick),
            target_ids=tuple(self.target_ids[i] for i in pick),
            references=tuple(self.references[i] for i in pick),
            ids=tuple(self.ids[i] for i in pick),
            tasks=tuple(self.tasks[i] for i in pick),
        )


def _bucket(length: int, buckets: Sequence[int], what: str) -> int:
    for size in sorted(buckets):
        if size >= length:
            return int(size)
    raise ValueError(f"{what} length {length} exceeds the largest bucket {max(buckets)}")


def collate(
    dataset: TokenizedDataset,
    indices: Sequence[int],
    *,
    input_buckets: Sequence[int] | None = None,
    target_buckets: Sequence[int] | None = None,
    pad_to: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> Batch:
    """The batch of rows `indices`: S and T padded to the smallest bucket that fits the longest row
    (or exactly `pad_to=(S, T)`), and up to `batch_size` rows with loss-free filler rows."""
    indices = [int(i) for i in indices]
    rows = batch_size if batch_size is not None else len(indices)
    if rows < len(indices) or rows < 1:
        raise ValueError(f"batch_size {rows} is smaller than the {len(indices)} rows asked for, or < 1")
    if dataset.layout == "causal":
        return _collate_causal(dataset, indices, rows, buckets=input_buckets, length=None if pad_to is None
                               else int(pad_to[0]))
    longest_in = max((len(dataset.input_ids[i]) for i in indices), default=1)
    longest_tg = max((len(dataset.target_ids[i]) for i in indices), default=1)
    if pad_to is not None:
        seq_len, tgt_len = int(pad_to[0]), int(pad_to[1])
        if longest_in > seq_len or longest_tg > tgt_len:
            raise ValueError(f"rows of length ({longest_in}, {longest_tg}) do not fit pad_to={tuple(pad_to)}")
    else:
        seq_len = _bucket(longest_in, input_buckets or dataset.input_buckets, "input")
        tgt_len = _bucket(longest_tg, target_buckets or dataset.target_buckets, "target")
    pad = dataset.pad_token_id
    input_ids = np.full((rows, seq_len), pad, np.int32)  # [B, S]
    attention_mask = np.zeros((rows, seq_len), np.int32)  # [B, S]
    decoder_input_ids = np.full((rows, tgt_len), pad, np.int32)  # [B, T]
    labels = np.full((rows, tgt_len), IGNORE_INDEX, np.int32)  # [B, T]
    for r, i in enumerate(indices):
        src, tgt = dataset.input_ids[i], dataset.target_ids[i]
        input_ids[r, : len(src)] = src
        attention_mask[r, : len(src)] = 1
        labels[r, : len(tgt)] = tgt
        decoder_input_ids[r, 1 : len(tgt)] = tgt[:-1]
    # Filler rows: encoder sees one EOS (no fully masked attention row), labels contribute nothing.
    input_ids[len(indices):, 0] = dataset.eos_token_id
    attention_mask[len(indices):, 0] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids, "labels": labels}


def _collate_causal(dataset: TokenizedDataset, indices: list[int], rows: int, *, buckets: Sequence[int] | None,
                    length: int | None) -> Batch:
    """Training rows prompt + target, right-padded; labels on the target's positions only."""
    longest = max((len(dataset.input_ids[i]) + len(dataset.target_ids[i]) for i in indices), default=1)
    if length is None:
        length = _bucket(longest, buckets or dataset.sequence_buckets, "prompt + target")
    elif longest > length:
        raise ValueError(f"rows of length {longest} do not fit pad_to={length}")
    input_ids = np.full((rows, length), dataset.pad_token_id, np.int32)  # [B, L]
    attention_mask = np.zeros((rows, length), np.int32)  # [B, L]
    labels = np.full((rows, length), IGNORE_INDEX, np.int32)  # [B, L]
    for r, i in enumerate(indices):
        prompt, target = dataset.input_ids[i], dataset.target_ids[i]
        n = len(prompt) + len(target)
        input_ids[r, :n] = np.concatenate([prompt, target])
        attention_mask[r, :n] = 1
        labels[r, len(prompt):n] = target
    # Filler rows: one EOS token (no fully masked attention row), no label.
    input_ids[len(indices):, 0] = dataset.eos_token_id
    attention_mask[len(indices):, 0] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prompt_batch(dataset: TokenizedDataset, indices: Sequence[int], *, batch_size: int,
                 buckets: Sequence[int] | None = None) -> Batch:
    """causal layout, for decoding: the prompts left-padded to a bucket, filler rows a lone EOS."""
    indices = [int(i) for i in indices]
    longest = max((len(dataset.input_ids[i]) for i in indices), default=1)
    length = _bucket(longest, buckets or dataset.input_buckets, "prompt")
    input_ids = np.full((batch_size, length), dataset.pad_token_id, np.int32)  # [B, S]
    attention_mask = np.zeros((batch_size, length), np.int32)
    for r, i in enumerate(indices):
        prompt = dataset.input_ids[i]
        input_ids[r, length - len(prompt):] = prompt
        attention_mask[r, length - len(prompt):] = 1
    input_ids[len(indices):, -1] = dataset.eos_token_id
    attention_mask[len(indices):, -1] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pad_batch(batch: Batch, input_len: int, target_len: int, *, pad_id: int = 0) -> Batch:
    """`batch` with S padded to `input_len` and T to `target_len` (pad id, mask 0, IGNORE_INDEX)."""
    seq_len, tgt_len = batch["input_ids"].shape[1], batch["labels"].shape[1]
    if input_len < seq_len or target_len < tgt_len:
        raise ValueError(f"cannot pad a batch of lengths ({seq_len}, {tgt_len}) down to ({input_len}, {target_len})")
    fill = {"input_ids": pad_id, "attention_mask": 0, "decoder_input_ids": pad_id, "labels": IGNORE_INDEX}
    out = {}
    for name, value in batch.items():
        width = input_len - seq_len if name in ("input_ids", "attention_mask") else target_len - tgt_len
        out[name] = np.pad(value, ((0, 0), (0, width)), constant_values=fill.get(name, 0))
    return out


def stack_batches(batches: Sequence[Batch], *, pad_id: int = 0) -> Batch:
    """Stack batches of equal row count into [K, B, ...] arrays, padding all to the longest S and T."""
    seq_len = max(b["input_ids"].shape[1] for b in batches)
    tgt_len = max(b["labels"].shape[1] for b in batches)
    padded = [pad_batch(b, seq_len, tgt_len, pad_id=pad_id) for b in batches]
    return {name: np.stack([b[name] for b in padded]) for name in padded[0]}


class BatchIterator:
    """Endless shuffled batches of exactly `batch_size` rows over epochs, resumable from `state()`.

    Epoch e visits the rows in the permutation drawn by `np.random.default_rng([seed, e])`, in
    `steps_per_epoch = ceil(n / batch_size)` batches; the last one is completed with filler rows.
    """

    def __init__(
        self, dataset: TokenizedDataset, batch_size: int, *, seed: int, shuffle: bool = True, **collate_kwargs: Any
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot batch an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.collate_kwargs = collate_kwargs
        self.steps_per_epoch = math.ceil(len(dataset) / self.batch_size)
        self.epoch = 0
        self.offset = 0
        self._order: np.ndarray | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row order of `epoch`."""
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next(self) -> Batch:
        """The next batch; moves to the next epoch after its last (possibly filler-padded) batch."""
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        rows = self._order[self.offset : self.offset + self.batch_size]
        batch = collate(self.dataset, rows, batch_size=self.batch_size, **self.collate_kwargs)
        self.offset += self.batch_size
        if self.offset >= len(self.dataset):
            self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        return batch

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        return self.next()

    def state(self) -> dict[str, int]:
        """Position to save with a checkpoint (JSON-serialisable)."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "num_rows": len(self.dataset), "batch_size": self.batch_size}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a `state()`; checks seed, size and batch size when the state records them."""
        for key, mine in (("seed", self.seed), ("num_rows", len(self.dataset)), ("batch_size", self.batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"batch iterator state has {key}={state[key]}, this iterator has {mine}")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < len(self.dataset) or offset % self.batch_size:
            raise ValueError(f"invalid batch iterator position epoch={epoch} offset={offset}")
        self.epoch, self.offset, self._order = epoch, offset, None


def sample_batch(
    dataset: TokenizedDataset, batch_size: int, rng: np.random.Generator, **collate_kwargs: Any
) -> Batch:
    """`batch_size` random rows (without replacement when the dataset is large enough, else every row
    once plus draws with replacement), e.g. for the outer learner on the memory buffer."""
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot sample from an empty dataset")
    if n >= batch_size:
        rows = rng.choice(n, size=batch_size, replace=False)
    else:
        rows = np.concatenate([rng.permutation(n), rng.integers(0, n, size=batch_size - n)])
    return collate(dataset, rows, batch_size=batch_size, **collate_kwargs)


def eval_batches(
    dataset: TokenizedDataset, batch_size: int, **collate_kwargs: Any
) -> Iterator[tuple[Batch, int]]:
    """The rows in order, as (batch of exactly `batch_size` rows, number of real rows); for the
    causal layout, left-padded prompts (what decoding needs)."""
    for start in range(0, len(dataset), batch_size):
        rows = np.arange(start, min(start + batch_size, len(dataset)))
        if dataset.layout == "causal":
            yield prompt_batch(dataset, rows, batch_size=batch_size), len(rows)
        else:
            yield collate(dataset, rows, batch_size=batch_size, **collate_kwargs), len(rows)
