"""Loading and validating the benchmark: manifest counts, orders, task resolution, one-line errors."""
import json
import pathlib

import pytest

from kif_jax.data import benchmark
from kif_jax.data.benchmark import (
    BENCHMARKS, ORDERS, SPLITS, TASKS, load_split, resolve_tasks, task_labels, validate_tasks,
)
from kif_jax.errors import DataError


@pytest.fixture(scope="module")
def manifest(data_dir: pathlib.Path) -> dict:
    return json.loads((data_dir / "MANIFEST.json").read_text())


def test_all_splits_load_with_manifest_counts_and_labels(data_dir, manifest):
    labels = validate_tasks(data_dir, TASKS)
    assert sorted(manifest["tasks"]) == list(TASKS) and len(TASKS) == 15
    for task, info in manifest["tasks"].items():
        assert labels[task] == info["label_order_in_prompt"]
        for split in SPLITS:
            records = load_split(data_dir, task, split)
            assert len(records) == info["counts"][split], (task, split)
            counts = {}
            for r in records:
                counts[r["output"]] = counts.get(r["output"], 0) + 1
            assert counts == info["splits"][split]["label_counts"], (task, split)
    first = load_split(data_dir, "cb", "dev")[0]
    assert set(first) == {"id", "input", "output", "task"} and first["task"] == "cb"
    assert first["id"] == "CB_0" and first["input"].endswith("\nAnswer:")
    assert load_split(data_dir, "mnli", "dev").__len__() == 494
    assert task_labels(data_dir, "copa") == ["A", "B"]


def test_load_is_memoised_and_returns_copies(data_dir):
    a = load_split(data_dir, "cb", "test")
    a[0]["output"] = "changed"
    b = load_split(data_dir, "cb", "test")
    assert b[0]["output"] != "changed" and len(b) == 56


def test_orders_match_manifest(manifest):
    assert {int(k): tuple(v) for k, v in manifest["orders"].items()} == ORDERS
    assert {k: tuple(v) for k, v in manifest["benchmarks"].items()} == BENCHMARKS
    for order, tasks in ORDERS.items():
        assert resolve_tasks(order=order) == list(tasks)
        assert len(tasks) == (15 if order <= 3 else 4) and set(tasks) <= set(TASKS)


def test_resolve_tasks_rules():
    assert resolve_tasks(benchmark="standard") == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert resolve_tasks(benchmark="long")[:3] == ["mnli", "cb", "wic"]
    assert resolve_tasks(benchmark="standard", order=6) == ["yahoo", "amazon", "agnews", "dbpedia"]
    assert resolve_tasks(order="5")[2] == "agnews"
    assert resolve_tasks(order=4, tasks=" cb, copa ,rte") == ["cb", "copa", "rte"]
    assert resolve_tasks(tasks=["topic", "parity"]) == ["topic", "parity"]
    bad = [dict(order=7), dict(benchmark="huge"), dict(benchmark="standard", order=1), dict(),
           dict(tasks=" , "), dict(tasks="cb,cb"), dict(tasks="../etc")]
    for kwargs in bad:
        with pytest.raises(DataError):
            resolve_tasks(**kwargs)


GOOD = [
    {"id": "t_0", "input": "Say it. Option: yes, no.\nhello\nAnswer:", "output": "yes"},
    {"id": "t_1", "input": "Say it. Option: yes, no.\nbye\nAnswer:", "output": "no"},
]


def _write(root: pathlib.Path, split: str, task: str, text: str) -> pathlib.Path:
    path = root / split / f"{task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _records(**change) -> str:
    rows = [dict(r) for r in GOOD]
    rows[1].update(change)
    rows[1] = {k: v for k, v in rows[1].items() if v is not ...}
    return json.dumps(rows, indent=4)


