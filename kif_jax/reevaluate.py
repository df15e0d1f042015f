"""Re-evaluate a finished run's checkpoint with today's code and compare with the predictions it recorded.

    python -m kif_jax.reevaluate WORKDIR/METHOD [--after_task N] [--tasks a,b] [--data_dir DIR]

The run's config comes from its results.json; the parameters from its task-end checkpoint of task N (1-based;
default: the last, which needs `checkpoint.keep_task_ends` or an untouched final checkpoint); the row's tasks
(or those named) are evaluated as the run evaluated them, and each example's prediction and score are compared
with the record in predictions.jsonl. Nothing is written. One line a task, then a verdict; exit status 0 when
every prediction and score is the recorded one, 1 when any differs, 2 on bad input.

What it is for: a change to the model, decoding or evaluation code that should not move any result (a faster
kernel, another cache layout) proves it on a real run in minutes instead of retraining it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

import ml_collections

from kif_jax.errors import ConfigError, DataError, KifError

# The fields an evaluation record is compared on (others, such as the label or id, come from the data).
COMPARED = ("prediction", "score", "correct")


def run_config(stored: dict, *, data_dir: str | None = None) -> ml_collections.ConfigDict:
    """The run's config: today's defaults, overwritten by every field results.json recorded (a renamed field under
    its new name)."""
    from kif_jax.config import RENAMED_FIELDS, base_config, with_method_sections

    config = base_config()
    config.methods = stored.get("methods", config.methods)
    config = with_method_sections(config)

    def fields(values: dict, prefix: str = ""):
        for key, value in values.items():
            if isinstance(value, dict):
                yield from fields(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for name, value in fields(stored):
        *sections, leaf = RENAMED_FIELDS.get(name, name).split(".")
        target = config
        for section in sections:
            target = target.get(section) if isinstance(target, ml_collections.ConfigDict) else None
        if not isinstance(target, ml_collections.ConfigDict) or leaf not in target:
            raise ConfigError(f"results.json's config has field '{name}', which this kif_jax does not know")
        target[leaf] = tuple(value) if isinstance(target[leaf], tuple) else value
    if data_dir is not None:
        config.data_dir = data_dir
    return config


def recorded_predictions(path: pathlib.Path, after_task: int) -> dict[str, list[dict]]:
    """predictions.jsonl's records of one evaluation row, by task, in order."""
    rows: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["after_task"] == after_task:
                rows.setdefault(record["task"], []).append(record)
    return rows


def differences(now: list[dict], then: list[dict]) -> list[str]:
    """One line per example whose compared fields differ (and one for a different count)."""
    lines = [] if len(now) == len(then) else [f"{len(now)} examples now, {len(then)} recorded"]
    for a, b in zip(now, then):
        changed = [k for k in COMPARED if k in b and a.get(k) != b[k]]
        if changed or a.get("id") != b.get("id"):
            lines.append(f"example {b.get('id', b.get('index'))}: " + ", ".join(
                f"{k} {b[k]!r} -> {a.get(k)!r}" for k in (changed or ["id"])))
    return lines


def reevaluate(method_dir: pathlib.Path, *, after_task: int | None = None, tasks: Sequence[str] = (),
               data_dir: str | None = None) -> list[tuple[str, int, list[str], float, float]]:
    """Rows (task, examples, difference lines, score now, score recorded) of one re-evaluation."""
    import numpy as np

    from kif_jax.checkpointing import RunCheckpointer, config_fingerprint
    from kif_jax.errors import CheckpointError
    from kif_jax.methods import method_class, unrelated_sections
    from kif_jax.sharding import shard_tree
    from kif_jax.train.loop import MethodRun, build_context, check_run, eval_columns, resolve_run
    from kif_jax.train.position import ResumePosition

    results_path = method_dir / "results.json"
    if not results_path.is_file():
        raise DataError(f"{results_path} not found: give the directory of a finished method (WORKDIR/METHOD)")
    result = json.loads(results_path.read_text())
    config = run_config(result["config"], data_dir=data_dir)
    config.methods = result["method"]
    run_tasks = check_run(config)
    method = method_class(result["method"])(config)
    phases = method.phases(run_tasks)
    phase = len(phases) - 1 if after_task is None else after_task - 1
    if not 0 <= phase < len(phases):
        raise ConfigError(f"--after_task {after_task}: the run has tasks 1 to {len(phases)}")
    columns = [run_tasks[j] for j in eval_columns(config, phases, phase)]
    unknown = [t for t in tasks if t not in columns]
    if unknown:
        raise ConfigError(f"--tasks: {', '.join(unknown)} not evaluated after task {phase + 1} "
                          f"({', '.join(columns)})")
    position = ResumePosition(phase + 1)
    missing = CheckpointError(f"{method_dir}/checkpoints has no checkpoint of the end of task {phase + 1} "
                              f"(id {position.checkpoint_id}); runs keep them with checkpoint.keep_task_ends")
    if not (method_dir / "checkpoints").is_dir():
        raise missing
    leave_out = unrelated_sections(config, type(method))
    ckpt = RunCheckpointer.reader(method_dir / "checkpoints",
                                  fingerprint=config_fingerprint(config, leave_out=leave_out),
                                  also_accept=[config_fingerprint(config)])
    try:
        if not ckpt.has(position.checkpoint_id):
            raise missing
        ckpt.restore_meta(position.checkpoint_id)  # refuses a checkpoint of another config
        data_dir_path, _ = resolve_run(config, method_dir.parent, generate=False)
        ctx = build_context(config, method_dir.parent, data_dir_path, run_tasks)
        run = MethodRun(ctx, method)
        state = ckpt.restore_state(position.checkpoint_id,
                                   shard_tree(run.fresh_state(phase, ctx.init_params, 0), ctx.mesh))
    finally:
        ckpt.close()
    params = method.eval_params(state)
    recorded = recorded_predictions(method_dir / "predictions.jsonl", phase)
    row = result["accuracy_matrix"][sum(len(p) for p in phases[:phase + 1]) - 1]  # that of the phase's last task
    rows = []
    for task in tasks or columns:
        score, records = ctx.evaluate(params, task)
        then = recorded.get(task, [])
        cell = row[ctx.tasks.index(task)]
        rows.append((task, len(records), differences(records, then), score, np.nan if cell is None else float(cell)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kif_jax.reevaluate", description=__doc__.splitlines()[0])
    parser.add_argument("method_dir", type=pathlib.Path, help="a finished method's directory: WORKDIR/METHOD")
    parser.add_argument("--after_task", type=int, default=None, help="the row: after task N (1-based; default last)")
    parser.add_argument("--tasks", default="", help="comma-separated tasks of that row (default: all of them)")
    parser.add_argument("--data_dir", default=None, help="where the run's data is now, if it moved")
    args = parser.parse_args(argv)
    try:
        rows = reevaluate(args.method_dir, after_task=args.after_task,
                          tasks=[t for t in args.tasks.split(",") if t], data_dir=args.data_dir)
    except KifError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    changed = 0
    for task, n, lines, now, then in rows:
        same = "identical" if not lines else f"{len(lines)} differ"
        print(f"{task}: {n} examples, {same}; score {100 * now:.2f} (recorded {100 * then:.2f})")
        for line in lines[:5]:
            print(f"    {line}")
        changed += bool(lines)
    total = sum(n for _, n, _, _, _ in rows)
    print(f"{total} predictions of {len(rows)} task(s): "
          + ("every prediction and score is the recorded one" if not changed else f"{changed} task(s) differ"))
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
