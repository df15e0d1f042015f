"""kif_jax.compare on hand-made predictions with known answers: metrics, paired intervals, McNemar, errors."""
import json

import numpy as np
import pytest

from kif_jax import compare, metrics
from kif_jax.errors import DataError

TASKS = ["a", "b"]


def write_method(workdir, name, correct, *, tasks=TASKS, ids=None, joint=False):
    """A finished method: correct[(after_task, task)] = list of bools; results.json from the same records."""
    d = workdir / name
    d.mkdir(parents=True)
    R = np.full((len(tasks), len(tasks)), np.nan)
    with open(d / "predictions.jsonl", "w") as f:
        for (row, j), hits in correct.items():
            for i, ok in enumerate(hits):
                ident = (ids or {}).get((j, i), f"{tasks[j]}-{i}")
                f.write(json.dumps({"after_task": row, "task": tasks[j], "index": i, "id": ident,
                                    "prediction": "x" if ok else "y", "label": "x", "correct": ok}) + "\n")
            R[len(tasks) - 1 if joint else row, j] = np.mean(hits)
    (d / "results.json").write_text(json.dumps(metrics.make_results(name, tasks, R)))


# Baseline: task a learned 3/4 then forgotten to 1/4; task b 2/4. Method: a 3/4 -> 3/4, b 4/4.
BASE = {(0, 0): [1, 1, 1, 0], (1, 0): [1, 0, 0, 0], (1, 1): [1, 1, 0, 0]}
METHOD = {(0, 0): [1, 1, 1, 0], (1, 0): [1, 1, 1, 0], (1, 1): [1, 1, 1, 1]}


def as_bool(d):
    return {k: [bool(v) for v in hits] for k, hits in d.items()}


def test_identical_methods_give_zero_intervals(tmp_path):
    write_method(tmp_path, "seq_lora", as_bool(BASE))
    write_method(tmp_path, "replay", as_bool(BASE))
    path, rows = compare.write_comparison(tmp_path, resamples=200)
    stats = [r for r in rows if r["metric"] != "mcnemar"]
    assert [r["metric"] for r in stats] == ["op", "bwt", "avg", "learned"]
    assert all(r["estimate"] == 0 and r["ci_low"] == 0 and r["ci_high"] == 0 for r in stats)
    assert all(r["p_value"] == 1.0 for r in rows if r["metric"] == "mcnemar")
    assert json.loads(path.read_text()) == rows


def test_known_difference_by_hand(tmp_path):
    write_method(tmp_path, "seq_lora", as_bool(BASE))
    write_method(tmp_path, "recurrent_kif", as_bool(METHOD))
    _, rows = compare.write_comparison(tmp_path, resamples=2000, seed=3)
    got = {r["metric"]: r for r in rows if r["metric"] != "mcnemar"}
    # Baseline R = [[.75, -], [.25, .5]]; method R = [[.75, -], [.75, 1]].
    assert got["op"]["estimate"] == pytest.approx((0.75 + 1.0) / 2 - (0.25 + 0.5) / 2)  # 0.5
    assert got["bwt"]["estimate"] == pytest.approx((0.75 - 0.75) - (0.25 - 0.75))  # 0.5
    assert got["learned"]["estimate"] == pytest.approx((0.75 + 1.0) / 2 - (0.75 + 0.5) / 2)  # 0.25
    assert got["avg"]["estimate"] == pytest.approx((0.75 + 0.875) / 2 - (0.75 + 0.375) / 2)  # 0.25
    # The method is never worse on any example, so no resample can make its OP or BWT lower.
    for metric in ("op", "bwt", "avg", "learned"):
        assert 0 <= got[metric]["ci_low"] <= got[metric]["estimate"] <= got[metric]["ci_high"]
        assert got[metric]["resamples"] == 2000
    assert compare.resolved(got["op"]) and got["op"]["ci_low"] > 0
    # McNemar on the final row: task a: method-only 2 (examples 1, 2), baseline-only 0: p = 2 * (1/2)^2 = 0.5.
    tests = {r["task"]: r for r in rows if r["metric"] == "mcnemar"}
    assert (tests["a"]["method_only"], tests["a"]["baseline_only"], tests["a"]["p_value"]) == (2, 0, 0.5)
    assert tests["b"]["estimate"] == pytest.approx(0.5) and tests["b"]["p_value"] == 0.5


