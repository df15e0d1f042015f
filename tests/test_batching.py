"""Tokenization, bucketed collation, filler rows, and the resumable shuffled iterator."""
import json

import numpy as np
import pytest

from kif_jax.data.batching import (
    IGNORE_INDEX, BatchIterator, collate, eval_batches, pad_batch, power_of_two_buckets, sample_batch,
    stack_batches,
)
from kif_jax.models.t5.tokenize import tokenize_records, tokenized_split
from kif_jax.models.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def _records(lengths, outputs=("yes", "no")):
    return [{"id": f"r{i}", "input": "x" * n, "output": outputs[i % len(outputs)], "task": "t"}
            for i, n in enumerate(lengths)]


def test_buckets():
    assert power_of_two_buckets(1024, 32) == (32, 64, 128, 256, 512, 1024)
    assert power_of_two_buckets(128, 8) == (8, 16, 32, 64, 128)
    assert power_of_two_buckets(200, 32) == (32, 64, 128, 200)
    assert power_of_two_buckets(16, 32) == (16,)


def test_tokenize_truncates_keeping_eos():
    ds = tokenize_records(_records([5, 300], outputs=("yes", "a long label here")), TOK,
                          max_input_length=100, max_target_length=8)
    assert len(ds) == 2 and ds.references == ("yes", "a long label here") and ds.ids == ("r0", "r1")
    assert ds.input_ids[0].tolist() == [ord("x") + 3] * 5 + [1]
    assert len(ds.input_ids[1]) == 100 and ds.input_ids[1][-1] == 1 and ds.input_ids[1][-2] == ord("x") + 3
    assert ds.target_ids[0].tolist() == [ord(c) + 3 for c in "yes"] + [1]
    assert len(ds.target_ids[1]) == 8 and ds.target_ids[1][-1] == 1
    assert ds.input_buckets == (32, 64, 100) and ds.target_buckets == (8,)


def test_collate_buckets_shift_and_filler_rows():
    ds = tokenize_records(_records([10, 40, 20]), TOK, max_input_length=1024, max_target_length=128)
    b = collate(ds, [0, 2])
    assert b["input_ids"].shape == (2, 32) and b["labels"].shape == (2, 8)  # rows of 11, 21 tokens; targets 4
    assert all(v.dtype == np.int32 for v in b.values())
    b = collate(ds, [2, 1, 0], batch_size=5)
    assert b["input_ids"].shape == (5, 64) and b["attention_mask"][:3].sum(1).tolist() == [21, 41, 11]
    yes = [ord(c) + 3 for c in "yes"] + [1]
    assert b["labels"][0].tolist() == yes + [IGNORE_INDEX] * 4
    assert b["decoder_input_ids"][0].tolist() == [0] + yes[:-1] + [0] * 4
    # Filler rows: one EOS seen by the encoder, nothing in the loss.
    assert b["input_ids"][3:, 0].tolist() == [1, 1] and b["attention_mask"][3:].sum() == 2
    assert (b["labels"][3:] == IGNORE_INDEX).all() and (b["decoder_input_ids"][3:] == 0).all()
    forced = collate(ds, [0], pad_to=(128, 16))
    assert forced["input_ids"].shape == (1, 128) and forced["labels"].shape == (1, 16)
    with pytest.raises(ValueError):
        collate(ds, [1], pad_to=(32, 16))


def test_bucketed_shapes_are_bounded():
    rng = np.random.default_rng(0)
    ds = tokenize_records(_records(rng.integers(1, 3000, size=200).tolist()), TOK)
    shapes = {collate(ds, rng.choice(200, 8, replace=False))["input_ids"].shape for _ in range(50)}
    assert shapes <= {(8, s) for s in (32, 64, 128, 256, 512, 1024)} and (8, 1024) in shapes


def test_pad_and_stack_batches():
    ds = tokenize_records(_records([10, 40, 20]), TOK)
    a, b = collate(ds, [0]), collate(ds, [1])
    p = pad_batch(a, 64, 16)
    assert p["input_ids"].shape == (1, 64) and p["labels"].shape == (1, 16)
    assert (p["labels"][0, 4:] == IGNORE_INDEX).all() and p["attention_mask"].sum() == 11
    s = stack_batches([a, b])
    assert s["input_ids"].shape == (2, 1, 64) and s["labels"].shape == (2, 1, 8)
    assert (s["input_ids"][0] == p["input_ids"]).all()


def test_iterator_epochs_fixed_rows_and_exact_resume():
    ds = tokenize_records(_records(list(range(1, 11))), TOK)
    it = BatchIterator(ds, 4, seed=7)
    assert it.steps_per_epoch == 3
    batches = [it.next() for _ in range(7)]
    assert all(b["input_ids"].shape[0] == 4 for b in batches)
    # Each epoch sees each row once: token counts of real rows = 2 + ... + 11 per epoch.
    per_epoch = [sum(int(b["attention_mask"].sum() - (b["labels"][:, 0] == IGNORE_INDEX).sum()) for b in batches[e * 3:e * 3 + 3]) for e in (0, 1)]
    assert per_epoch == [sum(range(2, 12))] * 2
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches[:3], batches[3:6]))
    it2 = BatchIterator(ds, 4, seed=7)
    for _ in range(4):
        it2.next()
    state = json.loads(json.dumps(it2.state()))
    assert state["epoch"] == 1 and state["offset"] == 4
    resumed = BatchIterator(ds, 4, seed=7)
    resumed.restore(state)
    for expected in batches[4:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], expected[k]) for k in expected)
    with pytest.raises(ValueError):
        BatchIterator(ds, 4, seed=8).restore(state)
    ordered = BatchIterator(ds, 5, seed=0, shuffle=False).next()
    assert ordered["attention_mask"].sum(1).tolist() == [2, 3, 4, 5, 6]


def test_sample_batch_and_eval_batches():
    ds = tokenize_records(_records(list(range(1, 8))), TOK)
    a = sample_batch(ds, 5, np.random.default_rng(3))
    b = sample_batch(ds, 5, np.random.default_rng(3))
    assert np.array_equal(a["input_ids"], b["input_ids"])
    lengths = a["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 5  # without replacement: 5 distinct rows
    big = sample_batch(ds, 10, np.random.default_rng(0))
    assert set(big["attention_mask"].sum(1).tolist()) == set(range(2, 9))  # every row, then repeats
    out = list(eval_batches(ds, 3))
    assert [n for _, n in out] == [3, 3, 1] and all(b["input_ids"].shape[0] == 3 for b, _ in out)
    assert [int(x) for b, n in out for x in b["attention_mask"][:n].sum(1)] == list(range(2, 9))


def test_tokenized_split_is_cached(data_dir):
    tok = ByteTokenizer()
    ds = tokenized_split(data_dir, "cb", "dev", tok, max_input_length=512, max_target_length=16)
    assert tokenized_split(data_dir, "cb", "dev", tok, max_input_length=512, max_target_length=16) is ds
    assert len(ds) == 56 and max(len(x) for x in ds.input_ids) == 512  # cb has inputs over 512 bytes
    assert set(ds.references) == {"entailment", "contradiction", "neutral"}
    batch = next(eval_batches(ds, 8))[0]
    assert batch["input_ids"].shape[1] in (256, 512) and batch["labels"].shape == (8, 16)
