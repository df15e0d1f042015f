"""Replay: SeqLoRA with the memory buffer added to each later task's training set.

The buffer is the `memory_buffer` section's, the one Recurrent-KIF's outer learner replays: `ratio` (2%) of
every earlier task's full training file, class-balanced, seeded by `config.seed` (`kif_jax.data.memory_buffer`),
so both methods replay exactly the same examples.
"""
from __future__ import annotations

from typing import Any

from kif_jax.methods.base import Method


class Replay(Method):
    """From the second task on, the task's examples plus the memory buffer of the earlier tasks, shuffled together."""

    name = "replay"

    def train_data(self, data: Any, phase: int, phases: list[list[str]]) -> Any:
        tasks = phases[phase]
        if phase == 0:
            return data.train_set(tasks)
        earlier = [t for p in phases[:phase] for t in p]
        ratio = self.config.memory_buffer.ratio
        return data.tokenized(("replay", tuple(tasks), tuple(earlier)), lambda: [
            r for t in tasks for r in data.train_records(t)] + data.memory_records(earlier, ratio=ratio))


METHODS = (Replay,)
