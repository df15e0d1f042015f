"""The task-format seam (kif_jax/tasks/): the registry, a format of one's own from an outside module
(examples/my_formats.py, the code of docs/tasks.md), classification records and scores as before, float scores
and older prediction files in kif_jax.compare, and fingerprints unchanged by the new fields at their defaults."""
import json
import math
import pathlib
import re
import sys

import numpy as np
import pytest

import tiny_config
from kif_jax import cli, compare, metrics
from kif_jax.checkpointing import config_fingerprint
from kif_jax.config import base_config, validate_config
from kif_jax.errors import ConfigError
from kif_jax.evaluation import evaluate_task
from kif_jax.tasks import TaskFormat, builtin_names, format_class, get_format, register, run_format

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    sys.modules.pop("my_formats", None)


def test_registry_lists_the_built_in_formats():
    assert builtin_names() == ("classification", "generation")
    assert get_format(None) is get_format("classification") is get_format(format_class("classification"))
    with pytest.raises(ConfigError, match="unknown task format 'nope'"):
        get_format("nope")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        get_format("no_such_module:Format")

    class NotAFormat:
        name = "x"

    with pytest.raises(ConfigError, match="not a kif_jax.tasks.TaskFormat subclass"):
        register(NotAFormat)

    class Another(TaskFormat):
        name = "classification"

    with pytest.raises(ConfigError, match="taken by kif_jax.tasks.classification.Classification"):
        register(Another)


def test_a_runs_format_is_its_field_else_its_benchmarks():
    config = base_config()
    assert run_format(config).name == "classification"
    config.benchmark = "superni_gen5"
    assert run_format(config).name == "generation"
    config.task_format = "classification"
    assert run_format(config).name == "classification"


@pytest.mark.parametrize("field, value, needle", [
    ("task_format", "bogus", "unknown task format 'bogus'"),
    ("task_format", "generation", "'synthetic' (generated classification tasks)"),
    ("eval.schedule", "sometimes", "eval.schedule"),
])
def test_bad_format_fields_are_one_line(tmp_path, capsys, field, value, needle):
    config = tiny_config.get_config()
    node = config
    *parents, leaf = field.split(".")
    for name in parents:
        node = node[name]
    node[leaf] = value
    assert cli.run(config, str(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_option_scoring_needs_options(tmp_path):
    config = tiny_config.get_config()
    config.data_dir = str(tmp_path)
    config.task_format = "generation"
    config.eval.mode = "score"
    with pytest.raises(ConfigError, match="has no label options"):
        validate_config(config)


def test_classification_scores_and_records_are_as_before():
    fmt = get_format("classification")
    assert fmt.score(" Yes ", {"output": "yes"}) == {"correct": True, "score": 1.0}
    assert fmt.score("no", {"output": "yes"}) == {"correct": False, "score": 0.0}
    records = [{"id": f"r{i}", "task": "t", "input": "q Option: yes, no.\nAnswer:", "output": label}
               for i, label in enumerate(["yes", "no", "yes"])]
    assert fmt.labels(records) == ["yes", "no"]

    class Evaluator:  # the predictions a model would decode
        def predictions(self, params, frozen, dataset, options=None, *, max_new_tokens=None):
            return ["yes", "yes", "YES "]

    score, rows = evaluate_task(Evaluator(), fmt, None, None, None, records)
    assert score == metrics.exact_match(["yes", "yes", "YES "], ["yes", "no", "yes"]) == 2 / 3
    assert rows[1] == {"task": "t", "index": 1, "id": "r1", "prediction": "yes", "label": "no", "correct": False,
                       "score": 0.0}
    assert [list(r) for r in rows] == [["task", "index", "id", "prediction", "label", "correct", "score"]] * 3


def test_the_guide_shows_the_example_format_verbatim():
    code = (EXAMPLES / "my_formats.py").read_text()
    body = code.split('"""\n', 1)[1].strip()  # the file without its docstring
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "tasks.md").read_text(), re.S)
    assert any(block.strip() == body for block in blocks)


def write_questions(root: pathlib.Path) -> None:
    facts = [("Ann lives in Oslo.", "Where does Ann live?", ["Oslo"]), ("Bo is ten.", "How old is Bo?", ["ten", "10"]),
             ("The sky is blue.", "What colour is the sky?", ["blue"]), ("Cy has a cat.", "What pet?", ["a cat"])]
    for task in ("qa_one", "qa_two"):
        for split, rows in (("train", facts * 3), ("test", facts[:2])):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / split / f"{task}.json").write_text(json.dumps([
                {"id": f"{task}-{i}", "context": c, "question": q, "answers": a} for i, (c, q, a) in enumerate(rows)]))


