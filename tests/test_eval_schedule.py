"""eval.schedule = "diagonal": after each task only that task, after the last every task. The matrix shows the rest
as missing, OP / BWT / learned equal the full schedule's, and the run costs 2B - 1 task evaluations, not B(B+1)/2."""
import json
import math

import numpy as np
import pytest

import tiny_config
from kif_jax import compare, metrics
from kif_jax.config import validate_config
from kif_jax.errors import ConfigError


def test_diagonal_and_all_tasks_do_not_mix():
    config = tiny_config.get_config()
    config.eval.schedule = "diagonal"
    validate_config(config)
    config.eval.all_tasks = True
    with pytest.raises(ConfigError, match="eval.schedule"):
        validate_config(config)


def test_the_diagonal_schedule_keeps_op_and_bwt(tmp_path):
    from kif_jax.train import train_and_evaluate

    runs = {}
    for schedule in ("full", "diagonal"):
        config = tiny_config.get_config()
        config.methods = "seq_lora,mtl"
        config.tasks = "topic,compare,parity"
        config.eval.schedule = schedule
        runs[schedule] = (train_and_evaluate(config, tmp_path / schedule), tmp_path / schedule)
    (full, full_dir), (diagonal, diagonal_dir) = runs["full"], runs["diagonal"]
    b = 3
    R_full = metrics.results_matrix(full["seq_lora"])
    R_diag = metrics.results_matrix(diagonal["seq_lora"])
    evaluated = np.zeros((b, b), bool)
    evaluated[np.arange(b), np.arange(b)] = True
    evaluated[b - 1] = True
    assert np.array_equal(np.isfinite(R_diag), evaluated)  # missing (null in results.json) elsewhere
    np.testing.assert_array_equal(R_diag[evaluated], R_full[evaluated])  # the same training, the same scores
    for name in ("op", "bwt", "final_accuracy", "learned_accuracy", "forgetting"):
        assert diagonal["seq_lora"][name] == full["seq_lora"][name], name
    assert diagonal["seq_lora"]["avg"] is None and full["seq_lora"]["avg"] is not None
    assert diagonal["mtl"]["accuracy_matrix"] == full["mtl"]["accuracy_matrix"]  # one phase: its row is the last

    def evaluations(workdir):
        records = [json.loads(line) for line in (workdir / "seq_lora" / "predictions.jsonl").open()]
        return sorted({(r["after_task"], r["task"]) for r in records})

    assert len(evaluations(full_dir)) == b * (b + 1) // 2 and len(evaluations(diagonal_dir)) == 2 * b - 1
    rebuilt = compare.load_predictions(diagonal_dir / "seq_lora" / "predictions.jsonl", "seq_lora",
                                       diagonal["seq_lora"]["tasks"])
    np.testing.assert_array_equal(rebuilt.matrix(), R_diag)
    rows = {(r["method"], r["metric"]) for r in json.loads((diagonal_dir / "report" / "intervals.json").read_text())}
    assert ("seq_lora", "op") in rows and ("seq_lora", "bwt") in rows and ("seq_lora", "avg") not in rows
    table = metrics.accuracy_table(R_diag, diagonal["seq_lora"]["tasks"])
    assert table.splitlines()[2].split() == ["compare", "-", f"{100 * R_diag[1, 1]:.1f}", "-"]  # after task 2
    assert math.isfinite(diagonal["seq_lora"]["op"])
