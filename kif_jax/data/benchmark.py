"""Benchmarks on disk: `<data_dir>/<split>/<task>.json`, read through the run's task format and validated.

Which file format a task has is the task format's business (kif_jax/tasks/): the CL benchmark's
(`classification`, the default) is a JSON list of `{"id", "input", "output"}` records, read here through
`datasets`; `input` is `<instruction> Option: <label>, <label>.\\n<text>\\nAnswer:` and `output` is one of
those labels. SuperNI's (`generation`) is one Super-NaturalInstructions task object a file
(kif_jax/tasks/generation.py). Anything else is a `DataError` with one line naming the file (and the
record), never a traceback from inside `datasets`.

Benchmarks and their task orders: `standard` (orders 4-6) and `long` (1-3) of the CL benchmark; `superni`
(SAPT's orders 1 and 2 of 15 SuperNI tasks) and `superni_gen5` (five generative tasks of it, in the same
orders), whose files are read by the generation format.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
from typing import Any, Iterator, Sequence

from kif_jax.errors import DataError
from kif_jax.tasks import get_format

SPLITS: tuple[str, ...] = ("train", "dev", "test")
FIELDS: tuple[str, ...] = ("id", "input", "output")

# The six task orders of Recurrent-KIF (`utils/dataset_order.py`, copied in MANIFEST.json "orders").
# Kept in code because a user's own copy of the data need not carry a manifest.
ORDERS: dict[int, tuple[str, ...]] = {
    1: ("mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb", "yelp", "amazon", "sst-2",
        "dbpedia", "agnews", "multirc", "yahoo"),
    2: ("multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia",
        "agnews", "yelp", "amazon", "yahoo"),
    3: ("yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia", "agnews",
        "yahoo", "multirc", "boolqa", "wic"),
    4: ("dbpedia", "amazon", "yahoo", "agnews"),
    5: ("dbpedia", "amazon", "agnews", "yahoo"),
    6: ("yahoo", "amazon", "agnews", "dbpedia"),
}
# SAPT's two SuperNI task orders (circle-hit/SAPT gen_script_superni_t5.py, order_idx 1 and 2; copied in
# ../shared/superni_benchmark/MANIFEST.json "orders").
SUPERNI_ORDERS: dict[int, tuple[str, ...]] = {
    1: ("task1572_samsum_summary", "task363_sst2_polarity_classification", "task1290_xsum_summarization",
        "task181_outcome_extraction", "task002_quoref_answer_generation", "task1510_evalution_relation_extraction",
        "task639_multi_woz_user_utterance_generation", "task1729_personachat_generate_next",
        "task073_commonsenseqa_answer_generation", "task1590_diplomacy_text_generation",
        "task748_glucose_reverse_cause_event_detection", "task511_reddit_tifu_long_text_summarization",
        "task591_sciq_answer_generation", "task1687_sentiment140_classification", "task875_emotion_classification"),
    2: ("task748_glucose_reverse_cause_event_detection", "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation", "task639_multi_woz_user_utterance_generation", "task1572_samsum_summary",
        "task1687_sentiment140_classification", "task591_sciq_answer_generation",
        "task363_sst2_polarity_classification", "task1510_evalution_relation_extraction",
        "task1729_personachat_generate_next", "task181_outcome_extraction",
        "task511_reddit_tifu_long_text_summarization", "task002_quoref_answer_generation",
        "task1290_xsum_summarization", "task875_emotion_classification"),
}
# The SuperNI tasks that are generative (not the three sentiment / emotion classifications), have at least 975
# training and 100 test examples, and a mean input under 600 characters; in each SAPT order's sequence.
SUPERNI_GEN5: frozenset[str] = frozenset({
    "task1510_evalution_relation_extraction", "task1729_personachat_generate_next",
    "task073_commonsenseqa_answer_generation", "task748_glucose_reverse_cause_event_detection",
    "task591_sciq_answer_generation"})
SUPERNI_GEN5_ORDERS: dict[int, tuple[str, ...]] = {
    k: tuple(t for t in order if t in SUPERNI_GEN5) for k, order in SUPERNI_ORDERS.items()}

# Standard CL benchmark = orders 4-6 (4 tasks); Long-sequence benchmark = orders 1-3 (15 tasks).
BENCHMARKS: dict[str, tuple[int, ...]] = {"standard": (4, 5, 6), "long": (1, 2, 3)}
# The task orders of every benchmark: the CL benchmark's two, SuperNI (SAPT's orders 1-2 of 15 tasks) and
# superni_gen5 (the same orders of its five generative tasks). Order numbers are a benchmark's own: superni's 1
# is not long's 1.
BENCHMARK_ORDERS: dict[str, dict[int, tuple[str, ...]]] = {
    **{name: {k: ORDERS[k] for k in orders} for name, orders in BENCHMARKS.items()},
    "superni": SUPERNI_ORDERS,
    "superni_gen5": SUPERNI_GEN5_ORDERS,
}
TASKS: tuple[str, ...] = tuple(sorted(ORDERS[1]))

_OPTION_RE = re.compile(r"Option:([^\n]*)")
_TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# (format, resolved path, mtime_ns, size) -> (validated records, label options); keeps repeated loads free
# within a process.
_CACHE: dict[tuple[str, str, int, int], tuple[tuple[dict, ...], tuple[str, ...]]] = {}


def resolve_tasks(
    *,
    benchmark: str | None = None,
    order: int | str | None = None,
    tasks: str | Sequence[str] | None = None,
) -> list[str]:
    """The task sequence of a run: a custom list (comma-separated or a sequence) wins, then `order`,
    then `benchmark` alone (its first order). An order without a benchmark is one of the CL benchmark's 1-6."""
    if tasks is not None and not (isinstance(tasks, str) and not tasks.strip()):
        names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
        names = [t for t in names if t]
        if not names:
            raise DataError("the custom task list is empty")
        for name in names:
            _check_task_name(name)
        dup = sorted({t for t in names if names.count(t) > 1})
        if dup:
            raise DataError(f"task list names {', '.join(dup)} more than once: {','.join(names)}")
        return names
    if benchmark is not None and benchmark not in BENCHMARK_ORDERS:
        raise DataError(f"unknown benchmark {benchmark!r} (known: {', '.join(BENCHMARK_ORDERS)})")
    if order is not None:
        try:
            key = int(order)
        except (TypeError, ValueError):
            key = None
        if key not in ORDERS:
            raise DataError(f"unknown task order {order!r} (known: {', '.join(map(str, ORDERS))})")
        if benchmark is not None and key not in BENCHMARK_ORDERS[benchmark]:
            raise DataError(f"order {key} is not part of benchmark {benchmark!r} (its orders: "
                            f"{', '.join(map(str, BENCHMARK_ORDERS[benchmark]))})")
        return list(BENCHMARK_ORDERS[benchmark][key] if benchmark is not None else ORDERS[key])
    if benchmark is not None:
        return list(next(iter(BENCHMARK_ORDERS[benchmark].values())))
    raise DataError("no tasks given: set a benchmark, an order or a comma-separated task list")