def test_a_format_of_ones_own_from_its_module(tmp_path, examples_on_path, capsys):
    from my_formats import TokenF1, token_f1

    assert token_f1("in Oslo", "Oslo") == pytest.approx(2 / 3)  # P = 1/2, R = 1: F = 2/3
    assert token_f1("the cat", "a cat") == 1.0  # articles dropped
    write_questions(tmp_path / "data")
    config = tiny_config.get_config()
    config.methods = "seq_lora"
    config.data_dir = str(tmp_path / "data")
    config.tasks = "qa_one,qa_two"
    config.task_format = "my_formats:TokenF1"
    config.train.max_input_length = 96
    assert format_class("my_formats:TokenF1") is TokenF1 and get_format("token_f1").name == "token_f1"
    assert cli.run(config, str(tmp_path / "work")) == 0
    out = capsys.readouterr().out
    assert "seq_lora: test token F1 (%) on each task" in out
    result = json.loads((tmp_path / "work" / "seq_lora" / "results.json").read_text())
    assert result["metric"] == "token F1" and "also" not in result
    records = [json.loads(line) for line in (tmp_path / "work" / "seq_lora" / "predictions.jsonl").open()]
    answers = {r["id"]: r["answers"] for r in TokenF1().read(tmp_path / "data" / "test" / "qa_one.json", "qa_one")}
    for r in records:
        assert "correct" not in r and set(r) >= {"score", "prediction", "label"}
        if r["task"] == "qa_one":
            assert r["score"] == max(token_f1(r["prediction"], a) for a in answers[r["id"]])
    assert len(records) == 2 + 2 + 2


def write_predictions(path: pathlib.Path, rows, *, legacy: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for after, task, index, value in rows:
            record = {"after_task": after, "task": task, "index": index, "id": f"{task}{index}", "prediction": "p",
                      "label": "l"}
            record.update({"correct": bool(value)} if legacy else {"score": float(value)})
            f.write(json.dumps(record) + "\n")


def test_compare_reads_float_scores_and_older_files(tmp_path):
    tasks = ["a", "b"]
    # After task 0: a only; after task 1: both (the diagonal schedule of two tasks is the full one).
    legacy = [(0, "a", 0, 1), (0, "a", 1, 0), (1, "a", 0, 1), (1, "a", 1, 1), (1, "b", 0, 0), (1, "b", 1, 1)]
    write_predictions(tmp_path / "old.jsonl", legacy, legacy=True)
    old = compare.load_predictions(tmp_path / "old.jsonl", "old", tasks)
    assert old.binary and np.array_equal(old.matrix(), [[0.5, np.nan], [1.0, 0.5]], equal_nan=True)
    floats = [(0, "a", 0, 0.25), (0, "a", 1, 0.75), (1, "a", 0, 0.5), (1, "a", 1, 0.0), (1, "b", 0, 1.0),
              (1, "b", 1, 0.2)]
    write_predictions(tmp_path / "new.jsonl", floats)
    new = compare.load_predictions(tmp_path / "new.jsonl", "new", tasks)
    assert not new.binary
    np.testing.assert_allclose(new.matrix(), [[0.5, np.nan], [0.25, 0.6]])
    rows = compare.compare([old, new], "old", resamples=200)
    assert {r["metric"] for r in rows} == {"op", "bwt", "avg", "learned"}  # no McNemar for float scores
    op = next(r for r in rows if r["metric"] == "op")
    assert op["estimate"] == pytest.approx((0.25 + 0.6) / 2 - (1.0 + 0.5) / 2)
    assert any(r["metric"] == "mcnemar" for r in compare.compare([old, old.__class__(
        "twin", old.tasks, old.scores, old.examples)], "old", resamples=10))  # binary pairs keep it


def test_a_missing_entry_leaves_out_only_the_metrics_that_read_it(tmp_path):
    tasks = ["a", "b", "c"]
    # The diagonal schedule: a after task 0, b after task 1, all three after task 2.
    rows = [(0, "a", 0, 1), (1, "b", 0, 1), (2, "a", 0, 0), (2, "b", 0, 1), (2, "c", 0, 1)]
    write_predictions(tmp_path / "d.jsonl", rows)
    method = compare.load_predictions(tmp_path / "d.jsonl", "d", tasks)
    R = method.matrix()
    assert math.isnan(R[1, 0]) and math.isnan(metrics.avg(R))
    assert metrics.op(R) == pytest.approx(2 / 3) and metrics.bwt(R) == pytest.approx(-0.5)
    got = {r["metric"]: r for r in compare.intervals([method], resamples=50)}
    assert set(got) == {"op", "bwt", "learned"}


def test_new_fields_at_their_defaults_keep_the_fingerprint():
    config = tiny_config.get_config()
    before = config_fingerprint(config)
    older = json.loads(config.to_json_best_effort())
    del older["task_format"], older["eval"]["schedule"]  # a config of the code before the fields
    older["kif"]["inner_steps"] = older.pop("cycle")["steps"]  # which kept Q and the buffer in `kif`
    older["kif"]["memory_ratio"] = older.pop("memory_buffer")["ratio"]
    import hashlib

    from kif_jax import checkpointing

    for name in checkpointing._NOT_FINGERPRINTED:
        node, (*parents, leaf) = older, name.split(".")
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    assert before == hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    config.eval.schedule = "diagonal"
    assert config_fingerprint(config) != before
