"""Every method's numbers on the tiny config are those the code before the methods package gave (commit
5a3571e), bit for bit: accuracy matrices, every metrics.jsonl record (losses, gradient norms, learning
rates, mask shares, fusion statistics, the task-end events) and every prediction.

tests/fixtures/method_golden.json was written by `tools/make_method_golden.py` with that code, under the
suite's XLA settings (tests/conftest.py). Methods added since are recorded with the current code.
XLA:CPU's float results follow the CPU's vector instruction sets and the jax version, so the comparison
runs where those are the fixture's (its "environment") and is skipped, naming both, elsewhere.
"""
import json
import pathlib

import pytest

from helpers import comparable_records, float_environment, read_metrics

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "method_golden.json").read_text())
GOLDEN = FIXTURE["methods"]


@pytest.fixture(scope="module")
def run(every_method_run):
    here = float_environment()
    if here != FIXTURE["environment"]:
        pytest.skip(f"the golden numbers were recorded with {FIXTURE['environment']}; this is {here}, whose float "
                    "arithmetic may differ")
    _, workdir, results = every_method_run
    return workdir, results


@pytest.mark.parametrize("method", list(GOLDEN))
def test_method_reproduces_its_recorded_results(run, method):
    workdir, results = run
    want = GOLDEN[method]
    assert results[method]["accuracy_matrix"] == want["accuracy_matrix"]
    got = comparable_records(workdir / method / "metrics.jsonl")
    assert len(got) == len(want["records"])
    for g, w in zip(got, want["records"]):
        assert g == w, (method, g, w)
    # Prediction records gained `score` with the task formats (kif_jax/tasks/): the recorded fields are equal, and
    # a classification record's score is float(correct).
    got = read_metrics(workdir / method / "predictions.jsonl")
    assert [{k: r[k] for k in w} for r, w in zip(got, want["predictions"])] == want["predictions"]
    assert len(got) == len(want["predictions"])
    assert all(set(r) == {*w, "score"} and type(r["score"]) is float and r["score"] == float(r["correct"]) for r, w in zip(got, want["predictions"]))
