"""Paired comparison of the methods of one run on the same test examples: bootstrap intervals, McNemar.

    python -m kif_jax.compare WORKDIR [--baseline METHOD] [--resamples 10000] [--seed 0]

Every finished method of WORKDIR (a `<method>/results.json` beside its `predictions.jsonl`) is
compared with the baseline (default `seq_lora`) on the metrics

  op       mean final score                bwt      backward transfer
  avg      average score along the sequence (metrics.avg)
  learned  mean of R[j][j], each task's score just after training it

as fractions, like results.json. The score is each example's `score` in predictions.jsonl (its task
format's: 0 or 1 for classification, ROUGE-L for generation; records written before formats carry only
`correct`, which gives it). Each difference (method minus baseline) comes with a 95% percentile
bootstrap interval over test examples, stratified by task and paired: one resample draws, for each
task, its n evaluated examples with replacement, and the same draw serves both methods and every
row of the matrix (every evaluation of a task reads the same examples). The draws come from
`numpy.random.default_rng(seed)` in a fixed order, so a rerun writes the same bytes. A difference is
resolved when its interval excludes 0; a metric whose entries were not evaluated (Avg under
eval.schedule = "diagonal") is left out. Where the scores are binary (every record has `correct`), the
final accuracies per task are also compared by an exact two-sided McNemar test on the examples one
method gets right and the other wrong.

Each method's own metrics also get intervals from the same draws (`WORKDIR/report/intervals.json`, rows
`{"method", "metric", "estimate", "ci_low", "ci_high", "resamples"}`, and intervals.md); a workdir with one
finished method gets these alone.

Output: `WORKDIR/report/paired_comparison.json`, a list of rows
`{"method", "baseline", "metric", "estimate", "ci_low", "ci_high", "resamples"}`, then one row per
method and task `{"method", "baseline", "metric": "mcnemar", "task", "estimate" (final-accuracy
difference), "method_only", "baseline_only", "p_value"}`; and the same as a markdown table in
`paired_comparison.md`. Comparisons with other baselines already in the file are kept (grouped by
baseline name), so `--baseline replay` after the default adds to it. A joint method (MTL: one phase on every task) has a final row only, so only
its `op` is compared.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

from kif_jax import metrics
from kif_jax.errors import DataError, KifError

METRICS = ("op", "bwt", "avg", "learned")
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_DIR = "report"
_CHUNK = 500  # resamples drawn per batch: fixed, so the draws (and the bytes written) never depend on memory


@dataclasses.dataclass
class MethodPredictions:
    """One method's per-example scores: `scores[(row, task)]` float64 [n_task] in example order; `binary`: every
    score is a 0/1 correctness (the records carry `correct`)."""

    name: str
    tasks: list[str]
    scores: dict[tuple[int, int], np.ndarray]
    examples: dict[int, list[tuple[int, Any, str]]]  # task -> [(index, id, label)], to check pairing
    binary: bool = True

    @property
    def correct(self) -> dict[tuple[int, int], np.ndarray]:
        """The scores as booleans (binary scores only)."""
        if not self.binary:
            raise DataError(f"method {self.name}: its scores are not binary")
        return {key: values > 0.5 for key, values in self.scores.items()}

    @property
    def joint(self) -> bool:
        """One phase evaluated on every task (MTL): only its final row exists."""
        return {row for row, _ in self.scores} == {len(self.tasks) - 1} and len(self.tasks) > 1

    def matrix(self) -> np.ndarray:
        """The score matrix these records give (NaN where not evaluated): each entry the mean score."""
        b = len(self.tasks)
        R = np.full((b, b), np.nan)
        for (row, task), values in self.scores.items():
            R[row, task] = values.mean()
        return R


def load_predictions(path: pathlib.Path, name: str, tasks: Sequence[str], *, field: str = "score") -> MethodPredictions:
    """Read `predictions.jsonl` of a method trained on `tasks` (zero-shot records, after_task -1, are skipped).

    `field`: the per-example value to read, `score` (a record without one, written before task formats, scores
    float(correct)) or another of the format's fields (e.g. "exact_match")."""
    if not path.is_file():
        raise DataError(f"{path}: no predictions file (runs written before per-example predictions cannot be "
                        f"compared; rerun the method)")
    index = {t: j for j, t in enumerate(tasks)}
    rows: dict[tuple[int, int], list[tuple[int, Any, str, float]]] = {}
    binary = True
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                key = (int(r["after_task"]), index[r["task"]])
                value = r[field] if field != "score" or "score" in r else r["correct"]
                entry = (int(r["index"]), r.get("id"), str(r["label"]), float(value))
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{n}: not a prediction record ({type(err).__name__}: {err})") from None
            binary = binary and "correct" in r
            if key[0] >= 0:
                rows.setdefault(key, []).append(entry)
    if not rows:
        raise DataError(f"{path}: no predictions after any task")
    phases = sorted({row for row, _ in rows})
    joint = phases == [0] and len(tasks) > 1 and len({task for _, task in rows}) == len(tasks)
    scores, examples = {}, {}
    for (row, task), entries in sorted(rows.items()):
        entries.sort()
        if [e[0] for e in entries] != list(range(len(entries))):
            raise DataError(f"{path}: task {tasks[task]} after task {row}: example indices are not 0..n-1 once each")
        seen = [(i, ident, label) for i, ident, label, _ in entries]
        if examples.setdefault(task, seen) != seen:
            raise DataError(f"{path}: task {tasks[task]} was evaluated on different examples after different tasks")
        scores[(len(tasks) - 1 if joint else row, task)] = np.array([e[3] for e in entries], np.float64)
    return MethodPredictions(name, list(tasks), scores, examples, binary=binary and field in ("score", "correct"))


