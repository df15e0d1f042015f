"""`python -m kif_jax.reevaluate`: a finished run's task-end checkpoint, evaluated again, gives the recorded
predictions; a changed record is found and named; bad input is one line and exit 2."""
import json
import shutil

import pytest

from kif_jax import reevaluate


@pytest.fixture(scope="module")
def finished(every_method_run):
    _, workdir, results = every_method_run  # tests/conftest.py: every built-in method on the tiny config
    return workdir, results


@pytest.mark.parametrize("method,after_task", [("recurrent_kif", None), ("replay", 1)])
def test_every_row_prediction_is_the_recorded_one(finished, capsys, method, after_task):
    workdir, results = finished
    argv = [str(workdir / method)] + ([] if after_task is None else [f"--after_task={after_task}"])
    assert reevaluate.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    row = results[method]["accuracy_matrix"][(after_task or 2) - 1]
    tasks = ["topic", "compare"][:after_task or 2]
    assert out[:-1] == [f"{t}: 16 examples, identical; score {100 * row[j]:.2f} (recorded {100 * row[j]:.2f})"
                        for j, t in enumerate(tasks)]
    assert out[-1] == f"{16 * len(tasks)} predictions of {len(tasks)} task(s): every prediction and score is the recorded one"


def test_a_changed_record_is_named_and_exits_1(finished, tmp_path, capsys):
    workdir, _ = finished
    shutil.copytree(workdir / "recurrent_kif", tmp_path / "recurrent_kif")
    shutil.copytree(workdir / "synthetic_data", tmp_path / "synthetic_data")
    path = tmp_path / "recurrent_kif" / "predictions.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    last = max(r["after_task"] for r in records)
    target = next(r for r in records if r["after_task"] == last and r["task"] == "compare")
    was = target["prediction"]
    target["prediction"] = was + "x"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert reevaluate.main([str(tmp_path / "recurrent_kif"), "--tasks=compare"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("compare: 16 examples, 1 differ; score ")
    assert out[1] == f"    example {target['id']}: prediction {was + 'x'!r} -> {was!r}"
    assert out[-1] == "16 predictions of 1 task(s): 1 task(s) differ"


def test_bad_input_is_one_line_and_exit_2(finished, tmp_path, capsys):
    workdir, _ = finished
    cases = [([str(tmp_path)], f"error: {tmp_path}/results.json not found: give the directory of a finished method "
                                "(WORKDIR/METHOD)"),
             ([str(workdir / "seq_lora"), "--after_task=3"], "error: --after_task 3: the run has tasks 1 to 2"),
             ([str(workdir / "seq_lora"), "--after_task=1", "--tasks=compare"],
              "error: --tasks: compare not evaluated after task 1 (topic)")]
    for argv, line in cases:
        assert reevaluate.main(argv) == 2
        assert capsys.readouterr().err.splitlines() == [line]
    shutil.copytree(workdir / "seq_lora", tmp_path / "seq_lora", ignore=shutil.ignore_patterns("checkpoints"))
    assert reevaluate.main([str(tmp_path / "seq_lora")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path}/seq_lora/checkpoints has no checkpoint of the end of task 2 (id 20000000); runs keep "
        "them with checkpoint.keep_task_ends"]
