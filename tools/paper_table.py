"""The README's seven-method tables in the layout of the Recurrent-KIF paper's Table 1, from committed runs.

    python tools/paper_table.py results/smollm2_o4 results/smollm2_o5

Each directory holds `<method>/results.json` and `<method>/predictions.jsonl` (tools/collect_run.py). Prints
markdown, per order: each method's OP with its 95% bootstrap interval, BWT, Avg, learned accuracy (%), its time
(results.json: training + evaluation, including the tasks a run took from another order's checkpoint), and the
paper's T5-large figures beside it (Standard benchmark, mean of three orders); a method that has not finished
in the directory is listed as such. Then Recurrent-KIF's paired OP and BWT differences from every other
finished method, with 95% intervals (kif_jax.compare: test examples resampled within each task, 10,000
resamples, seed 0), and the verdict of the committed rule: a method beats another when the interval of the OP
difference excludes 0, on the same side, in both orders. The same rule between every two sequential baselines
(MTL aside), beside the paper's difference where it reports both: where the ordering matches the paper's.
Last, per order, every finished method's score on each task right after learning it and after the last task
(what it keeps and what it loses).
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # kif_jax from this checkout

METHODS = ("seq_lora", "replay", "ewc", "o_lora", "tasl", "migu", "recurrent_kif", "mtl")
NAMES = {"seq_lora": "SeqLoRA", "replay": "Replay", "ewc": "EWC", "o_lora": "O-LoRA", "tasl": "TaSL",
         "migu": "MIGU", "recurrent_kif": "Recurrent-KIF", "mtl": "MTL"}
# The Recurrent-KIF paper's Table 1, Standard benchmark, T5-large, mean of three orders: (OP, BWT); None: not
# reported (MIGU's and MTL's BWT) or not in the table (Replay, EWC).
PAPER = {"seq_lora": (43.7, -50.4), "o_lora": (75.8, -3.8), "tasl": (76.3, -4.0), "migu": (76.6, None),
         "recurrent_kif": (78.4, -2.8), "mtl": (80.3, None)}
KIF = "recurrent_kif"


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def paper(method: str) -> tuple[str, str]:
    op, bwt = PAPER.get(method, (None, None))
    return ("-" if op is None else f"{op:.1f}"), ("-" if bwt is None else f"{bwt:.1f}")


def finished(directory: pathlib.Path) -> list[str]:
    return [m for m in METHODS if (directory / m / "results.json").exists()]


def method_row(directory: pathlib.Path, method: str, intervals: dict) -> str:
    """One row of an order's table."""
    paper_op, paper_bwt = paper(method)
    if method not in intervals:
        return f"| {NAMES[method]} | not finished | | | | | {paper_op} | {paper_bwt} |"
    r = json.loads((directory / method / "results.json").read_text())
    diagonal = [v for v in r.get("learned_accuracy") or [] if v is not None]
    learned = sum(diagonal) / len(diagonal) if len(diagonal) == len(r["tasks"]) else None
    lo, hi = intervals[method]
    time = f"{r['timing']['train_s'] / 60:.0f} + {r['timing']['eval_s'] / 60:.0f} min"
    return (f"| {NAMES[method]} | {pct(r['op'])} [{pct(lo)}, {pct(hi)}] | {pct(r.get('bwt'))} | {pct(r.get('avg'))} | "
            f"{pct(learned)} | {time} | {paper_op} | {paper_bwt} |")


def per_task_rows(directory: pathlib.Path, tasks: list[str]) -> list[str]:
    """Markdown rows: each finished method's "learned -> final" score (%) on every task (MTL: final only)."""
    rows = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for method in finished(directory):
        r = json.loads((directory / method / "results.json").read_text())
        learned = r.get("learned_accuracy") or [None] * len(tasks)
        cells = [pct(final) if method == "mtl" or first is None else f"{pct(first)} → {pct(final)}"
                 for first, final in zip(learned, r["final_accuracy"])]
        rows.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    return rows


def differences(directory: pathlib.Path) -> dict[tuple[str, str], dict[str, dict]]:
    """{(method, other): {"op"/"bwt": method minus other, with its interval}} over every pair of finished methods."""
    from kif_jax import compare

    methods = compare.load_workdir(directory, minimum=1)
    out = {}
    for other in (m.name for m in methods):
        for r in compare.compare(methods, other, resamples=10_000):
            if r["metric"] in ("op", "bwt"):
                out.setdefault((r["method"], other), {})[r["metric"]] = r
    return out


