"""Orbax checkpoints of a method's run: the training state, plus JSON metadata (position, results, config).

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed at any moment leaves the previous checkpoints intact; the manager keeps the last `keep` and
removes unfinished temporary directories when it opens. A resumed run takes the newest intact
checkpoint: an unreadable one is set aside (into `<directory>.unreadable/`) with one warning line.

In multi-process runs every process calls save and restore with the same arguments: Orbax writes each
process's shards of the state and process 0 the metadata into the one (shared) directory, and
restores each process's shards straight into the state's shardings.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Callable, Iterable

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from kif_jax.config import RENAMED_FIELDS
from kif_jax.errors import CheckpointError

# Fields that may change between a run and its resumption without changing its results.
_NOT_FINGERPRINTED = ("checkpoint", "sharding", "methods", "eval.batch_size")
# Fields added after runs were made, with the value that gives those runs' results: at that value they are left
# out of the fingerprint, so checkpoints written before the field existed still resume and serve as prefixes.
_ADDED_WITH_DEFAULT = {"task_format": "", "eval.schedule": "full"}
# Fields that moved (kif_jax.config.RENAMED_FIELDS) are hashed under their old names. Every method read the section
# that held them (`kif.inner_steps`, `kif.memory_ratio`), so every method's fingerprint keeps that section whole:
# checkpoints written before the move, with the same settings, still resume.
_SECTIONS_OF_RENAMED = frozenset(old.partition(".")[0] for old in RENAMED_FIELDS)
# The layout of the training state a checkpoint holds. 2: every method's own state under `TrainState.method`
# (kif_jax/methods/); checkpoints without the field were written before (layout 1) and are refused.
STATE_LAYOUT = 2
# Checkpoint ids of task ends are its multiples (kif_jax.train.position.ResumePosition.PHASE_STRIDE).
TASK_END_STRIDE = 10_000_000


def config_fingerprint(config: ml_collections.ConfigDict, leave_out: Iterable[str] = ()) -> str:
    """A hash of every field that affects results, to refuse resuming under a different config; `leave_out`:
    further fields or sections the run does not read (other methods' sections)."""
    flat = json.loads(config.to_json_best_effort())
    added = [name for name, default in _ADDED_WITH_DEFAULT.items() if _field(flat, name) == default]
    kept = [name for name in leave_out if name not in _SECTIONS_OF_RENAMED]
    for name in (*_NOT_FINGERPRINTED, *kept, *added):
        _pop(flat, name)
    for old, new in RENAMED_FIELDS.items():
        value = _pop(flat, new)
        if value is not _ABSENT:
            section, _, leaf = old.rpartition(".")
            flat.setdefault(section, {})[leaf] = value
        new_section = new.rpartition(".")[0]
        if flat.get(new_section) == {}:
            del flat[new_section]
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


_ABSENT = object()


def _pop(flat: dict, name: str) -> Any:
    """Remove the dotted field `name` from the nested dict `flat`; its value, or _ABSENT."""
    node = flat
    *parents, leaf = name.split(".")
    for parent in parents:
        node = node.get(parent, {})
    return node.pop(leaf, _ABSENT)


def _field(flat: dict, name: str) -> Any:
    node: Any = flat
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class RunCheckpointer:
    """Save and restore (state, metadata) pairs under one directory, checking the config fingerprint."""

    def __init__(self, directory: pathlib.Path, *, keep: int, fingerprint: str, also_accept: Iterable[str] = (),
                 keep_task_ends: bool = False, read_only: bool = False) -> None:
        self.directory = pathlib.Path(directory).absolute()
        self.fingerprint = fingerprint
        # Fingerprints of the same config as earlier versions computed them (the whole config): still resumable.
        self.accepted = {fingerprint, *also_accept}
        # Task-end checkpoint ids are the multiples of the phase stride (kif_jax/train/position.py).
        if read_only:  # restores only, and leaves a running run's unfinished saves alone
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                                   enable_async_checkpointing=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                                   cleanup_tmp_directories=True,
                                                   keep_period=TASK_END_STRIDE if keep_task_ends else None)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @classmethod
    def reader(cls, directory: pathlib.Path, *, fingerprint: str, also_accept: Iterable[str] = ()) -> "RunCheckpointer":
        """A checkpointer that only restores (no retention settings apply)."""
        return cls(directory, keep=0, fingerprint=fingerprint, also_accept=also_accept, read_only=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def has(self, step: int) -> bool:
        return step in self.manager.all_steps()

    def restore_latest(self, like_fn: Callable[[dict], Any]) -> tuple[int, dict, Any] | None:
        """The newest intact checkpoint as (step, metadata, state), or None when there is none yet.

        `like_fn(meta)` gives the state's structure. An unreadable checkpoint is set aside with one
        warning line and the next older one is tried; a readable one from another config is refused.
        """
        unreadable: dict[int, str] = {}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.restore_meta(step)
                state = self.restore_state(step, like_fn(meta))
            except _Unreadable as err:
                unreadable[step] = err.cause
                continue
            if unreadable:
                aside = self._set_aside(list(unreadable))
                for bad, cause in unreadable.items():
                    logging.warning("checkpoint %s/%d is unreadable (%s): moved to %s; resuming from checkpoint %d",
                                    self.directory, bad, cause, aside, step)
            return step, meta, state
        if unreadable:
            listed = ", ".join(f"{step} ({cause})" for step, cause in unreadable.items())
            raise CheckpointError(f"no intact checkpoint in {self.directory}: {listed} unreadable; "
                                  "delete the directory to start this method over")
        return None

    def _set_aside(self, steps: list[int]) -> pathlib.Path:
        """Move unreadable checkpoints out of the manager's directory, so new saves can reuse their ids."""
        aside = self.directory.with_name(self.directory.name + ".unreadable")
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                target, n = aside / str(step), 1
                while target.exists():
                    target, n = aside / f"{step}.{n}", n + 1
                (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("kif_jax_set_aside_checkpoints")
        self.manager.reload()
        return aside

    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = dict(meta, config_fingerprint=self.fingerprint, state_layout=STATE_LAYOUT)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        """The metadata of checkpoint `step`; refuses a checkpoint written under another config."""
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as exc:  # orbax raises many types for unreadable files
            raise _Unreadable(f"checkpoint {self.directory}/{step} is unreadable ({type(exc).__name__})",
                              cause=type(exc).__name__) from exc
        layout = meta.get("state_layout", 1)
        if layout != STATE_LAYOUT:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} holds a training state of layout {layout}, written by an "
                f"earlier kif_jax; this one reads layout {STATE_LAYOUT} (each method's state apart): delete "
                f"{self.directory} to start this method over, or use another --workdir")
        if meta.get("config_fingerprint") not in self.accepted:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} was written under a different config; "
                "use another --workdir or the original config")
        return meta

    def restore_state(self, step: int, like: Any) -> Any:
        """The state of checkpoint `step`, with the structure, dtypes and shardings of `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as exc:
            cause = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            raise _Unreadable(f"checkpoint {self.directory}/{step} is unreadable or does not match the model "
                              f"({cause})", cause=cause) from exc
        return restored["state"]

    def close(self) -> None:
        self.manager.close()


class _Unreadable(CheckpointError):
    """A checkpoint that cannot be read (corrupt, partial, or of another state structure)."""

    def __init__(self, message: str, *, cause: str) -> None:
        super().__init__(message)
        self.cause = cause
