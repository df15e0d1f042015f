"""Copy a run's finished methods into results/ and recompute its comparisons (what the README's SmolLM2 tables read).

    python tools/collect_run.py ~/runs/smollm2/o5 results/smollm2_o5 --log ~/runs/smollm2/o5.log

For every finished method of the workdir (one with results.json): its results.json, predictions.jsonl and
metrics.jsonl into DEST/<method>/; the progress log into DEST/run.log (give --log only for the run whose
evaluation times tools/smollm2_table.py reads); then DEST/report/ is rebuilt over every method in DEST by
`python -m kif_jax.compare DEST` and, with Replay among several methods, `... --baseline replay`. Checkpoints
and figures stay behind. Then `python tools/smollm2_table.py DEST` prints the README's rows.
"""
import argparse
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # kif_jax from this checkout

FILES = ("results.json", "predictions.jsonl", "metrics.jsonl")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=pathlib.Path, help="the run's --workdir")
    parser.add_argument("dest", type=pathlib.Path, help="the results/ directory of the order")
    parser.add_argument("--log", type=pathlib.Path, help="main.py's progress log of the run (evaluation times)")
    args = parser.parse_args(argv)
    from kif_jax import compare

    finished = sorted(p.parent.name for p in args.workdir.glob("*/results.json"))
    if not finished:
        print(f"error: no finished method in {args.workdir}", file=sys.stderr)
        return 2
    for method in finished:
        (args.dest / method).mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copyfile(args.workdir / method / name, args.dest / method / name)
    if args.log:
        shutil.copyfile(args.log, args.dest / "run.log")
    shutil.rmtree(args.dest / "report", ignore_errors=True)  # rows of a baseline no longer present go too
    status = compare.main([str(args.dest)])
    collected = sorted(p.parent.name for p in args.dest.glob("*/results.json"))  # this run's and earlier ones
    if status == 0 and "replay" in collected and len(collected) > 1:
        status = compare.main([str(args.dest), "--baseline", "replay"])
    print(f"\ncollected {', '.join(finished)} into {args.dest}")
    return status


if __name__ == "__main__":
    sys.exit(main())
