"""The README's SmolLM2 tables from committed runs: each order's results, times and paired comparisons.

    python tools/smollm2_table.py results/smollm2_o4 results/smollm2_o5

Each directory holds `<method>/results.json`, `<method>/predictions.jsonl` and `<method>/metrics.jsonl`, and the
order's `run.log` (main.py's progress lines); `python -m kif_jax.compare DIR` and `python -m kif_jax.compare DIR
--baseline replay` are run first (they write DIR/report/). Prints markdown: per order and method, OP / BWT / Avg /
learned accuracy (%), OP with its 95% bootstrap interval over test examples (kif_jax.compare.intervals), the
accuracies after the last task and the time (training from metrics.jsonl, evaluation from run.log), then each
difference from SeqLoRA and from Replay with its 95% interval (points), marked resolved
where the interval excludes 0, then per order and task Recurrent-KIF's fusions (`python -m kif_jax.report`'s table:
task-vector sizes, mask shares, magnitude inside / outside the masks, mask overlaps).
"""
import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # kif_jax from this checkout

METRICS = ("op", "bwt", "avg", "learned")
# The first comparison's methods; tools/paper_table.py prints the seven-method tables from the same directories.
ORDER = ("seq_lora", "replay", "recurrent_kif")
NAMES = {"seq_lora": "SeqLoRA", "replay": "Replay", "recurrent_kif": "Recurrent-KIF"}


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def training_minutes(metrics_path: pathlib.Path) -> float:
    """Each training record's steps since the previous record of its phase, over its steps/s, summed."""
    seconds, last_step = 0.0, {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "steps_per_s" in record:
            phase = record["phase"]
            seconds += (record["step"] - last_step.get(phase, 0)) / record["steps_per_s"]
            last_step[phase] = record["step"]
    return seconds / 60


def evaluation_minutes(log_path: pathlib.Path, method: str) -> float | None:
    """The method's "evaluated in" times from main.py's log; an evaluation redone after a resume counts once
    (the last one of each number of tasks). None when there is no log."""
    if not log_path.exists():
        return None
    pattern = re.compile(rf"\[kif_jax\] {re.escape(method)}: evaluated in (?:(\d+)m)?(\d+)s: (.*)$")
    by_tasks = {}
    for line in log_path.read_text().splitlines():
        match = pattern.search(line)
        if match:
            by_tasks[match[3].count(",") + 1] = int(match[1] or 0) * 60 + int(match[2])
    return sum(by_tasks.values()) / 60


def methods_of(directory: pathlib.Path) -> list[str]:
    return [m for m in ORDER if (directory / m / "results.json").exists()]


def op_intervals(directory: pathlib.Path) -> dict[str, tuple[float, float]]:
    """Each method's OP interval: `python -m kif_jax.compare`'s bootstrap (10,000 resamples, seed 0)."""
    from kif_jax import compare

    rows = compare.intervals(compare.load_workdir(directory, minimum=1))
    return {r["method"]: (r["ci_low"], r["ci_high"]) for r in rows if r["metric"] == "op"}


def result_row(directory: pathlib.Path, method: str, op_interval: tuple[float, float]) -> str:
    """One row of the results table, as the README shows it."""
    order = directory.name.rsplit("_o", 1)[-1]
    r = json.loads((directory / method / "results.json").read_text())
    diagonal = [v for v in r.get("learned_accuracy") or [] if v is not None]
    learned = sum(diagonal) / len(diagonal) if len(diagonal) == len(r["tasks"]) else None
    final = ", ".join(pct(v) for v in r["final_accuracy"])
    train = training_minutes(directory / method / "metrics.jsonl")
    evaluation = evaluation_minutes(directory / "run.log", method)
    time = f"{train:.0f} + {evaluation:.0f} min" if evaluation is not None else f"{train:.0f} min training"
    op = f"{pct(r['op'])} [{pct(op_interval[0])}, {pct(op_interval[1])}]"
    return (f"| {order} | {NAMES.get(method, method)} | {op} | {pct(r.get('bwt'))} | {pct(r.get('avg'))} | "
            f"{pct(learned)} | {final} | {time} |")


def rows_of(directory: pathlib.Path, baseline: str) -> dict:
    path = directory / "report" / "paired_comparison.json"
    if not path.exists():
        return {}
    return {(r["method"], r["metric"]): r for r in json.loads(path.read_text())
            if r["metric"] in METRICS and r["baseline"] == baseline and r["method"] in ORDER}


def fusion_rows(directory: pathlib.Path, method: str = "recurrent_kif") -> list[str]:
    """The report's per-task fusion table for `method` (header first), each line led by the order's number."""
    from kif_jax.report.markdown import fusion_table
    from kif_jax.report.runs import load_run

    data = {m.name: m for m in load_run(directory, skip_unfinished=True)[0]}
    if method not in data or not data[method].fusions():
        return []
    order = directory.name.rsplit("_o", 1)[-1]
    header, rule, *rows = fusion_table(data[method].fusions())
    return ["| order " + header, "|---" + rule, *(f"| {order} " + row for row in rows)]


def main(dirs):
    diffs, fusions = [], []
    for d in map(pathlib.Path, dirs):
        methods = methods_of(d)
        if not methods:
            continue
        tasks = json.loads((d / methods[0] / "results.json").read_text())["tasks"]
        print(f"| order | method | OP [95% interval] | BWT | Avg | learned | accuracy after the last task ({', '.join(tasks)}) "
              "| time (train + eval) |\n|---|---|---|---|---|---|---|---|")
        op = op_intervals(d)
        for m in methods:
            print(result_row(d, m, op[m]))
        print()
        order = d.name.rsplit("_o", 1)[-1]
        fusions += fusion_rows(d)[0 if not fusions else 2:]
        for baseline in ("seq_lora", "replay"):
            for (m, metric), row in rows_of(d, baseline).items():
                if m not in ("seq_lora", "replay") or baseline == "seq_lora":  # not SeqLoRA - Replay: its negation
                    diffs.append((order, m, baseline, metric, row))
    if diffs:
        print("| order | method | vs | metric | difference | 95% interval | resolved |\n|---|---|---|---|---|---|---|")
    for order, m, baseline, metric, row in diffs:
        lo, hi = row["ci_low"], row["ci_high"]
        resolved = "yes" if lo > 0 or hi < 0 else "no"
        print(f"| {order} | {NAMES.get(m, m)} | {NAMES.get(baseline, baseline)} | {metric} | "
              f"{100 * row['estimate']:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] | {resolved} |")
    if fusions:
        print("\n" + "\n".join(fusions))


if __name__ == "__main__":
    main(sys.argv[1:])