def _metric(name: str, R: np.ndarray) -> np.ndarray:
    """`name` of matrices R [..., B, B] (NaN where not evaluated), over the leading axes."""
    b = R.shape[-1]
    if name == "op":
        return R[..., b - 1, :].mean(-1)
    if name == "bwt":
        if b < 2:
            return np.full(R.shape[:-2], np.nan)
        return (R[..., b - 1, : b - 1] - np.diagonal(R, axis1=-2, axis2=-1)[..., : b - 1]).mean(-1)
    if name == "learned":
        return np.diagonal(R, axis1=-2, axis2=-1).mean(-1)
    if name == "avg":
        rows = [R[..., i, : i + 1].mean(-1) for i in range(b)]
        return np.stack(rows, -1).mean(-1)
    raise ValueError(f"unknown metric {name!r}")


def mcnemar_exact(method_only: int, baseline_only: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of the discordant pairs against 1/2."""
    n = method_only + baseline_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(method_only, baseline_only) + 1))
    return min(1.0, 2.0 * tail / 2**n)


def _check_paired(a: MethodPredictions, b: MethodPredictions) -> None:
    if a.tasks != b.tasks:
        raise DataError(f"methods {a.name} and {b.name} were trained on different task sequences")
    for task in range(len(a.tasks)):
        if a.examples.get(task) != b.examples.get(task):
            raise DataError(f"methods {a.name} and {b.name} were evaluated on different examples of task "
                            f"{a.tasks[task]}")


def _bootstrap_matrices(methods: Sequence[MethodPredictions], sizes: Sequence[int], resamples: int,
                        seed: int) -> dict[str, np.ndarray]:
    """Bootstrap accuracy matrices [resamples, B, B] of every method (NaN where not evaluated), from one
    draw per task and chunk shared by all of them; task j has `sizes[j]` evaluated examples."""
    b = len(sizes)
    boot = {m.name: np.full((resamples, b, b), np.nan) for m in methods}
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, _CHUNK):
        stop = min(resamples, start + _CHUNK)
        for j, n in enumerate(sizes):
            weights = rng.multinomial(n, np.full(n, 1.0 / n), size=stop - start) / n  # [chunk, n]
            for m in methods:
                for (row, task), values in m.scores.items():
                    if task == j:
                        boot[m.name][start:stop, row, j] = weights @ values
    return boot


def intervals(methods: Sequence[MethodPredictions], *, resamples: int = 10_000, seed: int = 0) -> list[dict]:
    """Each method's own metrics with 95% percentile bootstrap intervals over its test examples, stratified
    by task (the draws of `compare` with the same seed): rows {"method", "metric", "estimate", "ci_low",
    "ci_high", "resamples"}, the rows of intervals.json."""
    if resamples < 1:
        raise DataError(f"--resamples must be positive, got {resamples}")
    sizes = {m.name: tuple(len(m.examples[j]) for j in range(len(m.tasks))) for m in methods}
    boot = {}  # one draw per set of task sizes: the same draws a method would get alone
    for group in dict.fromkeys(sizes.values()):
        boot.update(_bootstrap_matrices([m for m in methods if sizes[m.name] == group], group, resamples, seed))
    rows = []
    for m in methods:
        for metric in ("op",) if m.joint else METRICS:
            estimate = float(_metric(metric, m.matrix()))
            if not math.isfinite(estimate):
                continue
            low, high = (float(v) for v in np.percentile(_metric(metric, boot[m.name]), [2.5, 97.5]))
            rows.append({"method": m.name, "metric": metric, "estimate": estimate, "ci_low": low, "ci_high": high,
                         "resamples": resamples})
    return rows


def compare(methods: Sequence[MethodPredictions], baseline: str, *, resamples: int = 10_000,
            seed: int = 0) -> list[dict]:
    """The rows of paired_comparison.json for every method against `baseline` (see the module doc)."""
    by_name = {m.name: m for m in methods}
    if baseline not in by_name:
        raise DataError(f"baseline {baseline!r} is not among the finished methods: {', '.join(by_name) or 'none'}")
    if resamples < 1:
        raise DataError(f"--resamples must be positive, got {resamples}")
    base = by_name[baseline]
    others = [m for m in methods if m.name != baseline]
    for m in others:
        _check_paired(m, base)
    b = len(base.tasks)
    boot = _bootstrap_matrices(methods, [len(base.examples[j]) for j in range(b)], resamples, seed)
    rows: list[dict] = []
    for m in others:
        names = ("op",) if m.joint or base.joint else METRICS
        for metric in names:
            estimate = float(_metric(metric, m.matrix()) - _metric(metric, base.matrix()))
            if not math.isfinite(estimate):  # e.g. bwt of a single task
                continue
            diffs = _metric(metric, boot[m.name]) - _metric(metric, boot[baseline])
            low, high = (float(v) for v in np.percentile(diffs, [2.5, 97.5]))
            rows.append({"method": m.name, "baseline": baseline, "metric": metric, "estimate": estimate,
                         "ci_low": low, "ci_high": high, "resamples": resamples})
    for m in others:
        if not (m.binary and base.binary):
            continue  # McNemar compares right / wrong: binary scores only
        mine_all, theirs_all = m.correct, base.correct
        for j, task in enumerate(base.tasks):
            mine, theirs = mine_all[(b - 1, j)], theirs_all[(b - 1, j)]
            only_m, only_b = int(np.sum(mine & ~theirs)), int(np.sum(~mine & theirs))
            rows.append({"method": m.name, "baseline": baseline, "metric": "mcnemar", "task": task,
                         "estimate": float(mine.mean() - theirs.mean()), "method_only": only_m,
                         "baseline_only": only_b, "p_value": mcnemar_exact(only_m, only_b)})
    return rows


def resolved(row: dict) -> bool:
    """A difference is resolved when its 95% interval excludes 0."""
    return row["ci_low"] > 0 or row["ci_high"] < 0


def across_orders(rows: Sequence[dict | None], *, orders: int = 2) -> str:
    """The decision rule over task orders, on one comparison's rows (one an order, None where unfinished).

    "method" when the interval lies above 0 in every order, "baseline" when below 0 in every order,
    "unresolved" otherwise, and "unfinished" while fewer than `orders` orders have a row.
    """
    if len(rows) < orders or any(row is None for row in rows):
        return "unfinished"
    if all(row["ci_low"] > 0 for row in rows):
        return "method"
    if all(row["ci_high"] < 0 for row in rows):
        return "baseline"
    return "unresolved"


def intervals_markdown(rows: Sequence[dict]) -> str:
    """Each method's metrics (points) with their 95% intervals."""
    lines = ["| method | metric | estimate (points) | 95% interval |", "|---|---|---:|---|"]
    lines += [f"| {r['method']} | {r['metric']} | {100 * r['estimate']:.1f} | "
              f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] |" for r in rows]
    return "\n".join(lines)


def markdown(rows: Sequence[dict]) -> str:
    """The rows as markdown: differences in points with their 95% intervals, then the McNemar tests."""
    lines = ["| method | baseline | metric | difference (points) | 95% interval | resolved |",
             "|---|---|---|---:|---|---|"]
    for r in rows:
        if r["metric"] != "mcnemar":
            lines.append(f"| {r['method']} | {r['baseline']} | {r['metric']} | {100 * r['estimate']:+.1f} | "
                         f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] | "
                         f"{'yes' if resolved(r) else 'no'} |")
    tests = [r for r in rows if r["metric"] == "mcnemar"]
    if tests:
        lines += ["", "Final accuracy per task, exact McNemar test (examples only the method / only the baseline "
                  "gets right):", "", "| method | baseline | task | difference (points) | method only | "
                  "baseline only | p |", "|---|---|---|---:|---:|---:|---:|"]
        for r in tests:
            lines.append(f"| {r['method']} | {r['baseline']} | {r['task']} | {100 * r['estimate']:+.1f} | "
                         f"{r['method_only']} | {r['baseline_only']} | {r['p_value']:.3g} |")
    return "\n".join(lines)


