"""Continual-learning metrics on a score matrix, exact-match accuracy, tables and `results.json`.

R[i][j] is the test score on task j after training on task i (0-based here; NaN where not evaluated): the
accuracy for classification tasks, the mean ROUGE-L for generation (the task format's score, kif_jax/tasks/;
every formula below holds for either). With B = the number of rows (tasks trained), as in docs/algorithm.md:

  OP  = mean_j R[B-1][j]                                      (over the B tasks)
  BWT = mean_{j < B-1} (R[B-1][j] - R[j][j])                  (needs B >= 2)
  FWT = mean_{j >= 1} (R[j-1][j] - zero_shot[j])              (needs B >= 2 and zero-shot accuracies)
  Avg = mean_i (mean_{j <= i} R[i][j])                        (average accuracy along the sequence)

A metric whose entries are missing (NaN) is NaN. The functions are scale-free (fractions in,
fractions out); the tables print percent.

`results.json` schema (written by the training loop with `make_results` and kif_jax/run_files.py; all
accuracies are fractions in [0, 1], and `null` stands for "not evaluated" / "undefined"):

  schema_version    int, 1
  method            str, e.g. "recurrent_kif", "seq_lora", "replay", "mtl"
  tasks             list[str], the B tasks in training order
  metric            str, what the matrix holds where it is not accuracy (the task format's `metric`, e.g.
                    "ROUGE-L"); absent = accuracy
  accuracy_matrix   list[list[float | null]], B x B, row i = after training task i,
                    column j = test accuracy (or `metric`) on task j; null = not evaluated
                    (eval.schedule = "diagonal" leaves all but the diagonal and the last row out)
  also              dict[str, matrix] | absent, the task format's other per-example scores, aggregated
                    into matrices of the same shape (the generation format's "exact_match")
  zero_shot         list[float | null] | null, accuracy of the untrained model on each task
  op                float | null, overall performance (null if a final-row entry is missing)
  bwt               float | null, backward transfer (null for B = 1)
  fwt               float | null, forward transfer (null without zero_shot or R[j-1][j])
  avg               float | null, average accuracy along the sequence (null if a seen entry is missing)
  final_accuracy    list[float | null], row B-1 of the matrix (per task, end of training)
  learned_accuracy  list[float | null], the diagonal R[j][j] (just after training task j)
  forgetting        list[float | null], R[j][j] - R[B-1][j] per task (null for the last task)
  config            dict, the run's config (JSON-serialisable)
  timing            dict, seconds per phase (e.g. "total", "train", "eval", per task)
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

SCHEMA_VERSION = 1
RESULTS_SCHEMA: str = "`results.json` schema" + (__doc__ or "").partition("`results.json` schema")[2]


def _matrix(R: Any) -> np.ndarray:
    """R as a float [B, >=B] array (None -> NaN)."""
    if isinstance(R, np.ndarray) and R.dtype != object:
        arr = R.astype(np.float64)
    else:
        arr = np.array([[np.nan if v is None else v for v in row] for row in R], dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < arr.shape[0]:
        raise ValueError(f"accuracy matrix must be 2-D with at least as many columns as rows, got shape {arr.shape}")
    return arr


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size and np.all(np.isfinite(values)) else math.nan


def op(R: Any) -> float:
    """Overall performance: mean accuracy on all B tasks after training the last one."""
    arr = _matrix(R)
    b = arr.shape[0]
    return _mean(arr[b - 1, :b])


def bwt(R: Any) -> float:
    """Backward transfer: mean change on each earlier task from just after learning it to the end."""
    arr = _matrix(R)
    b = arr.shape[0]
    if b < 2:
        return math.nan
    return _mean(arr[b - 1, : b - 1] - np.diag(arr)[: b - 1])


def avg(R: Any) -> float:
    """Average accuracy: the mean over training stages i of the mean accuracy on tasks 0..i after stage i."""
    arr = _matrix(R)
    rows = [_mean(arr[i, : i + 1]) for i in range(arr.shape[0])]
    return _mean(np.array(rows))


def fwt(R: Any, zero_shot: Sequence[float | None] | None) -> float:
    """Forward transfer: mean gain on task j, before training it, over its zero-shot accuracy."""
    if zero_shot is None:
        return math.nan
    arr = _matrix(R)
    b = arr.shape[0]
    z = np.array([np.nan if v is None else v for v in zero_shot], dtype=np.float64)
    if b < 2:
        return math.nan
    if z.shape[0] < b:
        raise ValueError(f"zero_shot has {z.shape[0]} entries for {b} tasks")
    return _mean(np.array([arr[j - 1, j] - z[j] for j in range(1, b)]))


def normalize_answer(text: str) -> str:
    """The form compared by exact match: stripped and lower-cased."""
    return text.strip().lower()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after `normalize_answer` (NaN if empty)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return math.nan
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def accuracy_table(
    R: Any, tasks: Sequence[str], *, method: str | None = None, zero_shot: Sequence[float | None] | None = None,
    metric: str = "accuracy", split: str = "test",
) -> str:
    """A readable table in percent: one row per training stage, one column per task, then OP/BWT/FWT.
    `metric`: what the matrix holds (a results.json's "metric"); `split`: what it was evaluated on."""
    arr = _matrix(R)
    if len(tasks) != arr.shape[1]:
        raise ValueError(f"{len(tasks)} task names for {arr.shape[1]} matrix columns")
    head = "after \\ on"
    first = max([len(head), len("zero-shot")] + [len(t) for t in tasks[: arr.shape[0]]])
    widths = [max(6, len(t)) for t in tasks]
    lines = []
    if method:
        lines.append(f"{method}: {split} {metric} (%) on each task (columns) after training each task (rows)")
    lines.append("  ".join([head.ljust(first)] + [t.rjust(w) for t, w in zip(tasks, widths)]))
    if zero_shot is not None:
        lines.append("  ".join(["zero-shot".ljust(first)] + [_pct(v).rjust(w) for v, w in zip(zero_shot, widths)]))
    for i in range(arr.shape[0]):
        cells = [_pct(float(v)).rjust(w) for v, w in zip(arr[i], widths)]
        lines.append("  ".join([tasks[i].ljust(first)] + cells))
    lines.append(f"OP {_pct(op(arr))}  BWT {_pct(bwt(arr), True)}  Avg {_pct(avg(arr))}  "
                 f"FWT {_pct(fwt(arr, zero_shot), True)}")
    return "\n".join(lines)


def _summary(result: Mapping[str, Any]) -> tuple[float | None, ...]:
    """(op, bwt, avg, fwt) of a results dict, computed from its matrix when absent."""
    values = []
    for name, fn in (("op", lambda m: op(m)), ("bwt", lambda m: bwt(m)), ("avg", lambda m: avg(m)),
                     ("fwt", lambda m: fwt(m, result.get("zero_shot")))):
        if name in result:
            values.append(result[name])
        elif "accuracy_matrix" in result:
            values.append(fn(result["accuracy_matrix"]))
        else:
            values.append(None)
    return tuple(values)  # type: ignore[return-value]


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Methods as rows, OP / BWT / Avg / FWT in percent as columns (results dicts as in `make_results`)."""
    width = max([len("method")] + [len(m) for m in results])
    lines = [f"{'method'.ljust(width)}  {'OP':>6}  {'BWT':>6}  {'Avg':>6}  {'FWT':>6}"]
    for method, result in results.items():
        o, b, a, f = _summary(result)
        lines.append(f"{method.ljust(width)}  {_pct(o):>6}  {_pct(b, True):>6}  {_pct(a):>6}  {_pct(f, True):>6}")
    return "\n".join(lines)


def _json_number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def make_results(
    method: str,
    tasks: Sequence[str],
    R: Any,
    *,
    zero_shot: Sequence[float | None] | None = None,
    config: Mapping[str, Any] | None = None,
    timing: Mapping[str, float] | None = None,
    metric: str = "accuracy",
    also: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `results.json` dict (see RESULTS_SCHEMA): matrix and metrics with NaN written as None. `metric`:
    what the matrix holds (written where it is not accuracy); `also`: further matrices of the same shape."""
    arr = _matrix(R)
    b = arr.shape[0]
    if arr.shape != (b, b) or len(tasks) != b:
        raise ValueError(f"need a {len(tasks)} x {len(tasks)} accuracy matrix for {len(tasks)} tasks, got {arr.shape}")
    finite = arr[np.isfinite(arr)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise ValueError("accuracies must be fractions in [0, 1] (got values outside; percent?)")
    diag = np.diag(arr)
    head: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "method": method, "tasks": list(tasks)}
    if metric != "accuracy":
        head["metric"] = metric
    extra = {}
    if also:
        extra["also"] = {name: [[_json_number(v) for v in row] for row in _matrix(m)] for name, m in also.items()}
    return {
        **head,
        "accuracy_matrix": [[_json_number(v) for v in row] for row in arr],
        "zero_shot": None if zero_shot is None else [_json_number(v) for v in zero_shot],
        "op": _json_number(op(arr)),
        "bwt": _json_number(bwt(arr)),
        "fwt": _json_number(fwt(arr, zero_shot)),
        "avg": _json_number(avg(arr)),
        "final_accuracy": [_json_number(v) for v in arr[b - 1]],
        "learned_accuracy": [_json_number(v) for v in diag],
        "forgetting": [_json_number(diag[j] - arr[b - 1, j]) if j < b - 1 else None for j in range(b)],
        **extra,
        "config": dict(config or {}),
        "timing": {k: float(v) for k, v in (timing or {}).items()},
    }


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a `results.json`; `results_matrix` turns its matrix back into an array with NaN."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def results_metric(results: Mapping[str, Any]) -> str:
    """What a results dict's matrix holds: its "metric", or accuracy (every results.json before formats)."""
    return str(results.get("metric") or "accuracy")


def results_matrix(results: Mapping[str, Any]) -> np.ndarray:
    """The accuracy matrix of a results dict as floats, null -> NaN."""
    return _matrix(results["accuracy_matrix"])