def test_mcnemar_by_hand():
    # b = 5, c = 1: p = 2 * (C(6,0) + C(6,1)) / 2^6 = 14 / 64.
    assert compare.mcnemar_exact(5, 1) == pytest.approx(14 / 64)
    assert compare.mcnemar_exact(1, 5) == compare.mcnemar_exact(5, 1)
    assert compare.mcnemar_exact(3, 3) == 1.0 and compare.mcnemar_exact(0, 0) == 1.0
    # b = 10, c = 0: 2 / 1024.
    assert compare.mcnemar_exact(10, 0) == pytest.approx(2 / 1024)


def test_rerun_writes_the_same_bytes_and_the_seed_matters(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("seq_lora", "recurrent_kif"):
        write_method(tmp_path, name, {k: (rng.random(40) < 0.6).tolist() for k in BASE})
    path, _ = compare.write_comparison(tmp_path, resamples=300, seed=1)
    first = path.read_bytes()
    assert compare.write_comparison(tmp_path, resamples=300, seed=1)[0].read_bytes() == first
    assert compare.write_comparison(tmp_path, resamples=300, seed=2)[0].read_bytes() != first


def test_a_second_baseline_adds_to_the_file_in_any_order(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("seq_lora", "replay", "recurrent_kif"):
        write_method(tmp_path, name, {k: (rng.random(30) < 0.6).tolist() for k in BASE})
    compare.write_comparison(tmp_path, resamples=100)
    path, replay_rows = compare.write_comparison(tmp_path, baseline="replay", resamples=100)
    both = json.loads(path.read_text())
    assert {r["baseline"] for r in both} == {"seq_lora", "replay"}
    assert [r for r in both if r["baseline"] == "replay"] == replay_rows
    assert "| recurrent_kif | replay | op |" in (tmp_path / "report" / "paired_comparison.md").read_text()
    first = path.read_bytes()
    path.unlink()
    compare.write_comparison(tmp_path, baseline="replay", resamples=100)
    compare.write_comparison(tmp_path, resamples=100)
    assert path.read_bytes() == first  # the same bytes, whichever baseline ran first
    compare.write_comparison(tmp_path, baseline="replay", resamples=100)  # a rerun replaces its own rows
    assert path.read_bytes() == first


def test_matrix_from_predictions_equals_results(tmp_path):
    write_method(tmp_path, "seq_lora", as_bool(BASE))
    write_method(tmp_path, "mtl", as_bool({(0, 0): [1, 1, 0, 0], (0, 1): [1, 1, 1, 0]}), joint=True)
    methods = compare.load_workdir(tmp_path)
    for m in methods:
        expected = metrics.results_matrix(json.loads((tmp_path / m.name / "results.json").read_text()))
        np.testing.assert_array_equal(m.matrix(), expected)
    rows = compare.compare(methods, "seq_lora", resamples=100)
    assert [r["metric"] for r in rows if r["metric"] != "mcnemar"] == ["op"]  # MTL has a final row only


def test_one_line_errors(tmp_path, capsys):
    write_method(tmp_path, "seq_lora", as_bool(BASE))
    write_method(tmp_path, "replay", as_bool(BASE), ids={(1, 3): "other"})
    assert compare.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different examples of task b" in err
    (tmp_path / "replay" / "predictions.jsonl").unlink()
    assert compare.main([str(tmp_path)]) == 2
    assert "no predictions file" in capsys.readouterr().err
    with pytest.raises(DataError, match="baseline 'ewc'"):
        compare.compare([compare.load_predictions(tmp_path / "seq_lora" / "predictions.jsonl", "seq_lora", TASKS)],
                        "ewc")
    assert compare.main([str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_each_methods_own_intervals_by_hand(tmp_path, capsys):
    """A workdir with one finished method gets its own intervals; the OP interval of a one-task run is the
    percentile interval of the mean over the same multinomial draws, recomputed here."""
    hits = [True] * 30 + [False] * 10
    write_method(tmp_path, "seq_lora", {(0, 0): hits}, tasks=["a"])
    assert compare.main([str(tmp_path), "--resamples", "700", "--seed", "4"]) == 0
    assert "one finished method: no paired comparison" in capsys.readouterr().out
    rows = json.loads((tmp_path / "report" / "intervals.json").read_text())
    op = {r["metric"]: r for r in rows}["op"]
    rng = np.random.default_rng(4)
    draws = np.concatenate([rng.multinomial(40, np.full(40, 1 / 40), size=k) / 40 for k in (500, 200)])
    want = np.percentile(draws @ np.array(hits, float), [2.5, 97.5])
    assert op["estimate"] == 0.75 and [op["ci_low"], op["ci_high"]] == pytest.approx(want.tolist())
    assert op["ci_low"] < 0.75 < op["ci_high"] and {r["metric"] for r in rows} == {"op", "avg", "learned"}
    assert not (tmp_path / "report" / "paired_comparison.json").exists()


def test_intervals_of_each_method_beside_the_paired_ones(tmp_path):
    write_method(tmp_path, "seq_lora", as_bool(BASE))
    write_method(tmp_path, "recurrent_kif", as_bool(METHOD))
    write_method(tmp_path, "mtl", as_bool({(0, 0): [1, 1, 0, 0], (0, 1): [1, 1, 1, 0]}), joint=True)
    _, rows = compare.write_intervals(tmp_path, resamples=300)
    got = {(r["method"], r["metric"]): r for r in rows}
    assert got[("recurrent_kif", "op")]["estimate"] == 0.875 and got[("seq_lora", "bwt")]["estimate"] == -0.5
    assert [m for m, metric in got if m == "mtl"] == ["mtl"]  # a joint method: its op only
    for r in rows:
        assert r["ci_low"] <= r["estimate"] <= r["ci_high"] and r["resamples"] == 300
    # recurrent_kif gets the same examples of task a right after both tasks: one draw serves every row of the
    # matrix, so its BWT is 0 in every resample; SeqLoRA forgets examples 1 and 2 and gains none, so no
    # resample gives it a BWT above 0 (one with neither of them, 1/16 of them, gives 0).
    assert (got[("recurrent_kif", "bwt")]["ci_low"], got[("recurrent_kif", "bwt")]["ci_high"]) == (0, 0)
    assert got[("seq_lora", "bwt")]["ci_high"] == 0 and got[("seq_lora", "bwt")]["ci_low"] < 0
    alone = tmp_path / "alone"
    write_method(alone, "seq_lora", as_bool(BASE))  # a method's intervals do not depend on the others in its run
    assert compare.write_intervals(alone, resamples=300)[1] == [r for r in rows if r["method"] == "seq_lora"]


def test_the_rule_across_orders_needs_every_order_on_one_side_of_zero():
    above, below, across = ({"ci_low": 0.01, "ci_high": 0.05}, {"ci_low": -0.05, "ci_high": -0.01},
                            {"ci_low": -0.01, "ci_high": 0.05})
    assert compare.across_orders([above, above]) == "method"
    assert compare.across_orders([below, below]) == "baseline"
    assert compare.across_orders([above, below]) == "unresolved"  # opposite sides: no verdict
    assert compare.across_orders([above, across]) == "unresolved"
    assert compare.across_orders([above]) == "unfinished"  # one order of two
    assert compare.across_orders([above, None]) == "unfinished"
    assert compare.across_orders([above, above, below], orders=3) == "unresolved"
    # An interval touching 0 does not exclude it.
    assert compare.across_orders([above, {"ci_low": 0.0, "ci_high": 0.04}]) == "unresolved"