BAD_FILES = {
    "malformed": ('[{"id": "t_0", "input": "x Option: a, b.", "output": "a"},\n  {"id": ', "malformed JSON at line 2"),
    "object": ('{"id": "t_0", "input": "x", "output": "y"}', "expected a JSON list"),
    "numbers": ("[1, 2]", "record 0 is a JSON int"),
    "empty_list": ("[]", "empty split"),
    "empty_file": ("  \n", "file is empty"),
    "missing_output": (_records(output=...), "record 1 (id 't_1') is missing field 'output'"),
    "missing_id": (_records(id=...), "record 1 is missing field 'id'"),
    "null_input": (_records(input=None), "missing field 'input'"),
    "int_output": (_records(output=3), "field 'output' must be a string"),
    "duplicate_id": (_records(id="t_0"), "duplicate id 't_0'"),
    "bad_label": (_records(output="maybe"), "output 'maybe' is not one of the options ['yes', 'no']"),
    "label_set_differs": (_records(input="Say it. Option: yes, no, maybe.\nx\nAnswer:"), "Option list"),
    "no_options": (_records(input="Say it.\nx\nAnswer:"), "no 'Option: <labels>.' list"),
    "not_utf8": (None, "not UTF-8"),
    # Valid JSON that pyarrow cannot hold (an integer beyond int64) fails inside `datasets`.
    "huge_int": (_records(extra=10**24), "cannot be read by the datasets json loader (ValueError: Value is too big!"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_give_one_line_errors(tmp_path, case):
    text, expected = BAD_FILES[case]
    if text is None:
        path = tmp_path / "train" / f"{case}.json"
        path.parent.mkdir(parents=True)
        path.write_bytes(b'[{"id": "a", "input": "\xff\xfe Option: a.", "output": "a"}]')
    else:
        path = _write(tmp_path, "train", case, text)
    with pytest.raises(DataError) as info:
        load_split(tmp_path, case, "train")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expected in message, message
    # No chained traceback from inside `datasets` or `json`.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_missing_paths_and_cross_split_labels(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        load_split(tmp_path / "nope", "t", "train")
    with pytest.raises(DataError, match="missing split directory"):
        load_split(tmp_path, "t", "train")
    _write(tmp_path, "train", "t", json.dumps(GOOD))
    (tmp_path / "dev").mkdir()
    with pytest.raises(DataError, match=r"missing data file .*dev/t\.json"):
        validate_tasks(tmp_path, ["t"])
    flipped = [dict(r, input=r["input"].replace("yes, no", "no, yes")) for r in GOOD]
    _write(tmp_path, "dev", "t", json.dumps(flipped))
    _write(tmp_path, "test", "t", json.dumps(GOOD))
    with pytest.raises(DataError, match=r"dev/t\.json: label set \['no', 'yes'\] differs from train"):
        validate_tasks(tmp_path, ["t"])
    _write(tmp_path, "dev", "t", json.dumps(GOOD, indent=4))
    assert validate_tasks(tmp_path, ["t"]) == {"t": ["yes", "no"]}
    assert [r["id"] for r in load_split(tmp_path, "t", "dev")] == ["t_0", "t_1"]
    with pytest.raises(DataError, match="invalid task name"):
        load_split(tmp_path, "../t", "dev")


def test_changed_file_is_reloaded(tmp_path):
    path = _write(tmp_path, "train", "t", json.dumps(GOOD))
    assert len(load_split(tmp_path, "t", "train")) == 2
    path.write_text(json.dumps(GOOD[:1] + [dict(GOOD[1], id="t_9"), dict(GOOD[0], id="t_8")]))
    assert [r["id"] for r in load_split(tmp_path, "t", "train")] == ["t_0", "t_9", "t_8"]


def test_parse_options():
    assert benchmark.parse_options("Pick. Option: Business & Finance, Sports.\nx") == ("Business & Finance", "Sports")
    assert benchmark.parse_options("no list here") is None
    assert benchmark.parse_options("Option: a, , b.") is None
