"""The README's SmolLM2 table from committed runs: each order's results.json files and the paired comparisons.

    python tools/smollm2_table.py results/smollm2_o4 results/smollm2_o5

Each directory holds `<method>/results.json` and `<method>/predictions.jsonl`; `python -m kif_jax.compare DIR`
and `python -m kif_jax.compare DIR --baseline replay` are run first (they write DIR/report/). Prints markdown:
per order and method, OP / BWT / Avg / learned accuracy (%), then each difference from SeqLoRA and from Replay
with its 95% interval (points), marked resolved where the interval excludes 0.
"""
import json
import pathlib
import sys

METRICS = ("op", "bwt", "avg", "learned")
ORDER = ("seq_lora", "replay", "recurrent_kif", "mtl", "migu")


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def rows_of(directory: pathlib.Path, baseline: str) -> dict:
    path = directory / "report" / "paired_comparison.json"
    if not path.exists():
        return {}
    return {(r["method"], r["metric"]): r for r in json.loads(path.read_text())
            if r["metric"] in METRICS and r["baseline"] == baseline}


def main(dirs):
    print("| order | method | OP | BWT | Avg | learned |\n|---|---|---|---|---|---|")
    diffs = []
    for d in map(pathlib.Path, dirs):
        order = d.name.rsplit("_o", 1)[-1]
        methods = sorted((p.parent.name for p in d.glob("*/results.json")),
                         key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
        for m in methods:
            r = json.loads((d / m / "results.json").read_text())
            diagonal = [v for v in r.get("learned_accuracy") or [] if v is not None]
            learned = sum(diagonal) / len(diagonal) if len(diagonal) == len(r["tasks"]) else None
            print(f"| {order} | {m} | {pct(r['op'])} | {pct(r.get('bwt'))} | {pct(r.get('avg'))} | {pct(learned)} |")
        for baseline in ("seq_lora", "replay"):
            for (m, metric), row in rows_of(d, baseline).items():
                diffs.append((order, m, baseline, metric, row))
    print("\n| order | method | vs | metric | difference | 95% interval | resolved |\n|---|---|---|---|---|---|---|")
    for order, m, baseline, metric, row in diffs:
        lo, hi = row["ci_low"], row["ci_high"]
        resolved = "yes" if lo > 0 or hi < 0 else "no"
        print(f"| {order} | {m} | {baseline} | {metric} | {100 * row['estimate']:+.1f} | "
              f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {resolved} |")


if __name__ == "__main__":
    main(sys.argv[1:])