def split_path(data_dir: str | os.PathLike, task: str, split: str) -> pathlib.Path:
    """Where the `split` of `task` lives: `<data_dir>/<split>/<task>.json`."""
    return pathlib.Path(data_dir) / split / f"{task}.json"


def load_split(data_dir: str | os.PathLike, task: str, split: str, task_format: Any = None) -> list[dict]:
    """The validated records of `<data_dir>/<split>/<task>.json`, each `{id, input, output, task, ...}`, read by
    `task_format` (a kif_jax.tasks format, its name, or None: classification).

    Classification files are read through the `datasets` json loader (its on-disk Arrow cache makes later
    runs fast); every file is memoised in-process by (format, path, mtime, size), so repeated calls cost a
    list copy.
    """
    records, _ = _load(data_dir, task, split, task_format)
    return [dict(r) for r in records]


def split_labels(data_dir: str | os.PathLike, task: str, split: str, task_format: Any = None) -> list[str]:
    """The label set of one split, from its instructions' `Option:` list, in prompt order (empty for a format
    without label options)."""
    return list(_load(data_dir, task, split, task_format)[1])


def task_labels(data_dir: str | os.PathLike, task: str, task_format: Any = None) -> list[str]:
    """The task's label set from the `Option:` list, in prompt order (read from the first split
    present among train, dev, test; empty for a format without label options)."""
    _check_task_name(task)
    for split in SPLITS:
        if split_path(data_dir, task, split).is_file():
            return split_labels(data_dir, task, split, task_format)
    _check_dir(data_dir)
    raise DataError(f"no split of task {task!r} under {data_dir} (expected "
                    f"{split_path(data_dir, task, 'train')})")


def validate_tasks(
    data_dir: str | os.PathLike, tasks: Sequence[str], splits: Sequence[str] = SPLITS, task_format: Any = None
) -> dict[str, list[str]]:
    """Check every file a run will read, before anything is compiled; returns task -> labels.

    Raises `DataError` (one line) for the first problem: missing directory or file, malformed JSON,
    a bad record, an empty split, or splits of one task whose `Option:` lists differ.
    """
    _check_dir(data_dir)
    if not tasks:
        raise DataError("no tasks to validate")
    labels: dict[str, list[str]] = {}
    for task in tasks:
        _check_task_name(task)
        first: tuple[str, list[str]] | None = None
        for split in splits:
            these = split_labels(data_dir, task, split, task_format)
            if first is None:
                first = (split, these)
            elif these != first[1]:
                raise DataError(f"{split_path(data_dir, task, split)}: label set {these} differs from "
                                f"{first[0]} split's {first[1]}")
        if first is not None:
            labels[task] = first[1]
    return labels


def _check_task_name(task: str) -> None:
    if not isinstance(task, str) or not _TASK_NAME_RE.match(task) or ".." in task:
        raise DataError(f"invalid task name {task!r} (letters, digits, '_', '-', '.'; no paths)")


def _check_dir(data_dir: str | os.PathLike) -> None:
    if not pathlib.Path(data_dir).is_dir():
        raise DataError(f"data directory not found: {data_dir} (set the config's data_dir, or KIF_DATA_DIR in tests)")


