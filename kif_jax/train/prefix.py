"""Starting a method's run from another run's finished tasks (`checkpoint.prefix_from`).

Two task orders that begin with the same tasks train those tasks identically (the data order, dropout
keys and method state of task i derive from the seed and i, and the memory buffer from the seed and
the task's name). A run of the second order may therefore take the first run's checkpoint at the end
of the longest shared prefix, with the metrics and predictions records written up to it, and train
only the tasks that differ. Its records are then those of an uninterrupted run, byte for byte
(tests/test_prefix.py checks it).

The prefix is refused, with one line, unless its run had the same config in every field that affects
results (seed included; the task order, and other methods' sections, aside), the same method and the
same tasks in the prefix, and evaluated only seen tasks (`eval.all_tasks = False`: otherwise its
records would include the tasks that differ).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from kif_jax.checkpointing import RunCheckpointer, config_fingerprint
from kif_jax.distributed import is_main
from kif_jax.errors import ConfigError
from kif_jax.train.position import ResumePosition
from kif_jax.train.progress import note

FIELD = "checkpoint.prefix_from"
# Fields a prefix's run may differ in: which tasks follow the prefix (checked apart, task by task).
ORDER_FIELDS = ("benchmark", "order", "tasks")


def prefix_fingerprint(config: ml_collections.ConfigDict, leave_out: Sequence[str]) -> str:
    """The fingerprint two runs must share for one to start from the other's finished tasks."""
    return config_fingerprint(config, leave_out=(*leave_out, *ORDER_FIELDS))


def _read_meta(directory: pathlib.Path, step: int) -> dict:
    # The metadata is the JSON item Orbax writes beside the state: read it as a file, so the source run's
    # directory is never opened by a checkpoint manager (which may tidy it).
    path = directory / str(step) / "meta" / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config field '{FIELD}': checkpoint {directory / str(step)} is unreadable "
                          f"({type(exc).__name__})") from exc


def _task_end_steps(directory: pathlib.Path) -> list[int]:
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()] if directory.is_dir() else []
    return sorted((s for s in steps if s % ResumePosition.PHASE_STRIDE == 0 and s > 0), reverse=True)


def _copy_prefix_bytes(source: pathlib.Path, target: pathlib.Path, size: int) -> None:
    """The first `size` bytes of `source` (the records up to the prefix's end) as `target`."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        data = src.read(size)
        if len(data) != size:
            raise ConfigError(f"config field '{FIELD}': {source} is shorter ({len(data)} bytes) than its checkpoint "
                              f"records ({size}); it was changed after the run")
        dst.write(data)


@dataclasses.dataclass(frozen=True)
class Prefix:
    """The finished tasks a method's run takes from another run: its checkpoint and metadata there."""

    source: pathlib.Path  # <prefix run>/<method>
    step: int  # the checkpoint id of the last shared task's end
    done: int  # phases finished there
    meta: dict
    tasks: list[str]  # the shared tasks