def difference(row: dict | None) -> tuple[str, str]:
    if row is None:
        return "-", "-"
    lo, hi = row["ci_low"], row["ci_high"]
    return (f"{100 * row['estimate']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
            "yes" if lo > 0 or hi < 0 else "no")


def verdict_between(first: str, second: str, per_order: list[dict | None]) -> str:
    """The committed rule (kif_jax.compare.across_orders) on `first` minus `second`, in words."""
    from kif_jax import compare

    return {"unfinished": "not finished in every order", "method": f"{first} beats {second}",
            "baseline": f"{second} beats {first}", "unresolved": "unresolved"}[compare.across_orders(per_order)]


def verdict(per_order: list[dict | None]) -> str:
    """The committed rule (kif_jax.compare.across_orders) on the OP rows of orders 4 and 5."""
    from kif_jax import compare

    return {"unfinished": "not finished in every order", "method": "Recurrent-KIF beats it",
            "baseline": "it beats Recurrent-KIF", "unresolved": "unresolved"}[compare.across_orders(per_order)]


def print_baseline_pairs(diffs: dict[str, dict], ops: dict[str, dict[str, float]]) -> None:
    """The same rule between every two sequential baselines finished in every order, each pair led by the one with
    the higher mean OP; the paper's difference where it reports both."""
    orders = list(diffs)
    baselines = [m for m in METHODS if m not in (KIF, "mtl") and all(m in ops[o] for o in orders)]
    if len(baselines) < 2:
        return
    mean_op = {m: sum(ops[o][m] for o in orders) / len(orders) for m in baselines}
    ranked = sorted(baselines, key=lambda m: -mean_op[m])
    print(f"\n| between the baselines | {' | '.join(f'order {o}' for o in orders)} | verdict (OP, both orders) "
          f"| paper |\n|---{'|---' * len(orders)}|---|---|")
    for i, first in enumerate(ranked):
        for second in ranked[i + 1:]:
            rows = [diffs[o].get((first, second), {}).get("op") for o in orders]
            cells = " | ".join(difference(r)[0] for r in rows)
            said = verdict_between(NAMES[first], NAMES[second], rows)
            a, b = PAPER.get(first, (None,))[0], PAPER.get(second, (None,))[0]
            paper_gap = "-" if a is None or b is None else f"{a - b:+.1f}"
            print(f"| {NAMES[first]} − {NAMES[second]} | {cells} | {said} | {paper_gap} |")


def main(dirs) -> None:
    from kif_jax import compare

    dirs = [pathlib.Path(d) for d in dirs]
    diffs, per_task, ops = {}, {}, {}
    for d in dirs:
        order = d.name.rsplit("_o", 1)[-1]
        done = finished(d)
        ops[order] = {m: json.loads((d / m / "results.json").read_text())["op"] for m in done}
        tasks = json.loads((d / done[0] / "results.json").read_text())["tasks"] if done else []
        rows = compare.intervals(compare.load_workdir(d, minimum=1)) if done else []
        intervals = {r["method"]: (r["ci_low"], r["ci_high"]) for r in rows if r["metric"] == "op"}
        print(f"Order {order} ({', '.join(tasks)}):\n")
        print("| method | OP [95% interval] | BWT | Avg | learned | time (train + eval) | paper OP | paper BWT |\n"
              "|---|---|---|---|---|---|---|---|")
        for method in METHODS:
            print(method_row(d, method, intervals))
        print()
        diffs[order] = differences(d)
        per_task[order] = per_task_rows(d, tasks) if done else []
    orders = list(diffs)
    print("| Recurrent-KIF vs | order | OP difference [95% interval] | resolved | BWT difference [95% interval] "
          "| resolved |\n|---|---|---|---|---|---|")
    for other in (m for m in METHODS if m != KIF):
        for order in orders:
            if (KIF, other) in diffs[order]:
                op, op_resolved = difference(diffs[order][KIF, other].get("op"))
                bwt, bwt_resolved = difference(diffs[order][KIF, other].get("bwt"))
                print(f"| {NAMES[other]} | {order} | {op} | {op_resolved} | {bwt} | {bwt_resolved} |")
    print("\n| Recurrent-KIF vs | verdict (OP, both orders) |\n|---|---|")
    for other in (m for m in METHODS if m != KIF):
        print(f"| {NAMES[other]} | {verdict([diffs[o].get((KIF, other), {}).get('op') for o in orders])} |")
    print_baseline_pairs(diffs, ops)
    for order, rows in per_task.items():
        print(f"\nOrder {order}, each task's accuracy right after learning it → after the last task "
              "(%; MTL: after its one joint phase):\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
