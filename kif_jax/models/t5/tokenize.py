"""T5's tokenization of benchmark records: the "seq2seq" batch layout (kif_jax/data/batching.py), input and
target each ending in EOS."""
from __future__ import annotations

import os
import weakref
from typing import Any, Sequence

import numpy as np

from kif_jax.data.batching import TokenizedDataset
from kif_jax.data.benchmark import load_split, split_path


def _finish(rows: list[list[int]], eos: int, max_length: int) -> tuple[np.ndarray, ...]:
    """EOS-terminate each row, then truncate to `max_length` keeping the EOS last."""
    out = []
    for row in rows:
        row = list(row)
        if not row or row[-1] != eos:
            row.append(eos)
        if len(row) > max_length:
            row = row[: max_length - 1] + [eos]
        out.append(np.asarray(row, dtype=np.int32))
    return tuple(out)


def tokenize_records(
    records: Sequence[dict],
    tokenizer: Any,
    *,
    max_input_length: int = 1024,
    max_target_length: int = 128,
) -> TokenizedDataset:
    """Tokenize `input` and `output` of every record once (with `tokenizer.encode_batch`)."""
    if max_input_length < 2 or max_target_length < 2:
        raise ValueError("max_input_length and max_target_length must be at least 2 (a token and EOS)")
    eos = int(tokenizer.eos_token_id)
    inputs = tokenizer.encode_batch([r["input"] for r in records])
    targets = tokenizer.encode_batch([r["output"] for r in records])
    return TokenizedDataset(
        input_ids=_finish(inputs, eos, max_input_length),
        target_ids=_finish(targets, eos, max_target_length),
        references=tuple(r["output"] for r in records),
        ids=tuple(str(r.get("id", i)) for i, r in enumerate(records)),
        tasks=tuple(str(r.get("task", "")) for r in records),
        pad_token_id=int(tokenizer.pad_token_id),
        eos_token_id=eos,
        max_input_length=max_input_length,
        max_target_length=max_target_length,
    )


# tokenizer -> {(path key, task, split, lengths): dataset}; weak so a dropped tokenizer frees its cache.
_TOKEN_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def tokenized_split(
    data_dir: str | os.PathLike,
    task: str,
    split: str,
    tokenizer: Any,
    *,
    max_input_length: int = 1024,
    max_target_length: int = 128,
) -> TokenizedDataset:
    """`tokenize_records(load_split(...))`, memoised per tokenizer so each split is tokenized once."""
    cache = _TOKEN_CACHE.setdefault(tokenizer, {})
    stat = os.stat(split_path(data_dir, task, split)) if split_path(data_dir, task, split).is_file() else None
    version = (stat.st_mtime_ns, stat.st_size) if stat else None  # a rewritten file is tokenized again
    key = (os.path.abspath(data_dir), task, split, version, max_input_length, max_target_length)
    if key not in cache:
        cache[key] = tokenize_records(
            load_split(data_dir, task, split), tokenizer,
            max_input_length=max_input_length, max_target_length=max_target_length,
        )
    return cache[key]
