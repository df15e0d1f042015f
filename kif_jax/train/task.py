"""What a method's host hooks see of the task being trained (kif_jax/methods/base.py: `task`)."""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from kif_jax.distributed import fetch
from kif_jax.run_files import MetricsWriter
from kif_jax.train.data import RunData, common_shape, stack_batches
from kif_jax.train.steps import Programs


@dataclasses.dataclass
class TaskContext:
    """One training phase of one method: its data, the programs, and the run's records."""

    method: str
    phase: int
    phases: list[list[str]]
    config: ml_collections.ConfigDict
    data: RunData
    programs: Programs
    frozen: Any
    init_params: Any  # the model's trainable parameters as loaded (before any task)
    mesh: Any
    writer: MetricsWriter
    train_set: Any = None  # the phase's tokenized training set
    steps: int = 0  # the phase's optimizer steps

    @property
    def earlier_tasks(self) -> list[str]:
        """The tasks of the phases before this one, in order."""
        return [t for p in self.phases[:self.phase] for t in p]

    def head(self) -> dict:
        """The fields every record of this phase starts with."""
        return {"method": self.method, "phase": self.phase}

    def stack(self, batches: list[dict]) -> dict:
        """Host batches padded to one shape and stacked [n, A, mb, L] on the mesh."""
        return stack_batches(batches, *common_shape(batches), micro_batch_size=self.config.train.micro_batch_size,
                             mesh=self.mesh)

    def run(self, program: Any, state: Any, batches: dict | None = None,
            extra: dict | None = None) -> tuple[Any, dict]:
        """A method's jitted task program (`program.run(trainer, state, frozen, batches, extra)`); its
        statistics fetched to the host."""
        state, stats = self.programs.run_hook(state, self.frozen, batches, extra, program=program)
        return state, fetch(stats)

    def write(self, record: dict) -> None:
        """One metrics.jsonl record."""
        self.writer.write(record)
