"""Orbax checkpoints of a method's run: the training state, plus JSON metadata (position, results, config).

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed at any moment leaves the previous checkpoints intact; the manager keeps the last `keep`.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from kif_jax.errors import CheckpointError

# Fields that may change between a run and its resumption without changing its results.
_NOT_FINGERPRINTED = ("checkpoint", "sharding", "methods", "eval.batch_size")


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
    """A hash of every field that affects results, to refuse resuming under a different config."""
    flat = json.loads(config.to_json_best_effort())
    for name in _NOT_FINGERPRINTED:
        node = flat
        *parents, leaf = name.split(".")
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


class RunCheckpointer:
    """Save and restore (state, metadata) pairs under one directory, checking the config fingerprint."""

    def __init__(self, directory: pathlib.Path, *, keep: int, fingerprint: str) -> None:
        self.directory = pathlib.Path(directory).absolute()
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = dict(meta, config_fingerprint=self.fingerprint)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        """The metadata of checkpoint `step`; refuses a checkpoint written under another config."""
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as exc:  # orbax raises many types for unreadable files
            raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable ({type(exc).__name__}); "
                                  "delete it to restart from the previous one") from exc
        if meta.get("config_fingerprint") != self.fingerprint:
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
            raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable or does not match the "
                                  f"model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
        return restored["state"]

    def close(self) -> None:
        self.manager.close()
