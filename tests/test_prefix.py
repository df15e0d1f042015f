"""`checkpoint.prefix_from`: a run of one task order starts from another order's checkpoint after their
shared first tasks, and its records equal those of a full run of its order byte for byte (timings aside);
a prefix from another config, seed or first task is refused with one line."""
import json
import pathlib

import pytest

import tiny_config
from helpers import comparable_records
from kif_jax import cli
from kif_jax.train import train_and_evaluate

METHODS = "recurrent_kif,o_lora"  # the richest state (buffer, both importances) and a state that grows per task
ORDER_A = "topic,compare"
ORDER_B = "topic,parity"


def config_for(tasks: str, **fields):
    c = tiny_config.get_config()
    c.methods = METHODS
    c.tasks = tasks
    c.checkpoint.every_steps = 2  # mid-task checkpoints too: only task ends may be taken
    for name, value in fields.items():
        section, _, leaf = name.rpartition(".")
        (c[section] if section else c)[leaf] = value
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    train_and_evaluate(config_for(ORDER_A), root / "a")
    train_and_evaluate(config_for(ORDER_B), root / "b")
    train_and_evaluate(config_for(ORDER_B, **{"checkpoint.prefix_from": str(root / "a")}), root / "b_from_a")
    return root


def _without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("timing", "config")}


@pytest.mark.parametrize("method", METHODS.split(","))
def test_records_equal_a_full_run_of_the_order(runs, method):
    full, reused = runs / "b" / method, runs / "b_from_a" / method
    assert (reused / "predictions.jsonl").read_bytes() == (full / "predictions.jsonl").read_bytes()
    assert comparable_records(reused / "metrics.jsonl") == comparable_records(full / "metrics.jsonl")
    got, want = (json.loads((d / "results.json").read_text()) for d in (reused, full))
    assert _without_timing(got) == _without_timing(want)
    assert got["config"]["checkpoint"]["prefix_from"] == str(runs / "a")
    # The shared task was not trained again: the reused run's first task's records are order A's.
    first = [r for r in comparable_records(runs / "a" / method / "metrics.jsonl") if r.get("phase", 9) < 1]
    assert first and comparable_records(reused / "metrics.jsonl")[:len(first)] == first
    # It trained only the second task: its first checkpoint is order A's after task 1, and says so.
    own = sorted(int(p.name) for p in (reused / "checkpoints").iterdir() if p.name.isdigit())
    assert own[0] == 10_000_000 and 20_000_000 in own
    meta = json.loads((reused / "checkpoints" / "10000000" / "meta" / "metadata").read_text())
    assert meta["prefix_from"] == {"run": str(runs / "a"), "checkpoint": 10_000_000, "tasks": ["topic"]}
    # Every task end is kept, whatever checkpoint.keep says (2 here, with mid-task saves every 2 steps).
    ends = sorted(int(p.name) for p in (runs / "a" / method / "checkpoints").iterdir() if p.name.isdigit()
                  and int(p.name) % 10_000_000 == 0)
    assert ends == [10_000_000, 20_000_000]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("change, message", [
    ({"seed": 8}, "different config"),
    ({"train.lr": 2e-2}, "different config"),
    ({"tasks": "compare,parity"}, "does not begin"),
    ({"eval.all_tasks": True}, "eval.all_tasks"),
])
def test_a_prefix_that_differs_is_refused_in_one_line(runs, tmp_path, capsys, change, message):
    fields = {"checkpoint.prefix_from": str(runs / "a"), **change}
    tasks = fields.pop("tasks", ORDER_B)
    assert cli.run(config_for(tasks, **fields), str(tmp_path / "w")) == 2
    line = _one_line_error(capsys)
    assert "checkpoint.prefix_from" in line and message in line
    assert not (tmp_path / "w" / "recurrent_kif" / "results.json").exists()


def test_a_missing_prefix_run_is_refused(tmp_path, capsys):
    config = config_for(ORDER_B, **{"checkpoint.prefix_from": str(tmp_path / "nowhere")})
    assert cli.run(config, str(tmp_path / "w")) == 2
    assert "holds no finished task" in _one_line_error(capsys)
