"""OP / BWT / FWT on hand-worked matrices, exact match, tables and the results.json dict."""
import json
import math

import numpy as np
import pytest

from kif_jax import metrics
from kif_jax.metrics import accuracy_table, bwt, comparison_table, exact_match, fwt, make_results, op
from kif_jax.run_files import write_json

NAN = float("nan")
# Lower-triangular run (only seen tasks evaluated), worked out by hand:
#   OP  = (0.60 + 0.75 + 0.95) / 3            = 0.7666...
#   BWT = ((0.60 - 0.90) + (0.75 - 0.80)) / 2 = -0.175
#   Avg = (0.90 + (0.70 + 0.80) / 2 + (0.60 + 0.75 + 0.95) / 3) / 3 = (0.90 + 0.75 + 0.7666...) / 3 = 0.80555...
LOWER = [[0.90, NAN, NAN], [0.70, 0.80, NAN], [0.60, 0.75, 0.95]]
# Full matrix with zero-shot accuracies:
#   OP  = (0.5 + 0.7 + 0.6 + 0.9) / 4                              = 0.675
#   BWT = ((0.5 - 0.8) + (0.7 - 0.9) + (0.6 - 0.7)) / 3            = -0.2
#   FWT = ((0.3 - 0.25) + (0.4 - 0.3) + (0.2 - 0.3)) / 3           = 0.05 / 3
#   Avg = (0.8 + 0.75 + (0.5 + 0.8 + 0.7) / 3 + 0.675) / 4           = 0.72291...
FULL = [[0.8, 0.3, 0.1, 0.2], [0.6, 0.9, 0.4, 0.1], [0.5, 0.8, 0.7, 0.2], [0.5, 0.7, 0.6, 0.9]]
ZERO = [0.1, 0.25, 0.3, 0.3]


def test_op_bwt_fwt_by_hand():
    assert op(LOWER) == pytest.approx(2.3 / 3) and bwt(LOWER) == pytest.approx(-0.175)
    assert math.isnan(fwt(LOWER, [0.0, 0.0, 0.0]))  # R[j-1][j] not evaluated
    assert op(FULL) == pytest.approx(0.675) and bwt(FULL) == pytest.approx(-0.2)
    assert fwt(FULL, ZERO) == pytest.approx(0.05 / 3) and math.isnan(fwt(FULL, None))
    assert metrics.avg(LOWER) == pytest.approx((0.9 + 0.75 + 2.3 / 3) / 3)
    assert metrics.avg(FULL) == pytest.approx((0.8 + 0.75 + 2.0 / 3 + 0.675) / 4)
    assert math.isnan(metrics.avg([[NAN, NAN], [0.5, 0.6]]))  # MTL: only the last row is evaluated
    assert op(np.array(FULL) * 100) == pytest.approx(67.5)  # scale-free
    assert op([[0.4]]) == 0.4 and math.isnan(bwt([[0.4]])) and math.isnan(fwt([[0.4]], [0.1]))
    assert op([[0.5, None], [None, 0.5]]) != op([[0.5, None], [None, 0.5]])  # missing final entry -> NaN
    partial = [[0.9, 0.1, 0.2], [0.7, 0.8, 0.3]]  # 2 of 3 tasks trained so far
    assert op(partial) == pytest.approx(0.75) and bwt(partial) == pytest.approx(-0.2)
    with pytest.raises(ValueError):
        op([[0.1], [0.2]])
    with pytest.raises(ValueError):
        fwt(FULL, [0.1])


def test_exact_match():
    assert exact_match([" Yes", "no \n", "maybe"], ["yes", "No", "no"]) == pytest.approx(2 / 3)
    assert exact_match(["Science or Technology"], ["science or technology"]) == 1.0
    assert exact_match(["A"], ["B"]) == 0.0 and math.isnan(exact_match([], []))
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_tables():
    table = accuracy_table(LOWER, ["mnli", "cb", "wic"], method="seq_lora")
    lines = table.splitlines()
    assert lines[0].startswith("seq_lora: test accuracy (%)") and lines[1].split()[-3:] == ["mnli", "cb", "wic"]
    assert lines[3].split() == ["cb", "70.0", "80.0", "-"]
    assert lines[-1] == "OP 76.7  BWT -17.5  Avg 80.6  FWT -"
    assert accuracy_table(LOWER, ["mnli", "cb", "wic"], method="m", split="dev").startswith("m: dev accuracy (%)")
    with_zero = accuracy_table(FULL, ["a", "b", "c", "d"], zero_shot=ZERO)
    assert with_zero.splitlines()[1].split() == ["zero-shot", "10.0", "25.0", "30.0", "30.0"]
    assert with_zero.splitlines()[-1] == "OP 67.5  BWT -20.0  Avg 72.3  FWT +1.7"
    runs = {"recurrent_kif": make_results("recurrent_kif", list("abcd"), FULL, zero_shot=ZERO),
            "seq_lora": {"accuracy_matrix": LOWER}}
    rows = comparison_table(runs).splitlines()
    assert rows[0].split() == ["method", "OP", "BWT", "Avg", "FWT"]
    assert rows[1].split() == ["recurrent_kif", "67.5", "-20.0", "72.3", "+1.7"]
    assert rows[2].split() == ["seq_lora", "76.7", "-17.5", "80.6", "-"]


def test_make_results_is_strict_json(tmp_path):
    res = make_results("replay", ["mnli", "cb", "wic"], LOWER, config={"seed": 42}, timing={"total": 12.5})
    assert res["accuracy_matrix"][0] == [0.9, None, None] and res["fwt"] is None and res["zero_shot"] is None
    assert res["op"] == pytest.approx(2.3 / 3) and res["bwt"] == pytest.approx(-0.175)
    assert res["avg"] == pytest.approx((0.9 + 0.75 + 2.3 / 3) / 3)
    assert res["final_accuracy"] == [0.6, 0.75, 0.95] and res["learned_accuracy"] == [0.9, 0.8, 0.95]
    assert res["forgetting"] == [pytest.approx(0.3), pytest.approx(0.05), None]
    assert res["method"] == "replay" and res["config"] == {"seed": 42} and res["timing"] == {"total": 12.5}
    path = tmp_path / "results.json"
    write_json(path, res)  # as the training loop writes it: strict JSON, NaN as null
    back = metrics.read_results(path)
    assert back == json.loads(json.dumps(res)) and "NaN" not in path.read_text()
    assert np.isnan(metrics.results_matrix(back)[0, 2]) and metrics.results_matrix(back)[2, 1] == 0.75
    one = make_results("seq_lora", ["cb"], [[0.5]])
    assert one["bwt"] is None and one["forgetting"] == [None]
    with pytest.raises(ValueError, match="fractions"):
        make_results("x", ["a"], [[75.0]])
    with pytest.raises(ValueError):
        make_results("x", ["a", "b"], [[0.5]])
    for key in ("method", "tasks", "accuracy_matrix", "op", "bwt", "fwt", "avg", "config", "timing"):
        assert f"  {key}" in metrics.RESULTS_SCHEMA
