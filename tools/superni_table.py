"""The README's SuperNI tables from committed runs: ROUGE-L per order, the paired differences and the verdicts.

    python tools/superni_table.py results/superni_o1 results/superni_o2

Each directory holds `<method>/results.json` and `<method>/predictions.jsonl` (tools/collect_run.py) of a run of
configs/smollm2_superni.py. Prints markdown, per order: each method's ROUGE-L OP with its 95% bootstrap interval,
BWT, the mean score right after learning each task, exact match after the last task (%), and the time (training +
evaluation, from results.json). Then Recurrent-KIF's paired OP and BWT differences from SeqLoRA and from Replay,
and Replay's from SeqLoRA, with 95% intervals (kif_jax.compare on the per-example ROUGE-L: test examples
resampled within each task, 10,000 resamples, seed 0), and the verdict of the rule fixed before the runs
(docs/experiments.md): a method beats another when the interval of its OP difference excludes 0, on the same
side, in both orders. Last, per order, each method's ROUGE-L on every task right after learning it and after the
last task. A method not finished in a directory is listed as such.
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # kif_jax from this checkout
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from paper_table import difference, pct, verdict_between  # noqa: E402  (the seven-method tables' cells, the same here)

METHODS = ("seq_lora", "replay", "recurrent_kif")
NAMES = {"seq_lora": "SeqLoRA", "replay": "Replay", "recurrent_kif": "Recurrent-KIF"}
PAIRS = (("recurrent_kif", "seq_lora"), ("recurrent_kif", "replay"), ("replay", "seq_lora"))


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def finished(directory: pathlib.Path) -> list[str]:
    return [m for m in METHODS if (directory / m / "results.json").exists()]


def results(directory: pathlib.Path, method: str) -> dict:
    return json.loads((directory / method / "results.json").read_text())


def method_row(directory: pathlib.Path, method: str, intervals: dict) -> str:
    if method not in intervals:
        return f"| {NAMES[method]} | not finished | | | | |"
    r = results(directory, method)
    lo, hi = intervals[method]
    exact_final = mean(r["also"]["exact_match"][-1])
    time = f"{r['timing']['train_s'] / 60:.0f} + {r['timing']['eval_s'] / 60:.0f} min"
    return (f"| {NAMES[method]} | {pct(r['op'])} [{pct(lo)}, {pct(hi)}] | {pct(r.get('bwt'))} | "
            f"{pct(mean(r['learned_accuracy']))} | {pct(exact_final)} | {time} |")


def differences(directory: pathlib.Path) -> dict[tuple[str, str], dict[str, dict]]:
    """{(method, baseline): {"op"/"bwt": method minus baseline, with its interval}} over the finished pairs."""
    from kif_jax import compare

    methods = compare.load_workdir(directory, minimum=1)
    names = {m.name for m in methods}
    out = {}
    for method, baseline in PAIRS:
        if {method, baseline} <= names:
            rows = compare.compare(methods, baseline, resamples=10_000)
            out[method, baseline] = {r["metric"]: r for r in rows if r["method"] == method}
    return out


def verdict(method: str, baseline: str, per_order: list[dict | None]) -> str:
    """The committed rule on the OP rows of SAPT's two orders."""
    return verdict_between(NAMES[method], NAMES[baseline], per_order)


def per_task_rows(directory: pathlib.Path, tasks: list[str]) -> list[str]:
    """Each finished method's "learned -> final" ROUGE-L (%) on every task."""
    rows = ["| method | " + " | ".join(t.split("_", 1)[0] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for method in finished(directory):
        r = results(directory, method)
        cells = [f"{pct(first)} → {pct(final)}" for first, final in zip(r["learned_accuracy"], r["final_accuracy"])]
        rows.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    return rows


def main(dirs) -> None:
    from kif_jax import compare
    from kif_jax.data import resolve_tasks

    dirs = [pathlib.Path(d) for d in dirs]
    diffs, per_task = {}, {}
    for d in dirs:
        order = d.name.rsplit("_o", 1)[-1]
        done = finished(d)
        tasks = results(d, done[0])["tasks"] if done else resolve_tasks(benchmark="superni_gen5", order=int(order))
        rows = compare.intervals(compare.load_workdir(d, minimum=1)) if done else []
        intervals = {r["method"]: (r["ci_low"], r["ci_high"]) for r in rows if r["metric"] == "op"}
        print(f"Order {order} ({', '.join(tasks)}):\n")
        print("| method | ROUGE-L OP [95% interval] | BWT | learned | exact match | time (train + eval) |\n"
              "|---|---|---|---|---|---|")
        for method in METHODS:
            print(method_row(d, method, intervals))
        print()
        diffs[order] = differences(d) if done else {}
        per_task[order] = per_task_rows(d, tasks)
    orders = list(diffs)
    print("| difference | order | OP [95% interval] | resolved | BWT [95% interval] | resolved |\n"
          "|---|---|---|---|---|---|")
    for pair in PAIRS:
        for order in orders:
            if pair in diffs[order]:
                op, op_resolved = difference(diffs[order][pair].get("op"))
                bwt, bwt_resolved = difference(diffs[order][pair].get("bwt"))
                print(f"| {NAMES[pair[0]]} - {NAMES[pair[1]]} | {order} | {op} | {op_resolved} | {bwt} | "
                      f"{bwt_resolved} |")
    print("\n| comparison | verdict (ROUGE-L OP, both orders) |\n|---|---|")
    for method, baseline in PAIRS:
        rows = [diffs[o].get((method, baseline), {}).get("op") for o in orders]
        print(f"| {NAMES[method]} vs {NAMES[baseline]} | {verdict(method, baseline, rows)} |")
    for order, rows in per_task.items():
        print(f"\nOrder {order}, each task's ROUGE-L right after learning it → after the last task (%):\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