def _load(data_dir: str | os.PathLike, task: str, split: str,
          task_format: Any = None) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    fmt = get_format(task_format)
    _check_task_name(task)
    path = split_path(data_dir, task, split)
    if not path.is_file():
        _check_dir(data_dir)
        if not path.parent.is_dir():
            raise DataError(f"missing split directory {path.parent} (needed for {task!r} {split})")
        raise DataError(f"missing data file {path} (task {task!r}, split {split!r})")
    stat = path.stat()
    key = (fmt.name, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        records = tuple(fmt.read(path, task))
        if not records:
            raise DataError(f"{path}: empty split (no records)")
        _CACHE[key] = (records, tuple(fmt.labels(records) or ()))
    return _CACHE[key]


def read_classification(path: pathlib.Path, task: str) -> list[dict]:
    """The validated records of one classification file (the classification format's `read`)."""
    return list(_validate(path, task, _read_rows(path))[0])


def record_options(record: dict) -> tuple[str, ...]:
    """The label options of a validated classification record (its `Option:` list)."""
    text = record["input"]
    line = text.split("\n", 1)[0] if "Option:" in text.split("\n", 1)[0] else text
    return parse_options(line) or ()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence `datasets`' progress bars and info logs for one load, restoring them afterwards."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _read_rows(path: pathlib.Path) -> list[dict]:
    """Rows of one file through the `datasets` json loader; every failure becomes a one-line DataError."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head:
        raise DataError(f"{path}: file is empty (expected a JSON list of records)")
    if not head.startswith(b"["):
        raise DataError(f"{path}: expected a JSON list of {{id, input, output}} records, "
                        f"found {head[:1].decode('utf-8', 'replace')!r} at the start")
    import datasets

    try:
        with _quiet_datasets():
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        rows = ds.to_list()
    except Exception as exc:  # datasets wraps parse errors several layers deep; re-diagnose with json.
        raise _diagnose(path, exc) from None
    if rows and not set(FIELDS) & set(rows[0]):
        raise _diagnose(path, None) from None  # e.g. a list of numbers, loaded as a "text" column
    return rows


def _diagnose(path: pathlib.Path, exc: Exception | None) -> DataError:
    """A precise message for a file `datasets` could not turn into records."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except UnicodeDecodeError as e:
        return DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        return DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(raw, list):
        return DataError(f"{path}: expected a JSON list of records, got a JSON {type(raw).__name__}")
    if not raw:
        return DataError(f"{path}: empty split (no records)")
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            return DataError(f"{path}: record {i} is a JSON {type(rec).__name__}, not an object")
    try:
        _validate(path, "?", raw)
    except DataError as err:
        return err
    root = exc
    while root is not None and (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    text = str(root).strip().splitlines()[0] if root is not None and str(root).strip() else ""
    detail = f"{type(root).__name__}: {text}" if root is not None else "no id/input/output columns"
    return DataError(f"{path}: cannot be read by the datasets json loader ({detail})")


def _validate(path: pathlib.Path, task: str, rows: list[dict]) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    """Check fields, ids, the shared `Option:` list and every output; return records and labels."""
    if not rows:
        raise DataError(f"{path}: empty split (no records)")
    labels: tuple[str, ...] | None = None
    parsed: dict[str, tuple[str, ...] | None] = {}
    seen: set[str] = set()
    records = []
    for i, row in enumerate(rows):
        rid = row.get("id")
        where = f"{path}: record {i}" + (f" (id {rid!r})" if rid is not None else "")
        for field in FIELDS:
            if row.get(field) is None:
                raise DataError(f"{where} is missing field {field!r}")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise DataError(f"{where}: field 'id' must be a string, got {type(rid).__name__}")
        for field in ("input", "output"):
            if not isinstance(row[field], str):
                raise DataError(f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}")
        rid = str(rid)
        if rid in seen:
            raise DataError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        text = row["input"]
        line = text.split("\n", 1)[0] if "Option:" in text.split("\n", 1)[0] else text
        if line not in parsed:
            parsed[line] = parse_options(line)
        options = parsed[line]
        if options is None:
            raise DataError(f"{where}: input has no 'Option: <labels>.' list")
        if labels is None:
            labels = options
        elif options != labels:
            raise DataError(f"{where}: Option list {list(options)} differs from the split's {list(labels)}")
        if row["output"] not in labels:
            raise DataError(f"{where}: output {row['output']!r} is not one of the options {list(labels)}")
        records.append({"id": rid, "input": text, "output": row["output"], "task": task})
    assert labels is not None
    return tuple(records), labels


def parse_options(text: str) -> tuple[str, ...] | None:
    """The labels of the first `Option: a, b, c.` in `text` (comma-separated, final period dropped)."""
    match = _OPTION_RE.search(text)
    if match is None:
        return None
    body = match.group(1).strip()
    if body.endswith("."):
        body = body[:-1]
    labels = tuple(label.strip() for label in body.split(","))
    if not labels or any(not label for label in labels) or len(set(labels)) != len(labels):
        return None
    return labels
