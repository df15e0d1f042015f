"""A procedurally generated CL suite in the benchmark's format, small enough for a byte-level T5 on CPU.

Every input is `<Keyword>? Option: <labels>.\n<body>\nAnswer:`, at most 63 bytes (64 byte-level
tokens with EOS, the smallest length bucket above 32, which halves the encoder's cost against a
128-token bucket), and every output is one short label. The tasks are built to interfere: they
draw from one shared vocabulary (24 three-letter nouns in 4 groups, 12 adjectives, 2-digit
numbers), and bodies repeat across tasks with the same label set but a different rule, so a model
that follows only the body must get the other task wrong:

  topic        "cat egg pie"          -> the group of the two words that agree (food)
  first_topic  "cat egg pie"          -> the group of the first word (animal)
  compare      "47 82"                -> is the first number bigger? (no)
  parity       "47 82"                -> is the second number even? (yes)
  sentiment    "kind fox, warm saw"   -> good / bad (both adjectives share a polarity)
  has_animal   "cat egg pie"          -> yes / no, is any word an animal?

Each task needs only word- or digit-level lookups plus a fixed rule (no matching across positions,
which a 2-layer model learns much more slowly). Each instruction is its own keyword (Topic?,
First?, Bigger?, Even?, Mood?, Animal?), so a multi-task model can tell the tasks apart. Labels are
balanced within each split; inputs are distinct across the three splits of a task (topic and
first_topic have 2,160 possible bodies, so at most that many examples per task); everything is
drawn from (seed, task name).
"""
from __future__ import annotations

import json
import os
import pathlib
import zlib
from typing import Callable, Sequence

import numpy as np

GROUPS: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "fox", "owl", "bee", "cow"),
    "food": ("egg", "bun", "pie", "jam", "ham", "fig"),
    "tool": ("saw", "axe", "hoe", "awl", "pen", "mop"),
    "place": ("inn", "zoo", "spa", "gym", "bay", "pub"),
}
NOUNS: tuple[str, ...] = tuple(w for words in GROUPS.values() for w in words)
ADJECTIVES: dict[str, tuple[str, ...]] = {
    "good": ("happy", "kind", "calm", "warm", "fresh", "bright"),
    "bad": ("sad", "cruel", "angry", "cold", "stale", "dark"),
}
YES_NO: tuple[str, ...] = ("yes", "no")

Body = Callable[[np.random.Generator, str], str]


def _pick(rng: np.random.Generator, items: Sequence[str], k: int) -> list[str]:
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def _other(rng: np.random.Generator, items: Sequence[str], not_this: str) -> str:
    rest = [x for x in items if x != not_this]
    return rest[int(rng.integers(len(rest)))]


def _odd_first(rng: np.random.Generator, odd_group: str, main_group: str) -> str:
    """One word of `odd_group`, then two distinct words of `main_group`."""
    return " ".join(_pick(rng, GROUPS[odd_group], 1) + _pick(rng, GROUPS[main_group], 2))


def _topic(rng: np.random.Generator, label: str) -> str:
    return _odd_first(rng, _other(rng, list(GROUPS), label), label)


def _first_topic(rng: np.random.Generator, label: str) -> str:
    return _odd_first(rng, label, _other(rng, list(GROUPS), label))


def _two_numbers(rng: np.random.Generator, accept: Callable[[int, int], bool]) -> str:
    while True:
        a, b = (int(x) for x in rng.integers(10, 100, size=2))
        if a != b and accept(a, b):
            return f"{a} {b}"


def _compare(rng: np.random.Generator, label: str) -> str:
    return _two_numbers(rng, lambda a, b: (a > b) == (label == "yes"))


def _parity(rng: np.random.Generator, label: str) -> str:
    return _two_numbers(rng, lambda a, b: (b % 2 == 0) == (label == "yes"))


def _sentiment(rng: np.random.Generator, label: str) -> str:
    adjs, nouns = _pick(rng, ADJECTIVES[label], 2), _pick(rng, NOUNS, 2)
    return f"{adjs[0]} {nouns[0]}, {adjs[1]} {nouns[1]}"


def _has_animal(rng: np.random.Generator, label: str) -> str:
    others = [w for g, words in GROUPS.items() if g != "animal" for w in words]
    if label == "no":
        return " ".join(_pick(rng, others, 3))
    n_animals = int(rng.integers(1, 4))
    words = _pick(rng, GROUPS["animal"], n_animals) + _pick(rng, others, 3 - n_animals)
    return " ".join(words[i] for i in rng.permutation(3))


# name -> (instruction before "Option:", labels in prompt order, body generator)
_TASKS: dict[str, tuple[str, tuple[str, ...], Body]] = {
    "topic": ("Topic?", tuple(GROUPS), _topic),
    "compare": ("Bigger?", YES_NO, _compare),
    "first_topic": ("First?", tuple(GROUPS), _first_topic),
    "parity": ("Even?", YES_NO, _parity),
    "sentiment": ("Mood?", ("good", "bad"), _sentiment),
    "has_animal": ("Animal?", YES_NO, _has_animal),
}
# Ordered so that any prefix of 3+ tasks holds a conflicting pair (topic/first_topic, then compare/parity).
SYNTHETIC_TASKS: tuple[str, ...] = tuple(_TASKS)


def task_labels(name: str) -> tuple[str, ...]:
    """The label set of a synthetic task, in prompt order."""
    return _spec(name)[1]


def _spec(name: str) -> tuple[str, tuple[str, ...], Body]:
    if name not in _TASKS:
        raise ValueError(f"unknown synthetic task {name!r} (known: {', '.join(SYNTHETIC_TASKS)})")
    return _TASKS[name]


def make_prompt(name: str, body: str) -> str:
    """The full input of task `name` around `body`, in the benchmark's instruction format."""
    instruction, labels, _ = _spec(name)
    return f"{instruction} Option: {', '.join(labels)}.\n{body}\nAnswer:"


def make_task(name: str, *, n_train: int, n_dev: int, n_test: int, seed: int) -> dict[str, list[dict]]:
    """Split -> records `{id, input, output}` of task `name`: labels balanced within each split
    (cycled, then shuffled), inputs distinct across splits, all drawn from (seed, name)."""
    instruction, labels, body = _spec(name)
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be non-negative, got {sizes}")
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        wanted = [labels[k % len(labels)] for k in range(n)]
        rng.shuffle(wanted)
        records = []
        for k, label in enumerate(wanted):
            for _ in range(1000):
                text = make_prompt(name, body(rng, label))
                if text not in seen:
                    break
            else:
                raise ValueError(f"synthetic task {name!r} cannot make {sum(sizes.values())} distinct "
                                 f"inputs; ask for fewer examples")
            seen.add(text)
            records.append({"id": f"{name}_{split}_{k}", "input": text, "output": label})
        out[split] = records
    return out


def write_synthetic_benchmark(
    out_dir: str | os.PathLike,
    tasks: Sequence[str] = SYNTHETIC_TASKS,
    *,
    n_train: int = 500,
    n_dev: int = 100,
    n_test: int = 200,
    seed: int = 0,
) -> pathlib.Path:
    """Write `<out_dir>/<split>/<task>.json` for every task, formatted exactly like the benchmark
    (JSON list, indent=4, ensure_ascii=False), so `load_split` reads it; returns `out_dir`."""
    root = pathlib.Path(out_dir)
    for name in tasks:
        for split, records in make_task(name, n_train=n_train, n_dev=n_dev, n_test=n_test, seed=seed).items():
            path = root / split / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    return root
