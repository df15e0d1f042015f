"""Where a checkpoint sits in a method's run, and its checkpoint id."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from kif_jax.checkpointing import TASK_END_STRIDE


@dataclasses.dataclass(frozen=True)
class ResumePosition:
    """A point of a method's run that a checkpoint holds.

    `phase` is the training phase the run continues with; `step` the optimizer steps already taken in
    it (0 at a phase's start: the previous phase is trained and evaluated); `trained` marks a phase
    trained to its end but not yet evaluated (preempted while evaluating). Checkpoint ids grow through
    the run, phase-major, so the newest checkpoint is the furthest position.
    """

    phase: int
    step: int = 0
    trained: bool = False

    PHASE_STRIDE: ClassVar[int] = TASK_END_STRIDE  # more optimizer steps than any phase takes

    @property
    def mid_phase(self) -> bool:
        """Whether the phase has begun training (its data iterator's position matters)."""
        return self.step > 0 or self.trained

    @property
    def checkpoint_id(self) -> int:
        return self.phase * self.PHASE_STRIDE + self.step + int(self.trained)

    @classmethod
    def from_checkpoint_id(cls, checkpoint_id: int) -> "ResumePosition":
        """The position of an id (a trained-but-not-evaluated position reads as one step further)."""
        phase, step = divmod(int(checkpoint_id), cls.PHASE_STRIDE)
        return cls(phase=phase, step=step)
