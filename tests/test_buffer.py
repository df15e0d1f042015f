"""The replay memory: exact sizes, class balance, determinism and independence of the task order."""
import collections

import numpy as np

from kif_jax.data import ORDERS, load_split, memory_buffer, write_synthetic_benchmark
from kif_jax.data.buffer import balanced_sample


def test_buffer_before_task_5_of_order_1(data_dir):
    earlier = ORDERS[1][:4]
    assert earlier == ("mnli", "cb", "wic", "copa")
    memory = memory_buffer(data_dir, earlier)
    by_task = collections.Counter(r["task"] for r in memory)
    assert by_task == {"mnli": 20, "cb": 5, "wic": 20, "copa": 8}  # int(0.02 * 1000|250|1000|400)
    counts = collections.Counter((r["task"], r["output"]) for r in memory)
    assert counts[("wic", "True")] == counts[("wic", "False")] == 10
    assert counts[("copa", "A")] == counts[("copa", "B")] == 4
    assert all(6 <= counts[("mnli", y)] <= 8 for y in ("entailment", "neutral", "contradiction"))
    assert all(1 <= counts[("cb", y)] <= 3 for y in ("entailment", "neutral", "contradiction"))
    assert [r["task"] for r in memory] == sorted((r["task"] for r in memory), key=earlier.index)
    train = {t: {r["id"]: r for r in load_split(data_dir, t, "train")} for t in earlier}
    assert all(train[r["task"]][r["id"]] == r for r in memory)
    assert len({(r["task"], r["id"]) for r in memory}) == 53
    assert memory_buffer(data_dir, earlier) == memory
    other = memory_buffer(data_dir, earlier, seed=7)
    assert {r["id"] for r in other} != {r["id"] for r in memory}
    reordered = memory_buffer(data_dir, ("copa", "mnli"))
    assert reordered == [r for r in memory if r["task"] == "copa"] + [r for r in memory if r["task"] == "mnli"]
    assert memory_buffer(data_dir, ()) == [] and len(memory_buffer(data_dir, ["cb"], ratio=0.1)) == 25


def test_balanced_sample_small_labels_and_tiny_sizes():
    labels = ["a"] * 2 + ["b"] * 50 + ["c"] * 48
    rows = balanced_sample(labels, ["a", "b", "c"], 30, np.random.default_rng(0))
    got = collections.Counter(labels[i] for i in rows)
    assert len(rows) == 30 == len(set(rows)) and got["a"] == 2 and got["b"] >= 10 and got["c"] >= 10
    rows = balanced_sample(labels, ["a", "b", "c"], 2, np.random.default_rng(0))
    assert len(rows) == 2 and len({labels[i] for i in rows}) == 2  # fewer slots than labels
    assert balanced_sample(labels, ["a", "b", "c"], 0, np.random.default_rng(0)) == []


def test_buffer_on_synthetic_data(tmp_path):
    root = write_synthetic_benchmark(tmp_path, ["topic", "parity"], n_train=150, n_dev=4, n_test=4, seed=0)
    memory = memory_buffer(root, ["topic", "parity"], ratio=0.1)
    counts = collections.Counter((r["task"], r["output"]) for r in memory)
    assert sum(v for (t, _), v in counts.items() if t == "topic") == 15
    assert sorted([counts[("parity", "yes")], counts[("parity", "no")]]) == [7, 8]  # 7 each + 1 top-up
    assert all(counts[("topic", y)] >= 3 for y in ("animal", "food", "tool", "place"))