def load_workdir(workdir: pathlib.Path, *, minimum: int = 2) -> list[MethodPredictions]:
    """Every finished method of a run (a results.json), with its predictions, in name order; at least `minimum`."""
    if not workdir.is_dir():
        raise DataError(f"{workdir}: no such run directory")
    out = []
    for results_path in sorted(workdir.glob("*/results.json")):
        try:
            tasks = metrics.read_results(results_path)["tasks"]
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{results_path}: unreadable results ({type(err).__name__}: {err})") from None
        name = results_path.parent.name
        out.append(load_predictions(results_path.parent / PREDICTIONS_FILE, name, tasks))
    if len(out) < minimum:
        raise DataError(f"{workdir}: {len(out)} finished method(s) (a <method>/results.json); {minimum} needed")
    return out


def default_baseline(methods: Sequence[MethodPredictions]) -> str:
    names = [m.name for m in methods]
    return "seq_lora" if "seq_lora" in names else names[0]


def write_comparison(workdir: str | pathlib.Path, *, baseline: str | None = None, resamples: int = 10_000,
                     seed: int = 0) -> tuple[pathlib.Path, list[dict]]:
    """Compare every finished method of `workdir` with `baseline`; write report/paired_comparison.{json,md}."""
    workdir = pathlib.Path(workdir)
    methods = load_workdir(workdir)
    baseline = baseline or default_baseline(methods)
    rows = compare(methods, baseline, resamples=resamples, seed=seed)
    outdir = workdir / REPORT_DIR
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "paired_comparison.json"
    # Comparisons with other baselines stay (a run is compared with SeqLoRA and with Replay), grouped by
    # baseline name, so the file's bytes do not depend on the order the commands ran in.
    kept = [r for r in _previous_rows(path) if r.get("baseline") != baseline]
    every = sorted(kept + rows, key=lambda r: r["baseline"])  # stable: each group keeps its own order
    path.write_text(json.dumps(every, indent=1) + "\n", encoding="utf-8")
    groups = [[r for r in every if r["baseline"] == b] for b in dict.fromkeys(r["baseline"] for r in every)]
    (outdir / "paired_comparison.md").write_text("\n\n".join(markdown(g) for g in groups) + "\n", encoding="utf-8")
    return path, rows