def _own_checkpoints(directory: pathlib.Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def plan_prefix(config: ml_collections.ConfigDict, *, method_name: str, tasks: list[str], phases: list[list[str]],
                phases_of: Callable[[list[str]], list[list[str]]], run_dir: pathlib.Path,
                fingerprint: str) -> Prefix | None:
    """The prefix a method's run starts from (None: `checkpoint.prefix_from` unset, or the run has checkpoints of
    its own, which come first). Reads only JSON files, so a bad prefix is refused before any model loads.

    `phases_of(tasks)`: the method's phases of a task list; `fingerprint`: `prefix_fingerprint` of this run.
    """
    if not config.checkpoint.prefix_from or _own_checkpoints(run_dir / "checkpoints"):
        return None
    source = pathlib.Path(config.checkpoint.prefix_from) / method_name
    directory = source / "checkpoints"
    steps = _task_end_steps(directory)
    if not steps:
        raise ConfigError(f"config field '{FIELD}': {directory} holds no finished task of method "
                          f"'{method_name}' to start from")
    if config.eval.all_tasks:
        raise ConfigError(f"config field '{FIELD}' needs eval.all_tasks = False: with it a run also evaluates "
                          "the tasks that differ between the orders, so its records cannot be shared")
    for step in steps:
        meta = _read_meta(directory, step)
        if "prefix_fingerprint" not in meta:
            raise ConfigError(f"config field '{FIELD}': checkpoint {directory / str(step)} was written by an earlier "
                              "kif_jax, which did not record its config's prefix fingerprint; rerun that order")
        if meta["prefix_fingerprint"] != fingerprint:
            raise ConfigError(f"config field '{FIELD}': {source} ran under a different config (seed or settings "
                              "differ, the task order aside); its tasks cannot be reused")
        done = meta["phase"]
        source_phases = phases_of(list(meta["tasks"]))
        # Under eval.schedule = "diagonal" a run's last row is whole and the others hold their own tasks only: a
        # prefix then ends before the last phase of both runs.
        diagonal = config.eval.schedule == "diagonal"
        if diagonal and (done >= len(phases) or done >= len(source_phases)):
            continue
        if 0 < done <= len(phases) and source_phases[:done] == phases[:done]:
            break
    else:
        raise ConfigError(f"config field '{FIELD}': {source}'s task order ({','.join(meta['tasks'])}) does not begin "
                          f"with this run's first task ({','.join(phases[0])}); nothing to reuse")
    seen = sum(len(p) for p in phases[:done])
    R = np.array([[np.nan if v is None else v for v in row] for row in meta["R"]], dtype=float)
    R[:seen, :seen] = np.nan
    if not np.all(np.isnan(R)):
        raise ConfigError(f"config field '{FIELD}': {source} evaluated tasks beyond its first {seen}; "
                          "its records cannot be shared")
    return Prefix(source=source, step=step, done=done, meta=meta, tasks=[t for p in phases[:done] for t in p])


def adopt_prefix(prefix: Prefix, *, tasks: list[str], run_dir: pathlib.Path, ckpt: RunCheckpointer,
                 like_fn: Callable[[int], Any]) -> None:
    """Seed the run's empty `ckpt` and its record files with the prefix: the source's task-end checkpoint
    (its accuracy matrix re-laid for this run's tasks) and its records up to that checkpoint.

    `like_fn(phase)`: the state template of finished phase `phase` (its task-end checkpoint's structure).
    """
    meta, seen = prefix.meta, len(prefix.tasks)
    R_source = np.array([[np.nan if v is None else v for v in row] for row in meta["R"]], dtype=float)
    R = np.full((len(tasks), len(tasks)), np.nan)
    R[:seen, :seen] = R_source[:seen, :seen]
    state = restore_source_state(prefix.source / "checkpoints", prefix.step, like_fn(prefix.done - 1))
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        _copy_prefix_bytes(prefix.source / "metrics.jsonl", run_dir / "metrics.jsonl", meta["metrics_offset"])
        _copy_prefix_bytes(prefix.source / "predictions.jsonl", run_dir / "predictions.jsonl",
                           meta["predictions_offset"])
    own = {k: v for k, v in meta.items() if k not in ("config_fingerprint", "state_layout")}
    own.update(R=[[None if math.isnan(v) else float(v) for v in row] for row in R], tasks=list(tasks), wandb_id=None,
               prefix_from={"run": str(prefix.source.parent.absolute()), "checkpoint": prefix.step,
                            "tasks": prefix.tasks})
    ckpt.save(prefix.step, state, own)
    note(f"{meta['method']}: starts after task {prefix.done} from {prefix.source} (its first {seen} task(s), "
         f"{','.join(prefix.tasks)}, are this order's)")


def restore_source_state(directory: pathlib.Path, step: int, like: Any) -> Any:
    """The state of the source run's checkpoint `step`, read without writing to its directory."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as exc:  # orbax raises many types for unreadable files
            raise ConfigError(f"config field '{FIELD}': checkpoint {directory / str(step)} is unreadable or does not "
                              f"match the model ({type(exc).__name__})") from exc
    return restored["state"]
