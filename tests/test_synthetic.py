"""The synthetic suite: format, determinism, balance, distinct inputs, and built-in interference."""
import collections
import json

import pytest

from kif_jax.data import SYNTHETIC_TASKS, load_split, make_task, validate_tasks, write_synthetic_benchmark
from kif_jax.data import synthetic


def _body(record: dict) -> str:
    return record["input"].split("\n")[1]


def test_written_benchmark_loads_in_the_exact_format(tmp_path):
    root = write_synthetic_benchmark(tmp_path, n_train=40, n_dev=8, n_test=12, seed=3)
    labels = validate_tasks(root, SYNTHETIC_TASKS)
    assert len(SYNTHETIC_TASKS) >= 5 and labels["topic"] == ["animal", "food", "tool", "place"]
    for task in SYNTHETIC_TASKS:
        recs = make_task(task, n_train=40, n_dev=8, n_test=12, seed=3)
        for split, n in (("train", 40), ("dev", 8), ("test", 12)):
            text = (root / split / f"{task}.json").read_text(encoding="utf-8")
            assert text == json.dumps(recs[split], ensure_ascii=False, indent=4)
            assert [r["id"] for r in load_split(root, task, split)] == [r["id"] for r in recs[split]]
            assert len(recs[split]) == n


def test_deterministic_balanced_distinct_and_short():
    for task in SYNTHETIC_TASKS:
        a = make_task(task, n_train=200, n_dev=40, n_test=80, seed=1)
        assert a == make_task(task, n_train=200, n_dev=40, n_test=80, seed=1)
        assert a != make_task(task, n_train=200, n_dev=40, n_test=80, seed=2)
        labels = synthetic.task_labels(task)
        for split, recs in a.items():
            counts = collections.Counter(r["output"] for r in recs)
            assert max(counts.values()) - min(counts.values()) <= 1 and set(counts) == set(labels)
        inputs = [r["input"] for recs in a.values() for r in recs]
        assert len(set(inputs)) == len(inputs)
        # <= 63 bytes: with EOS every input fits the 64-token bucket of the byte tokenizer.
        assert max(len(x.encode()) for x in inputs) <= 63 and all(x.endswith("\nAnswer:") for x in inputs)
        assert all(x.split("?")[0] == inputs[0].split("?")[0] for x in inputs)  # one keyword per task
    keywords = {make_task(t, n_train=1, n_dev=0, n_test=0, seed=0)["train"][0]["input"].split("?")[0]
                for t in SYNTHETIC_TASKS}
    assert len(keywords) == len(SYNTHETIC_TASKS)
    with pytest.raises(ValueError, match="distinct"):
        make_task("topic", n_train=3000, n_dev=0, n_test=0, seed=0)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_task("nope", n_train=1, n_dev=1, n_test=1, seed=0)


def _group(word: str) -> str:
    return next(g for g, words in synthetic.GROUPS.items() if word in words)


# Each task's rule written independently of the generator: the label is a function of the body.
RULES = {
    "topic": lambda b: collections.Counter(map(_group, b.split())).most_common(1)[0][0],
    "first_topic": lambda b: _group(b.split()[0]),
    "compare": lambda b: "yes" if int(b.split()[0]) > int(b.split()[1]) else "no",
    "parity": lambda b: "yes" if int(b.split()[1]) % 2 == 0 else "no",
    "sentiment": lambda b: "good" if b.split()[0] in synthetic.ADJECTIVES["good"] else "bad",
    "has_animal": lambda b: "yes" if "animal" in map(_group, b.split()) else "no",
}


def test_labels_follow_the_rules_and_paired_tasks_conflict():
    data = {t: make_task(t, n_train=300, n_dev=0, n_test=0, seed=0)["train"] for t in SYNTHETIC_TASKS}
    for task, recs in data.items():
        assert all(RULES[task](_body(r)) == r["output"] for r in recs), task

    def transfer(rule_of: str, data_of: str) -> float:
        recs = data[data_of]
        return sum(RULES[rule_of](_body(r)) == r["output"] for r in recs) / len(recs)

    # Same bodies, same label set, opposite answers: following one rule fails the other completely.
    assert transfer("topic", "first_topic") == 0.0 and transfer("first_topic", "topic") == 0.0
    # compare vs parity: same bodies and labels, unrelated rules -> chance level.
    assert 0.4 < transfer("parity", "compare") < 0.6 and 0.4 < transfer("compare", "parity") < 0.6
    vocab = {t: {w for r in recs for w in _body(r).replace(",", "").split()} for t, recs in data.items()}
    assert vocab["topic"] == vocab["first_topic"] == vocab["has_animal"] == set(synthetic.NOUNS)
    assert set(synthetic.NOUNS) < vocab["sentiment"]