def write_intervals(workdir: str | pathlib.Path, *, resamples: int = 10_000,
                    seed: int = 0) -> tuple[pathlib.Path, list[dict]]:
    """Each finished method's own intervals (`intervals`); write report/intervals.{json,md}."""
    workdir = pathlib.Path(workdir)
    rows = intervals(load_workdir(workdir, minimum=1), resamples=resamples, seed=seed)
    outdir = workdir / REPORT_DIR
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "intervals.json"
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (outdir / "intervals.md").write_text(intervals_markdown(rows) + "\n", encoding="utf-8")
    return path, rows


def _previous_rows(path: pathlib.Path) -> list[dict]:
    """The rows an earlier comparison wrote to `path` (none if it is missing or unreadable)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and "baseline" in r] if isinstance(rows, list) else []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kif_jax.compare", description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="the --workdir of a run with finished methods")
    parser.add_argument("--baseline", default=None, help="the method every other one is compared with "
                        "(default: seq_lora if present, else the first by name)")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    args = parser.parse_args(argv)
    try:
        own_path, own = write_intervals(args.workdir, resamples=args.resamples, seed=args.seed)
        paired = len({r["method"] for r in own}) > 1
        if paired:
            path, rows = write_comparison(args.workdir, baseline=args.baseline, resamples=args.resamples,
                                          seed=args.seed)
    except KifError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(intervals_markdown(own) + f"\n\neach method's intervals in {own_path}")
    if paired:
        print("\n" + markdown(rows) + f"\n\npaired comparison in {path}")
    else:
        print("one finished method: no paired comparison")
    return 0


if __name__ == "__main__":
    sys.exit(main())
